"""Convolutional backbones for 32x32 images, created by name from one registry
(``tfmargin.names.BACKBONES``).

Each builder returns a ``keras.Model`` mapping normalised images
``(batch, 32, 32, 3)`` to a feature map. All are randomly initialised.
"""

import importlib

import keras
from keras import layers

from tfmargin.names import (
    BACKBONES,
    BATCHNORM_BACKBONES,
    BATCHNORMS,
    GELU_BACKBONES,
    GELUS,
    choices,
)
from tfmargin.normalization import BATCHNORM_LAYERS

# Short runs need BatchNorm inference statistics that keep up with the
# weights: Keras Applications' MobileNetV2 uses momentum 0.999, whose moving
# averages still mostly hold their initial values after a few hundred steps
# (a 3-epoch run trained to 42% and tested at 10%). 0.9 tracks within ~20 steps.
BN_MOMENTUM = 0.9


def _basic_block(x, filters, stride, name, norm):
    shortcut = x
    y = layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    y = norm(momentum=BN_MOMENTUM, name=f"{name}_bn1")(y)
    y = layers.ReLU(name=f"{name}_relu1")(y)
    y = layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv2")(y)
    y = norm(momentum=BN_MOMENTUM, name=f"{name}_bn2")(y)
    if stride != 1 or x.shape[-1] != filters:
        shortcut = layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = norm(momentum=BN_MOMENTUM, name=f"{name}_proj_bn")(shortcut)
    return layers.ReLU(name=f"{name}_out")(layers.Add(name=f"{name}_add")([y, shortcut]))


def resnet18(input_shape=(32, 32, 3), batchnorm="keras"):
    """ResNet18, CIFAR variant (He et al. 2016; the common CIFAR adaptation).

    3x3 stem conv with stride 1 and no max-pool, then [2, 2, 2, 2] basic blocks
    of 64/128/256/512 filters with stride 2 at stages 2-4: a 32x32 input gives
    a 4x4x512 feature map. 11.2 M parameters. ``batchnorm``: ``tfmargin.names.BATCHNORMS``.
    """
    norm = BATCHNORM_LAYERS[batchnorm]
    inputs = keras.Input(input_shape)
    x = layers.Conv2D(64, 3, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = norm(momentum=BN_MOMENTUM, name="stem_bn")(x)
    x = layers.ReLU(name="stem_relu")(x)
    for stage, filters in enumerate((64, 128, 256, 512)):
        for block in range(2):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, stride, f"stage{stage + 1}_block{block + 1}", norm)
    return keras.Model(inputs, x, name="resnet18")


def _adapt_application(model, name, by_name, by_class=None, batchnorm="keras"):
    """Rebuild a Keras Application with per-layer config changes.

    Every BatchNormalization gets ``BN_MOMENTUM`` and, with ``batchnorm="fused"``, becomes a
    ``FusedBatchNormalization`` (the same config; its epsilon floor). ``by_name`` changes the
    layers Keras Applications names explicitly; ``by_class`` changes every
    layer of a class (for layers with auto-generated names such as
    ``rescaling_1``, which depend on how many were built before in the
    process). A change that matches no layer is an error, never a no-op.
    """
    by_class = by_class or {}
    config = model.get_config()
    used = set()
    for layer in config["layers"]:
        layer_config = layer["config"]
        if layer["class_name"] == "BatchNormalization":
            layer_config["momentum"] = BN_MOMENTUM
            if batchnorm != "keras":
                layer.update(keras.saving.serialize_keras_object(
                    BATCHNORM_LAYERS[batchnorm].from_config(layer_config)))
        for key, changes in ((layer_config["name"], by_name),
                             (layer["class_name"], by_class)):
            if key in changes:
                layer_config.update(changes[key])
                used.add(key)
    unused = (set(by_name) | set(by_class)) - used
    if unused:
        raise ValueError(f"{model.name}: no layer matches {sorted(unused)}; the Keras "
                         f"Applications model changed, update the adaptation of {name}.")
    config["name"] = name
    return keras.Model.from_config(config)


_SAME_PAD_3X3 = {"padding": ((1, 1), (1, 1))}


