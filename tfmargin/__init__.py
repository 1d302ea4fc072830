"""tfmargin: angular-margin classification heads for Keras 3 on TensorFlow."""

from tfmargin.heads import ArcMarginLayer, TargetAngle
from tfmargin.margins import FALLBACKS, MARGIN_TYPES, auto_scale

__all__ = ["ArcMarginLayer", "TargetAngle", "FALLBACKS", "MARGIN_TYPES", "auto_scale"]
__version__ = "0.1.0"
