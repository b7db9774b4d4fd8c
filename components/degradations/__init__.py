"""LR synthesis from HR crops, run on the device after batch transfer, and the one LR -> HR-grid resize."""

from .realesrgan import BicubicDegradation, RealESRGANDegradation, upsample

__all__ = ["BicubicDegradation", "RealESRGANDegradation", "upsample"]
