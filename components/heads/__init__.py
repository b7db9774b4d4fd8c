"""Output heads: hidden states -> token logits."""

from .classifiers import BitwiseHead, IndexHead, sample_top_k_top_p

__all__ = ["BitwiseHead", "IndexHead", "sample_top_k_top_p"]
