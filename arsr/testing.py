"""Tiny randomly initialised stand-ins for the large pretrained parts, for tests and CPU smoke runs.

Nothing here downloads: the Flan-T5 stand-in is built from a ``T5Config`` and a word-level
tokenizer trained on the spot, saved in the layout ``T5TextEncoder`` reads.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_t5(path: str | Path, d_model: int = 128, seed: int = 0) -> Path:
    """Write a tiny T5 encoder checkpoint + tokenizer to ``path`` (a folder) and return it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    words = ("a photo of the with and in on high quality sharp detailed image cat dog tree house sky city street "
             "person face flower water mountain car road building window red green blue white black small large").split()
    tok.train_from_iterator([" ".join(words)], trainers.WordLevelTrainer(special_tokens=["<pad>", "</s>", "<unk>"]))
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=tok.get_vocab_size(), d_model=d_model, d_kv=32, d_ff=2 * d_model, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)
    return path
