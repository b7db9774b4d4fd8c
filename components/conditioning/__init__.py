"""LR conditioning: prefix tokens, tokenizer-encoder features, NSARM's transformation network, labels."""

from .labels import ClassLabels, ConstantLabel, DegradationClasses, QualityCFG
from .nsarm_map import NSARMTransformationNet
from .prefix import EncoderFeatures, PrefixTokens
from .text import ByteCaptionEncoder, T5TextEncoder
from .transformation import TransformationNet

__all__ = ["ByteCaptionEncoder", "ClassLabels", "ConstantLabel", "DegradationClasses", "EncoderFeatures", "NSARMTransformationNet", "PrefixTokens", "QualityCFG", "T5TextEncoder", "TransformationNet"]
