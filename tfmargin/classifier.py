"""The one Task model: backbone, embedding neck and head, trained with ``fit(images, targets)``."""

import functools

import keras
from keras import layers, ops

from tfmargin.airbench import PatchWhitening
from tfmargin.backbones import build_backbone
from tfmargin.heads import ArcMarginLayer, TargetAngle
from tfmargin.margins import MARGIN_TYPES


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


def target_classes(y, num_classes):
    """Integer classes of ``y``: labels ``(B,)``/``(B, 1)`` as they are, one-hot or soft
    targets ``(B, C)`` (label smoothing, MixUp, CutMix) by their largest entry."""
    if len(y.shape) >= 2 and y.shape[-1] == num_classes and num_classes > 1:
        return ops.argmax(y, axis=-1)
    return ops.reshape(y, (-1,))


@keras.saving.register_keras_serializable(package="tfmargin")
class CrossEntropy(keras.losses.Loss):
    """Cross-entropy on logits for either kind of target: integer labels ``(B,)`` or
    ``(B, 1)`` (sparse), or one-hot / soft targets ``(B, C)`` (categorical), told apart by
    their shape, so ``fit`` takes whichever it is given.

    Args:
        label_smoothing: float in [0, 1), applied to ``(B, C)`` targets (smooth integer
            labels by passing them one-hot).
    """

    def __init__(self, label_smoothing=0.0, name="cross_entropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1] \
                and y_pred.shape[-1] != 1:
            return keras.losses.categorical_crossentropy(
                y_true, y_pred, from_logits=True, label_smoothing=self.label_smoothing)
        return keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def layers_of(model, layer_class):
    """Every layer of ``layer_class`` in ``model``, nested models included (through the
    public ``Model.layers``: backbones and heads here are functional models of layers)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, layer_class):
            found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(layers_of(layer, layer_class))
    return found


@keras.saving.register_keras_serializable(package="tfmargin")
class MarginClassifier(keras.Model):
    """Image classifier: backbone, embedding neck and an angular-margin (or Dense) head,
    in the spirit of keras-hub's ``ImageClassifier(backbone, num_classes)``.

    ``call`` is label-free: images in, logits out (``s * cos(theta_j)`` for a
    margin head), so ``predict``, ``evaluate`` and every export never see a
    label. The margin enters in training through ``compute_loss``, which
    receives the targets ``y`` that ``fit`` passes anyway: it turns the logits
    back into cosines, applies the head's ``psi`` to each target class
    (``ArcMarginLayer.margin_logits``) and hands the result to the compiled
    loss. So ``fit(images, labels)`` (arrays or a ``tf.data`` of pairs) trains
    with the margin, and training metrics see the label-free logits, i.e. what
    the model predicts. The training loss is

        (1 - ce_weight) * CE(y, margin logits) + ce_weight * CE(y, s * cos(theta))

    ``y`` may be integer labels or one-hot / soft targets ``(B, C)`` (label
    smoothing, MixUp, CutMix): the margin goes to the dominant class, the
    compiled loss sees ``y`` as it is.

    **After a short fit, call ``recalibrate_batchnorm``.** A BatchNorm's moving
    statistics trail its batch statistics by about ``1 / (1 - momentum)``
    steps: Keras Applications' networks use momentum 0.99-0.999, so after a
    few hundred steps inference-mode outputs can collapse to one class while
    training accuracy is high. ``recalibrate_batchnorm(images)`` replaces
    them by exact means over batches of training images under the final
    weights (``experiments/run.py`` does this after every fit, and keeps
    whichever statistics score higher on the validation split).

    Args:
        backbone: a ``keras.Model`` mapping images to a feature map or vector,
            or a name from ``tfmargin.names.BACKBONES``.
        num_classes: int, C >= 2.
        margin_type: ``"softmax"`` for a Dense head, or a margin type of
            ``ArcMarginLayer`` (``arcface``, ``cosface``, ``sphereface``,
            ``combined``, ``normface``).
        margin, scale, fallback, sub_centers: ``ArcMarginLayer`` arguments
            (None: the type's default from ``tfmargin.margins.MARGIN_TYPES``).
        ce_weight: float in [0, 1), the lambda above (margin heads only).
        embedding_dim: int, size of the projected, batch-normalised embedding;
            0 feeds the pooled backbone features to the head.
        mean, variance: per-channel statistics of the training images on the
            0..255 scale (``tfmargin.data.channel_statistics``); images are
            normalised with them inside the model, so exports take raw pixels.
        image_shape: input shape when ``backbone`` is a name.

    Call arguments:
        images: float or uint8 tensor ``(batch, H, W, 3)``, pixel values 0..255.
        training: bool, BatchNorm in training mode. Never a label.

    Example:

    >>> import numpy as np
    >>> model = MarginClassifier("tinycnn", 3, margin=0.2, scale=8.0, embedding_dim=8)
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3))
    >>> _ = model.fit(images, np.array([0, 1, 2, 0, 1, 2]), epochs=1, verbose=0)
    >>> model.recalibrate_batchnorm(images)  # the neck's BatchNorm, over 1 batch
    1
    >>> model.predict(images, verbose=0).shape
    (6, 3)

    References:
        - Deng et al., ArcFace: Additive Angular Margin Loss for Deep Face
          Recognition, CVPR 2019 (arXiv 1801.07698).
        - Wu & Johnson, Rethinking "Batch" in BatchNorm, 2021 (arXiv 2105.07576):
          precise BatchNorm statistics.
    """

    def __init__(self, backbone, num_classes, margin_type="arcface", margin=None,
                 scale=None, fallback="monotonic", sub_centers=1, ce_weight=0.0,
                 embedding_dim=512, mean=(127.5,) * 3, variance=(127.5**2,) * 3,
                 image_shape=(32, 32, 3), **kwargs):
        if margin_type != "softmax" and margin_type not in MARGIN_TYPES:
            raise ValueError(f"Unknown margin_type {margin_type!r}; choose softmax or one of "
                             f"{', '.join(MARGIN_TYPES)}.")
        if int(embedding_dim) != embedding_dim or embedding_dim < 0:
            raise ValueError(f"embedding_dim must be an integer >= 1 (or 0 for the pooled "
                             f"features), got {embedding_dim!r}.")
        if not 0.0 <= ce_weight < 1.0:
            raise ValueError(f"ce_weight must be in [0, 1), got {ce_weight}.")
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, tuple(image_shape))
        image = keras.Input(backbone.input_shape[1:], name="image")
        embedding = embedding_neck(image, backbone, embedding_dim, mean, variance)
        if margin_type == "softmax":
            head = layers.Dense(num_classes, dtype="float32", name="head")
        else:
            head = ArcMarginLayer(num_classes, margin_type=margin_type, margin=margin,
                                  scale=scale, fallback=fallback, sub_centers=sub_centers,
                                  name="head")
        super().__init__(image, head(embedding), **kwargs)
        self.backbone = backbone
        self.head = head
        self.num_classes = int(num_classes)
        self.margin_type = margin_type
        self.ce_weight = float(ce_weight)
        self.embedding_dim = embedding_dim
        self.mean, self.variance = [float(v) for v in mean], [float(v) for v in variance]

    @property
    def uses_margin(self):
        return self.margin_type != "softmax"

    # Sub-models sharing these layers, built once on first use (``cached_property`` stores
    # them outside Keras's attribute tracking, so they add nothing to what is saved).
    @functools.cached_property
    def embedding(self):
        """image -> embedding (before L2 normalisation), a model sharing these layers; what
        the projector and the exports read, with ``head``."""
        return keras.Model(self.input, self.get_layer("embedding").output,
                           name="embedding_model")

    def embed(self, images, training=False):
        """The embeddings (before L2 normalisation) of ``images``, label-free."""
        return self.embedding(images, training=training)

    @functools.cached_property
    def _logits_and_embeddings(self):
        return keras.Model(self.input, [self.output, self.get_layer("embedding").output],
                           name="logits_and_embeddings")

    def logits_and_embeddings(self):
        """image -> (logits, embedding) in one backbone pass, label-free."""
        return self._logits_and_embeddings

    def adapt(self, images, num_images=5000):
        """Set what the model learns from images rather than by gradient: the filters of
        every ``PatchWhitening`` layer (the airbench networks' first layer), from the first
        ``num_images`` images normalised as the model normalises them (airbench: 5,000).
        ``fit`` refuses a model with such a layer until this has run.

        Args:
            images: an array ``(N, H, W, 3)`` of 0..255 values, or an iterable of such
                batches (a ``tf.data.Dataset`` of image batches).

        Returns: the number of layers adapted (0 for a backbone without whitening).
        """
        whitening = layers_of(self, PatchWhitening)
        if not whitening:
            return 0
        batches = [images] if hasattr(images, "shape") else images
        taken, seen = [], 0
        for batch in batches:
            taken.append(ops.convert_to_numpy(batch)[:num_images - seen])
            seen += len(taken[-1])
            if seen >= num_images:
                break
        normalized = self.get_layer("normalize")(ops.cast(ops.concatenate(taken), "float32"))
        for layer in whitening:
            layer.adapt(ops.convert_to_numpy(normalized))
        return len(whitening)

    def fit(self, *args, **kwargs):
        """``keras.Model.fit``, refused while a ``PatchWhitening`` layer is unadapted (its
        zero filters would train the network on a blank input): call ``adapt`` first."""
        unadapted = [layer.name for layer in layers_of(self, PatchWhitening)
                     if not layer.adapted]
        if unadapted:
            raise ValueError(f"Layer(s) {', '.join(unadapted)} have no whitening filters yet; "
                             "call model.adapt(training_images) before fit.")
        return super().fit(*args, **kwargs)

    def compile(self, optimizer="sgd", loss=None, metrics=None, **kwargs):
        """``keras.Model.compile``; the loss defaults to ``CrossEntropy`` on logits (integer
        labels or one-hot / soft targets), and a margin head's ``TargetAngle``
        (``theta_y_mean``, ``theta_y_std``) joins ``metrics``."""
        loss = loss or CrossEntropy()
        metrics = list(metrics or [])
        if self.uses_margin and not any(isinstance(m, TargetAngle) for m in metrics):
            metrics.append(TargetAngle(self.head.scale))
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Compile a loaded model as it was saved (Keras skips this for a custom
        ``compile`` unless the model defines it)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if not (training and self.uses_margin and y is not None):
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        margin_logits = self.head.margin_logits(y_pred / self.head.scale,
                                                target_classes(y, self.num_classes), True)
        loss = super().compute_loss(x, y, margin_logits, sample_weight, training)
        if not self.ce_weight:
            return loss
        # Regularisation losses enter both terms, weighted (1 - lambda) + lambda = 1.
        plain = super().compute_loss(x, y, y_pred, sample_weight, training)
        return (1.0 - self.ce_weight) * loss + self.ce_weight * plain

    def recalibrate_batchnorm(self, images, num_batches=20, batch_size=128):
        """Replace every BatchNorm's moving statistics by exact averages over batches.

        "Precise BN" (Wu & Johnson, 2021): after a short run, exponential
        moving averages still carry their initial values and those of much
        older weights, so inference-mode outputs drift from training-mode
        ones. This recomputes them as the plain mean over ``num_batches``
        batches of un-augmented training ``images`` (what inference sees) under
        the final weights; trainable weights are untouched. Needed after any
        fit shorter than a few thousand steps. After a long fit on augmented
        images the moving statistics can be the better ones (they were gathered
        on the distribution the weights were trained under): compare on a
        validation split.

        Args:
            images: an array ``(N, H, W, 3)`` (cut into ``batch_size`` batches)
                or an iterable of image batches (a ``tf.data.Dataset``).
            num_batches: how many batches to average over.

        Returns: the number of batches used (0 when the model has no BatchNorm).
        """
        norms = layers_of(self, keras.layers.BatchNormalization)
        if not norms:
            return 0
        batches = images
        if hasattr(images, "shape"):  # an array: cut it into batches
            batches = (images[i:i + batch_size] for i in range(0, len(images), batch_size))
        momenta = [layer.momentum for layer in norms]
        seen = 0
        try:
            for batch in batches:
                if seen == num_batches:
                    break
                for layer in norms:
                    layer.momentum = seen / (seen + 1.0)  # running mean of batch statistics
                self(ops.cast(batch, "float32"), training=True)
                seen += 1
        finally:
            for layer, momentum in zip(norms, momenta, strict=True):
                layer.momentum = momentum
        return seen

    def get_config(self):
        head = self.head.get_config()
        config = {"name": self.name, "trainable": self.trainable,
                  "backbone": keras.saving.serialize_keras_object(self.backbone),
                  "num_classes": self.num_classes, "margin_type": self.margin_type,
                  "ce_weight": self.ce_weight, "embedding_dim": self.embedding_dim,
                  "mean": self.mean, "variance": self.variance}
        if self.uses_margin:
            config |= {key: head[key] for key in ("margin", "scale", "fallback",
                                                  "sub_centers")}
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
