"""Refiners of the last scale's quantisation residual."""

from .diffusion import DiffusionRefiner, GaussianDiffusion

__all__ = ["DiffusionRefiner", "GaussianDiffusion"]
