"""Extra training losses on top of next-scale cross-entropy."""

from .dpo import DPO

__all__ = ["DPO"]
