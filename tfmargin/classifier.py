"""An image classifier with an angular-margin head, trained with plain ``fit(images, labels)``."""

import keras

from tfmargin.backbones import build_backbone
from tfmargin.heads import ArcMarginLayer, TargetAngle
from tfmargin.margins import DEFAULT_SCALE
from tfmargin.models import embedding_neck


@keras.saving.register_keras_serializable(package="tfmargin")
class MarginClassifier(keras.Model):
    """Backbone + embedding neck + ``ArcMarginLayer``, in the spirit of keras-hub's
    ``ImageClassifier(backbone, num_classes)``.

    ``call`` is label-free: images in, ``s * cos(theta_j)`` logits out, so
    ``predict``, ``evaluate`` and every export never see a label. The margin
    enters in training through ``compute_loss``, which receives the labels
    ``y`` that ``fit`` passes anyway: it turns the logits back into cosines,
    applies the head's ``psi`` to each target class
    (``ArcMarginLayer.margin_logits``) and hands the result to the compiled
    loss. So ``fit(images, labels)`` (arrays or a ``tf.data`` of pairs) needs
    no label input and no duplicated targets, and training metrics see the
    label-free logits, i.e. what the model predicts.

    Args:
        backbone: a ``keras.Model`` mapping images to a feature map or vector,
            or a name from ``tfmargin.backbones.BACKBONES``.
        num_classes: int, C >= 2.
        margin_type, margin, scale, fallback, sub_centers: ``ArcMarginLayer``
            arguments (``margin=None``: the type's published default).
        embedding_dim: int, size of the projected, batch-normalised embedding;
            0 feeds the pooled backbone features to the head.
        mean, variance: per-channel statistics of the training images on the
            0..255 scale (``tfmargin.data.channel_statistics``); images are
            normalised with them inside the model, so exports take raw pixels.
        image_shape: input shape when ``backbone`` is a name.

    Example:

    >>> import numpy as np
    >>> model = MarginClassifier("tinycnn", 3, margin=0.2, embedding_dim=8)
    >>> model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    >>> images = np.random.default_rng(0).uniform(0, 255, (6, 32, 32, 3))
    >>> _ = model.fit(images, np.array([0, 1, 2, 0, 1, 2]), epochs=1, verbose=0)
    >>> model.predict(images, verbose=0).shape
    (6, 3)
    """

    def __init__(self, backbone, num_classes, margin_type="arcface", margin=None,
                 scale=DEFAULT_SCALE, fallback="monotonic", sub_centers=1, embedding_dim=512,
                 mean=(127.5,) * 3, variance=(127.5**2,) * 3, image_shape=(32, 32, 3), **kwargs):
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, tuple(image_shape))
        image = keras.Input(backbone.input_shape[1:], name="image")
        embedding = embedding_neck(image, backbone, embedding_dim, mean, variance)
        head = ArcMarginLayer(num_classes, margin_type=margin_type, margin=margin, scale=scale,
                              fallback=fallback, sub_centers=sub_centers, name="head")
        super().__init__(image, head(embedding), **kwargs)
        self.backbone = backbone
        self.head = head
        self.embedding_dim = embedding_dim
        self.mean, self.variance = list(mean), list(variance)

    @property
    def embedding(self):
        """image -> embedding (before L2 normalisation), a model sharing these layers; what
        ``tfmargin.callbacks.EmbeddingProjector`` reads, with ``head``."""
        return keras.Model(self.input, self.get_layer("embedding").output,
                           name="embedding_model")

    def embed(self, images, training=False):
        """The embeddings (before L2 normalisation) of ``images``, label-free."""
        return self.embedding(images, training=training)

    def compile(self, optimizer="sgd", loss=None, metrics=None, **kwargs):
        """``keras.Model.compile``; the loss defaults to sparse cross-entropy on logits and
        the head's ``TargetAngle`` (``theta_y_mean``, ``theta_y_std``) joins ``metrics``."""
        loss = loss or keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = list(metrics or [])
        if not any(isinstance(m, TargetAngle) for m in metrics):
            metrics.append(TargetAngle(self.head.scale))
        super().compile(optimizer=optimizer, loss=loss, metrics=metrics, **kwargs)

    def compile_from_config(self, config):
        """Compile a loaded model as it was saved (Keras skips this for a custom
        ``compile`` unless the model defines it)."""
        self.compile(**keras.saving.deserialize_keras_object(config))
        if self.built:
            self.optimizer.build(self.trainable_variables)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        if training and y is not None:
            y_pred = self.head.margin_logits(y_pred / self.head.scale, y, training=True)
        return super().compute_loss(x, y, y_pred, sample_weight, training)

    def get_config(self):
        head = self.head.get_config()
        return {"name": self.name, "trainable": self.trainable,
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "num_classes": head["num_classes"], "margin_type": head["margin_type"],
                "margin": head["margin"], "scale": head["scale"], "fallback": head["fallback"],
                "sub_centers": head["sub_centers"], "embedding_dim": self.embedding_dim,
                "mean": self.mean, "variance": self.variance}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)
