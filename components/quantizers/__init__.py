"""Next-scale quantizers: image latent <-> multi-scale token maps."""

from .multiscale_vq import MultiScaleVQ

__all__ = ["MultiScaleVQ"]
