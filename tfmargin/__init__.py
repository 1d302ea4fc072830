"""tfmargin: angular-margin classification heads for Keras 3 on TensorFlow."""

from tfmargin.backbones import BACKBONES, build_backbone
from tfmargin.data import load_dataset
from tfmargin.heads import ArcMarginLayer, TargetAngle
from tfmargin.margins import FALLBACKS, MARGIN_TYPES, auto_scale
from tfmargin.models import build_models

__all__ = [
    "ArcMarginLayer", "TargetAngle", "FALLBACKS", "MARGIN_TYPES", "auto_scale", "BACKBONES",
    "build_backbone", "build_models", "load_dataset",
]
__version__ = "0.1.0"
