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


class HostSync(RuntimeError):
    """A device tensor was read back to the host (``.item()``, ``.tolist()``, ``if t:``, boolean-mask indexing, ...)."""


def _syncing_functions() -> set:
    import torch

    T = torch.Tensor
    return {T.item, T.tolist, T.__bool__, T.__int__, T.__float__, T.__index__, T.numpy, T.nonzero, torch.nonzero,
            T.masked_select, torch.masked_select, T.unique, torch.unique, torch.unique_consecutive,
            T.equal, torch.equal, T.allclose, torch.allclose, torch.argwhere, torch.where}


def _make_device_tensor():
    import torch

    syncing = _syncing_functions()

    def bool_index(index) -> bool:
        items = index if isinstance(index, tuple) else (index,)
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)

    class DeviceTensor(torch.Tensor):
        """A CPU stand-in for a tensor on an accelerator: every operation that would make the host wait
        for it raises :class:`HostSync`. Results of operations on it are DeviceTensors too, so a batch
        wrapped with :func:`on_device` marks everything computed from it; host-side values (random
        parameters drawn on the CPU, Python numbers) stay plain and may be read freely."""

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func in syncing and not (func is torch.where and len(args) + len(kwargs) > 1):  # 1-arg where = nonzero
                raise HostSync(f"{getattr(func, '__name__', func)} reads a device tensor back to the host")
            if func is torch.Tensor.__getitem__ and bool_index(args[1]):
                raise HostSync("boolean-mask indexing of a device tensor (its size depends on the values: a host sync)")
            return super().__torch_function__(func, types, args, kwargs)

    return DeviceTensor


_DEVICE_TENSOR = None


def on_device(x):
    """``x`` (a tensor, or a dict / list of them) as :class:`DeviceTensor`\\ s (see there)."""
    import torch

    global _DEVICE_TENSOR
    if _DEVICE_TENSOR is None:
        _DEVICE_TENSOR = _make_device_tensor()
    if isinstance(x, torch.Tensor):
        return x.as_subclass(_DEVICE_TENSOR)
    if isinstance(x, dict):
        return {k: on_device(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], torch.Tensor):
        return type(x)(on_device(v) for v in x)
    return x
