"""tfmargin: angular-margin classification heads for Keras 3.

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
    "BACKBONES": "tfmargin.names",
    "build_backbone": "tfmargin.backbones",
    "MarginClassifier": "tfmargin.classifier",
    "load_dataset": "tfmargin.data",
    "RunConfig": "tfmargin.config",
}
__all__ = [*_EXPORTS, "load_model"]
__version__ = "0.1.0"


# Modules whose import registers Keras serializable classes (layers, initializers, metrics,
# models, optimizers) that saved .keras files may name.
_REGISTERING = ("tfmargin.heads", "tfmargin.airbench", "tfmargin.classifier",
                "tfmargin.optimizers")


def load_model(path, **kwargs):
    """``keras.saving.load_model`` with every tfmargin class registered first."""
    for module in _REGISTERING:
        importlib.import_module(module)
    import keras

    return keras.saving.load_model(path, **kwargs)


def __getattr__(name):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'tfmargin' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return sorted(__all__ + ["__version__"])