def mobilenetv2(input_shape=(32, 32, 3), batchnorm="keras"):
    """Keras Applications MobileNetV2 (alpha 1.0) adapted to 32x32.

    Changed strides: ``Conv1`` 2 -> 1 and ``block_1_depthwise`` 2 -> 1 (its
    ``block_1_pad`` becomes a symmetric 1-pixel pad so the size is kept).
    Total downsampling 8 instead of 32: a 32x32 input gives a 4x4x1280 map.
    BatchNorm momentum 0.999 -> 0.9 (see ``BN_MOMENTUM``); ``batchnorm``: as ``resnet18``.
    """
    base = keras.applications.MobileNetV2(input_shape=input_shape, include_top=False,
                                          weights=None)
    changes = {
        "Conv1": {"strides": (1, 1)},
        "block_1_pad": _SAME_PAD_3X3,
        "block_1_depthwise": {"strides": (1, 1)},
    }
    return _adapt_application(base, "mobilenetv2", changes, batchnorm=batchnorm)


def efficientnetb0(input_shape=(32, 32, 3), batchnorm="keras"):
    """Keras Applications EfficientNetB0 adapted to 32x32.

    Changed strides: ``stem_conv`` 2 -> 1 and ``block2a_dwconv`` 2 -> 1 (their
    pads become symmetric 1-pixel pads). Total downsampling 8 instead of 32:
    a 32x32 input gives a 4x4x1280 map. The built-in rescaling and
    normalisation become identities, since the model's input layer already
    normalises. BatchNorm momentum 0.99 -> 0.9 (see ``BN_MOMENTUM``); ``batchnorm``: as
    ``resnet18``.
    """
    base = keras.applications.EfficientNetB0(input_shape=input_shape, include_top=False,
                                             weights=None)
    changes = {
        "stem_conv_pad": _SAME_PAD_3X3,
        "stem_conv": {"strides": (1, 1)},
        "block2a_dwconv_pad": _SAME_PAD_3X3,
        "block2a_dwconv": {"strides": (1, 1)},
    }
    # Its auto-named Rescaling(1/255) and Normalization, matched by class.
    identity = {"Rescaling": {"scale": 1.0, "offset": 0.0},
                "Normalization": {"mean": 0.0, "variance": 1.0}}
    return _adapt_application(base, "efficientnetb0", changes, identity, batchnorm)


def tinycnn(input_shape=(32, 32, 3)):
    """Three 3x3 convs (32/64/128 filters, strides 1/2/2), no BatchNorm.

    For tests and smoke runs: fast on a CPU, and free of per-replica batch
    statistics, so distributed and single-device runs agree numerically.
    A 32x32 input gives an 8x8x128 feature map.
    """
    inputs = keras.Input(input_shape)
    x = inputs
    for i, (filters, stride) in enumerate(((32, 1), (64, 2), (128, 2))):
        x = layers.Conv2D(filters, 3, stride, padding="same", activation="relu",
                          name=f"conv{i + 1}")(x)
    return keras.Model(inputs, x, name="tinycnn")


def build_backbone(name, input_shape=(32, 32, 3), gelu="keras", batchnorm="keras"):
    """Create a backbone by registry name (``tfmargin.names.BACKBONES``); ``gelu``
    (``tfmargin.names.GELUS``) for the backbones built with GELU (``GELU_BACKBONES``),
    ``batchnorm`` (``BATCHNORMS``) for those built with BatchNorm (``BATCHNORM_BACKBONES``)."""
    if name not in BACKBONES:
        raise ValueError(f"Unknown backbone {name!r}; choose one of {choices(BACKBONES)}.")
    options = {}
    for option, value, allowed, backbones, what in (
            ("gelu", gelu, GELUS, GELU_BACKBONES, "GELU"),
            ("batchnorm", batchnorm, BATCHNORMS, BATCHNORM_BACKBONES, "BatchNorm")):
        if value not in allowed:
            raise ValueError(f"Unknown {option} {value!r}; choose one of {choices(allowed)}.")
        if name in backbones:
            options[option] = value
        elif value != "keras":
            raise ValueError(f"{option}={value!r} needs a backbone built with {what} "
                             f"({choices(backbones)}); {name} has none.")
    module, function = BACKBONES[name][0].split(":")
    return getattr(importlib.import_module(module), function)(input_shape, **options)
