"""Decoding and sanitising one image sample: what is converted, what is skipped, and why.

Used both when packing shards and when reading them, so a shard written by another tool
goes through the same checks.
"""

from __future__ import annotations

import io
import json
import warnings
from collections import Counter

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
QUALITY_LABELS = {"negative": 0, "positive": 1}  # -1 = unlabelled


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def open_image(data: bytes) -> Image.Image:
    """The one guarded decode every image goes through: bytes -> loaded PIL image, EXIF orientation applied.

    A declared size above PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``) is refused
    before any pixel is decoded; unreadable or truncated data raises :class:`BadSample` too.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
            return ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's message names both sizes
        raise BadSample("decompression_bomb", str(e)) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
        raise BadSample("corrupt", str(e) or type(e).__name__) from None


def decode_rgb(data: bytes) -> tuple[np.ndarray, str | None]:
    """Image bytes -> (H, W, 3) uint8 RGB and the conversion applied (None if it was clean RGB8).

    Sound conversions: grayscale and palette images to RGB, 16-bit to 8-bit, CMYK to RGB,
    RGBA/LA whose alpha is fully opaque to RGB. EXIF orientation is applied. Anything else
    raises :class:`BadSample`.
    """
    img = open_image(data)
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8), None
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img).astype(np.float64)
        peak = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(np.round(arr / peak * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(arr[..., None], 3, axis=2), "16bit"
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = np.asarray(img.convert("RGBA"))
        if rgba[..., 3].min() < 255:
            raise BadSample("transparent", f"mode {mode} with a non-opaque alpha channel")
        return np.ascontiguousarray(rgba[..., :3]), "alpha"
    if mode == "P":
        return np.asarray(img.convert("RGB")), "palette"
    if mode in ("L", "1"):
        return np.asarray(img.convert("RGB")), "gray"
    if mode == "CMYK":
        return np.asarray(img.convert("RGB")), "cmyk"
    try:
        return np.asarray(img.convert("RGB")), mode.lower()
    except (ValueError, OSError) as e:
        raise BadSample("unsupported_mode", mode) from e


def image_tensor(data: bytes):
    """Image bytes -> (3, H, W) float tensor in [0, 1] (after :func:`decode_rgb`'s conversions)."""
    import torch

    arr, _ = decode_rgb(data)
    return torch.from_numpy(np.array(arr)).permute(2, 0, 1).float() / 255


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def image_field(sample: dict) -> str | None:
    """The key of the HR image in a shard sample (``hr.png``, ``hr.jpg``, ... or a bare ``png``)."""
    for key in sample:
        if key.rsplit(".", 1)[-1] in ("png", "jpg", "jpeg", "webp") and not key.startswith("lr"):
            return key
    return None


class SampleStats(Counter):
    """Counts of skipped samples and of conversions, by reason."""

    def summary(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in sorted(self.items())) or "none"


def parse_meta(raw: bytes | None) -> tuple[str, int, int]:
    """A sample's ``json`` field -> (caption, quality label, class label), type-checked.

    ``caption`` may be a string, null or a list of strings (the first non-empty one is used);
    ``quality`` may be null, ``"positive"`` or ``"negative"``; ``label`` (class-to-image
    pretraining) may be null or an integer >= 0 (-1 = unlabelled). Anything else raises
    :class:`BadSample` (``bad_json``) naming the field.
    """
    if raw is None:
        return "", -1, -1
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise BadSample("bad_json", f"unreadable json ({e})") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"json must be an object, got {type(meta).__name__}")
    caption, quality, label = meta.get("caption"), meta.get("quality"), meta.get("label")
    if isinstance(caption, list) and all(isinstance(c, str) for c in caption):
        caption = next((c for c in caption if c.strip()), "")
    if caption is not None and not isinstance(caption, str):
        raise BadSample("bad_json", f"caption must be a string, null or a list of strings, got {caption!r:.60}")
    if quality is not None and quality not in QUALITY_LABELS:
        raise BadSample("bad_json", f"quality must be null, 'positive' or 'negative', got {quality!r:.60}")
    if label is not None and (isinstance(label, bool) or not isinstance(label, int) or label < 0):
        raise BadSample("bad_json", f"label must be null or an integer >= 0, got {label!r:.60}")
    return caption or "", QUALITY_LABELS.get(quality, -1), -1 if label is None else label
