"""Every name a run is configured with, and what it means: one table per kind of name.

Pure Python (no TensorFlow): the library resolves names through these tables, and the
command line validates flags and writes its ``--help`` from the same tables before the
framework starts, so a new entry is added in one place.
"""

from tfmargin.margins import MARGIN_TYPES

# name -> ("module:function" that builds it, one line of help). Resolved on first use.
BACKBONES = {
    "resnet18": ("tfmargin.backbones:resnet18",
                 "CIFAR ResNet18 (3x3 stride-1 stem, no max-pool; 11.2 M parameters)"),
    "mobilenetv2": ("tfmargin.backbones:mobilenetv2",
                    "Keras Applications MobileNetV2 adapted to 32x32 (first two stride-2 "
                    "stages at stride 1)"),
    "efficientnetb0": ("tfmargin.backbones:efficientnetb0",
                       "Keras Applications EfficientNetB0 adapted to 32x32"),
    "airbench94": ("tfmargin.airbench:airbench94",
                   "airbench94's network (whitening + 64/256/256 conv groups; 1.97 M "
                   "parameters)"),
    "airbench93": ("tfmargin.airbench:airbench93",
                   "airbench93's narrower widths 64/128/128"),
    "tinycnn": ("tfmargin.backbones:tinycnn",
                "three convs, no BatchNorm: for tests and the one-minute first run"),
}
# Backbones whose mixed_bfloat16 training step measured faster than float32 on a CPU with
# AVX-512 BF16 (benchmarks/bench.py, docs/performance.md): MobileNetV2's depthwise and
# element-wise layers only pay the casts there (0.86x). "auto" precision uses bfloat16 on a
# CPU for these only.
BFLOAT16_FASTER_ON_CPU = ("resnet18", "airbench94", "airbench93")
# The backbones built with GELU, and the GELU implementations they can be built with.
GELU_BACKBONES = ("airbench94", "airbench93")
GELUS = {
    "keras": "keras.layers.Activation('gelu'), computed in the layer's compute dtype",
    "fused": "tfmargin.activations.FusedGELU: the same exact GELU in float32, one "
             "XLA-compiled kernel each way on TensorFlow",
}
# The backbones built with BatchNorm, and the BatchNorm implementations they can be built with.
BATCHNORM_BACKBONES = ("resnet18", "mobilenetv2", "efficientnetb0", "airbench94", "airbench93")
BATCHNORMS = {
    "keras": "keras.layers.BatchNormalization, its statistics computed op by op",
    "fused": "tfmargin.normalization.FusedBatchNormalization: TensorFlow's FusedBatchNormV3 "
             "in training (one kernel each way; epsilon at least 1.001e-5)",
}
HEADS = {
    "softmax": "a Dense layer on the embedding (plain cross-entropy)",
    **{name: spec.published for name, spec in MARGIN_TYPES.items()},
}
AUGMENTATIONS = {
    "standard": "pad-4 shift + horizontal flip",
    "randaugment": "standard + Keras' RandAugment",
    "airbench": "airbench's alternating flip + 2-pixel reflect translation",
    "none": "no augmentation",
}
MIXES = {
    "none": "hard labels",
    "mixup": "Keras' MixUp (soft targets; the margin goes to the dominant class)",
    "cutmix": "Keras' CutMix (soft targets; the margin goes to the dominant class)",
}
TTA_LEVELS = {
    0: "none",
    1: "the image and its mirror",
    2: "mirror + 1-pixel shifts, airbench's 6 weighted views",
}
EXPORT_FORMATS = {
    "savedmodel": "TensorFlow SavedModel with serve, serve_encoded and embed endpoints",
    "keras": "the .keras file of the classifier",
    "onnx": "ONNX, converted from the SavedModel (needs the onnx extra)",
}
STRATEGIES = {
    "mirrored": "MirroredStrategy over all GPUs, else all logical CPUs",
    "default": "no distribution",
    "multiworker": "MultiWorkerMirroredStrategy from TF_CONFIG",
}
OPTIMIZERS = {
    "sgd": "SGD with Nesterov momentum and coupled L2 weight decay",
    "adamw": "AdamW (decoupled weight decay)",
}


def choices(table):
    """``"a, b, c"``: the names of a table, for messages and help."""
    return ", ".join(str(name) for name in table)


def described(table):
    """``"a (what a is); b (...)"``: names with their help, for ``--help`` (a tuple value's
    help is its last item)."""
    return "; ".join(f"{name} ({text[-1] if isinstance(text, tuple) else text})"
                     for name, text in table.items())
