"""Classification models: preprocessing, backbone, embedding neck, head.

``build_models`` returns the training model (image + label -> margin logits)
and the label-free inference model (image -> logits) sharing its weights.
"""

import dataclasses

import keras
from keras import layers

from tfmargin.backbones import build_backbone
from tfmargin.config import LOSSES
from tfmargin.heads import ArcMarginLayer
from tfmargin.margins import DEFAULT_SCALE


@dataclasses.dataclass
class Models:
    train: keras.Model  # what model.fit trains
    inference: keras.Model  # image -> logits, no label input
    embedding: keras.Model  # image -> unnormalised embedding
    head: keras.layers.Layer  # ArcMarginLayer or Dense

    @property
    def uses_label_input(self):
        return isinstance(self.head, ArcMarginLayer)

    def evaluation_model(self):
        """image -> (logits, embedding) in one backbone pass, label-free."""
        return keras.Model(self.inference.input,
                           [self.inference.output, self.embedding.output], name="evaluation")


def embedding_neck(image, backbone, embedding_dim, mean, variance):
    """image -> normalisation -> backbone -> pooling -> projection + BatchNorm -> embedding.

    ``embedding_dim=0`` keeps the pooled features. Normalisation and the
    embedding are float32 under any policy (0..255 inputs lose precision in
    bfloat16; the head computes in float32).
    """
    x = layers.Normalization(mean=list(mean), variance=list(variance), dtype="float32",
                             name="normalize")(image)
    x = backbone(x)
    if len(x.shape) == 4:
        x = layers.GlobalAveragePooling2D(name="pool")(x)
    if embedding_dim:
        x = layers.Dense(embedding_dim, use_bias=False, name="projection")(x)
        x = layers.BatchNormalization(momentum=0.9, name="embedding_bn")(x)
    return layers.Activation("linear", dtype="float32", name="embedding")(x)


def build_models(backbone, num_classes, loss="arcface", image_size=32, embedding_dim=512,
                 scale=DEFAULT_SCALE, margin=None, fallback="monotonic", sub_centers=1,
                 ce_weight=0.0, mean=(127.5,) * 3, variance=(127.5**2,) * 3):
    """Build training and inference models for one backbone and head.

    Args:
        backbone: a name from ``tfmargin.backbones.BACKBONES``.
        num_classes: C.
        loss: ``softmax`` (Dense head) or a margin type of ``ArcMarginLayer``.
        embedding_dim: size of the projected embedding; 0 keeps the pooled
            backbone features.
        scale, margin, fallback, sub_centers: passed to ``ArcMarginLayer``
            (``margin=None``: the type's default).
        ce_weight: lambda of the mixed objective
            ``(1 - lambda) * CE(margin logits) + lambda * CE(s * cos theta)``.
            A margin head's training model has outputs ``margin`` and
            ``plain``, to be weighted by ``loss_weights`` (1 - lambda, lambda).
        mean, variance: per-channel statistics of the training images on the
            0..255 scale (``tfmargin.data.channel_statistics``); they become
            part of every model and export.
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss {loss!r}; choose one of {', '.join(LOSSES)}.")
    if int(embedding_dim) != embedding_dim or embedding_dim < 0:
        raise ValueError(f"embedding_dim must be an integer >= 1 (or 0 for the pooled "
                         f"features), got {embedding_dim!r}.")
    if not 0.0 <= ce_weight < 1.0:
        raise ValueError(f"ce_weight must be in [0, 1), got {ce_weight}.")
    image = keras.Input((image_size, image_size, 3), name="image")
    embedding = embedding_neck(image, build_backbone(backbone, (image_size, image_size, 3)),
                               embedding_dim, mean, variance)
    embedding_model = keras.Model(image, embedding, name="embedding_model")

    if loss == "softmax":
        head = layers.Dense(num_classes, dtype="float32", name="head")
        logits = head(embedding)
        inference = keras.Model(image, logits, name="inference")
        return Models(inference, inference, embedding_model, head)

    head = ArcMarginLayer(num_classes, margin_type=loss, margin=margin, scale=scale,
                          fallback=fallback, sub_centers=sub_centers, name="head")
    inference = keras.Model(image, head(embedding), name="inference")
    label = keras.Input((), dtype="int32", name="label")
    # Two outputs: the margin logits carry the loss; the plain logits s*cos(theta)
    # carry lambda of it (the mixed objective, lambda may be 0) and the training
    # accuracy, which on margin logits would understate what the model predicts.
    # float32 like the head: under a mixed policy the losses and metrics see full precision.
    outputs = {"margin": layers.Identity(name="margin", dtype="float32")(
                   head(embedding, labels=label)),
               "plain": layers.Identity(name="plain", dtype="float32")(inference.output)}
    train = keras.Model({"image": image, "label": label}, outputs, name="train")
    return Models(train, inference, embedding_model, head)
