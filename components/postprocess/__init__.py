"""Post-processing of SR images: colour fixes (NSARM's AdaIN + wavelet)."""

from .colorfix import AdaINColorFix, ColorFix, WaveletColorFix

__all__ = ["AdaINColorFix", "ColorFix", "WaveletColorFix"]
