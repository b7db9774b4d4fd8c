"""LR synthesis from HR crops, run on the device after batch transfer."""

from .realesrgan import BicubicDegradation, RealESRGANDegradation

__all__ = ["BicubicDegradation", "RealESRGANDegradation"]
