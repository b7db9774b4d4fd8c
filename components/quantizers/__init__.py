"""Next-scale quantizers: image latent <-> multi-scale token maps."""

from .bsq import MultiScaleBSQ, Pyramid, relabel_after_substitution
from .hierarchical_rq import HierarchicalRQ
from .multiscale_vq import MultiScaleVQ

__all__ = ["HierarchicalRQ", "MultiScaleBSQ", "MultiScaleVQ", "Pyramid", "relabel_after_substitution"]
