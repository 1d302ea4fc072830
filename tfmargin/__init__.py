"""tfmargin: angular-margin classification heads for Keras 3.

``import tfmargin`` imports Keras (quietly: TensorFlow's start-up notices are held back,
``TFMARGIN_VERBOSE=1`` shows them) and registers every class a saved ``.keras`` file of
this library may name, so ``keras.saving.load_model`` loads one after it, as after
``import keras_hub``. Datasets are imported on first use; the experiment runner
(``tfmargin.runner``) is not part of the library and is never imported by it.
"""

import importlib

from tfmargin import quiet as _quiet

_quiet.import_keras()

# The modules whose import registers Keras serializable classes (layers, initializers,
# losses, metrics, models, optimizers): imported now, the rest on first use.
from tfmargin.classifier import CrossEntropy, MarginClassifier  # noqa: E402
from tfmargin.heads import ArcMarginLayer, TargetAngle  # noqa: E402
from tfmargin.margins import FALLBACKS, MARGIN_TYPES, auto_scale  # noqa: E402
from tfmargin.optimizers import L2SGD  # noqa: E402

_LAZY = {
    "BACKBONES": "tfmargin.names",
    "build_backbone": "tfmargin.backbones",
    "load_dataset": "tfmargin.data",
}
__all__ = ["ArcMarginLayer", "TargetAngle", "FALLBACKS", "MARGIN_TYPES", "auto_scale",
           "MarginClassifier", "CrossEntropy", "L2SGD", *_LAZY, "load_model"]
__version__ = "0.1.0"


def load_model(path, **kwargs):
    """``keras.saving.load_model``; every tfmargin class is registered by the import."""
    import keras

    return keras.saving.load_model(path, **kwargs)


def __getattr__(name):
    if name not in _LAZY:
        raise AttributeError(f"module 'tfmargin' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)


def __dir__():
    return sorted(__all__ + ["__version__"])
