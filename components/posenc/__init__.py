"""Positional encodings of next-scale sequences."""

from .absolute import AbsolutePerScale, LearnedResampled
from .rope import SARoPE

__all__ = ["AbsolutePerScale", "LearnedResampled", "SARoPE"]
