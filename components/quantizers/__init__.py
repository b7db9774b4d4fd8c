"""Next-scale quantizers: image latent <-> multi-scale token maps."""

from .hierarchical_rq import HierarchicalRQ
from .multiscale_vq import MultiScaleVQ

__all__ = ["HierarchicalRQ", "MultiScaleVQ"]
