"""tfmargin: angular-margin classification heads for Keras 3 on TensorFlow.

Names are imported on first use, so ``import tfmargin`` (and the command line's
argument checks) do not start TensorFlow.
"""

import importlib

_EXPORTS = {
    "ArcMarginLayer": "tfmargin.heads",
    "TargetAngle": "tfmargin.heads",
    "FALLBACKS": "tfmargin.margins",
    "MARGIN_TYPES": "tfmargin.margins",
    "auto_scale": "tfmargin.margins",
    "BACKBONES": "tfmargin.backbones",
    "build_backbone": "tfmargin.backbones",
    "build_models": "tfmargin.models",
    "MarginClassifier": "tfmargin.classifier",
    "load_dataset": "tfmargin.data",
    "RunConfig": "tfmargin.config",
}
__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfmargin' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(__all__ + ["__version__"])
