"""Label policies: which class each training sample gets, and how inference guides with them."""

from __future__ import annotations

import torch
from torch import Tensor

from arsr.interfaces import Labels, SRBatch


class ConstantLabel(Labels):
    """Every sample gets ``label`` (e.g. VAR's class-to-image checkpoints fine-tuned without classes)."""

    def __init__(self, label: int = 0, cfg: float = 0.0, neg_label: int | None = None):
        self.label, self.cfg, self.neg_label = label, cfg, neg_label

    def __call__(self, batch: SRBatch) -> Tensor:
        return torch.full((len(batch),), self.label, dtype=torch.long, device=batch.hr.device)

    def inference(self, batch_size: int, device) -> Tensor:
        return torch.full((batch_size,), self.label, dtype=torch.long, device=device)


class QualityCFG(ConstantLabel):
    """VARSR's image-based CFG: positive (high-quality) and negative samples are two classes.

    Shard quality labels map to ``positive`` / ``negative`` (unlabelled samples count as
    positive); inference asks for ``positive`` and guides away from ``negative`` with a
    strength rising linearly over the scales to ``cfg``.
    """

    def __init__(self, positive: int = 0, negative: int = 1, cfg: float = 6.0):
        super().__init__(positive, cfg, negative)
        self.positive, self.negative = positive, negative

    def __call__(self, batch: SRBatch) -> Tensor:
        q = batch.need("quality", "QualityCFG labels samples by quality; pack shards with quality labels or use ConstantLabel")
        return torch.where(q == 0, self.negative, self.positive).long()


class DegradationClasses(ConstantLabel):
    """MSVAR's three classes: degraded / non-degraded (bilinear-only LR) / class-free.

    The class-free row is the model's ``null_class`` (label dropout); inference uses
    ``infer_label`` (degraded for real-world inputs).
    """

    def __init__(self, degraded: int = 0, clean: int = 1, class_free: int = 2, infer_label: int = 0, cfg: float = 0.0):
        super().__init__(infer_label, cfg, class_free)
        self.degraded, self.clean = degraded, clean

    def __call__(self, batch: SRBatch) -> Tensor:
        degraded = batch.need("degraded", "DegradationClasses labels samples by the degradation's clean / degraded branch")
        return torch.where(degraded, self.degraded, self.clean).long()


class ClassLabels(Labels):
    """Class-to-image labels: each sample's ``batch.label`` (shards packed with
    ``tools/make_shards.py --class_from folder``); VAR / VARSR C2I pretraining.

    Label dropout to the null class is the transformer's (``cond_drop``, ``null_class``), and CFG
    guides away from that null class (``neg_label`` None). Unlabelled samples (-1) train the null
    class. Validation and ``arsr predict`` sample ``sample_classes`` in turn (default 0, 1, 2, ...).

    Args:
        num_classes: real classes (the transformer's ``null_class``, its ``num_classes - 1``).
        cfg: guidance strength at the last scale (VARSR's C2I demo: 4.0).
        sample_classes: the classes images are generated for, repeated to the batch size.
    """

    def __init__(self, num_classes: int, cfg: float = 4.0, sample_classes: list[int] | None = None):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        bad = [c for c in sample_classes or () if not 0 <= c < num_classes]
        if bad:
            raise ValueError(f"sample_classes {bad} are not classes 0..{num_classes - 1}")
        self.num_classes, self.cfg, self.neg_label = num_classes, cfg, None
        self.sample_classes = list(sample_classes) if sample_classes else None

    def __call__(self, batch: SRBatch) -> Tensor:
        label = batch.need("label", "ClassLabels needs shards packed with class labels (tools/make_shards.py --class_from)").long()
        return torch.where(label < 0, self.num_classes, label)

    def inference(self, batch_size: int, device) -> Tensor:
        classes = torch.tensor(self.sample_classes, dtype=torch.long) if self.sample_classes else torch.arange(min(batch_size, self.num_classes))
        return classes.repeat((batch_size + len(classes) - 1) // len(classes))[:batch_size].to(device)
