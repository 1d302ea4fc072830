"""Angular-margin classification head (ArcFace, CosFace, SphereFace, ...)."""

import math

import keras
from keras import ops

from tfmargin.margins import check_head_arguments, target_logit


def check_labels(labels, num_classes):
    """Fail the step with a readable error when a label is outside [0, C).

    A one-hot or gather with an out-of-range label silently yields a zero row
    or another class's column; the margin would then be applied nowhere.
    TensorFlow: graph assertions (dropped under XLA). PyTorch and eager JAX:
    the values are checked directly. Inside a jitted JAX step the labels have
    no values yet, so nothing is checked there.
    """
    message = (
        f"labels must lie in [0, {num_classes}): the dataset has more classes than "
        "the head. Rebuild the head with num_classes >= max(label) + 1."
    )
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.control_dependencies(
            [
                tf.debugging.assert_non_negative(labels, message=message),
                tf.debugging.assert_less(
                    labels, tf.cast(num_classes, labels.dtype), message=message
                ),
            ]
        ):
            return tf.identity(labels)
    if backend == "jax":
        import jax

        if isinstance(labels, jax.core.Tracer):
            return labels
    values = ops.convert_to_numpy(labels)
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        raise ValueError(message)
    return labels


@keras.saving.register_keras_serializable(package="tfmargin")
class TargetAngle(keras.metrics.Metric):
    """Mean and spread (degrees) of theta_y, the angle to the true class centre.

    A compiled metric on a cosine head's label-free logits ``s * cos(theta_j)``:
    ``theta_y = arccos(logits[y] / s)``. Reported as ``theta_y_mean`` and
    ``theta_y_std``; the margin acts on this angle, so watching it shrink
    shows the head doing its work. A plain ``keras.metrics.Metric`` with
    ``update_state(y_true, y_pred)``, so it runs on every backend.

    Args:
        scale: the head's ``s`` (``ArcMarginLayer.scale``).
        name: metric name.

    Call arguments (``update_state``):
        y_true: int labels ``(batch,)`` or one-hot/soft targets
            ``(batch, C)`` (the largest entry counts as the class).
        y_pred: the logits ``s * cos(theta_j)``, ``(batch, C)``.
    """

    def __init__(self, scale, name="theta_y", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = float(scale)
        self.total = self.add_variable((), initializer="zeros", name="total")
        self.total_sq = self.add_variable((), initializer="zeros", name="total_sq")
        self.count = self.add_variable((), initializer="zeros", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        y_pred = ops.cast(y_pred, "float32")
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == y_pred.shape[-1]:
            y_true = ops.argmax(y_true, axis=-1)
        labels = ops.reshape(ops.cast(y_true, "int32"), (-1, 1))
        cos_y = ops.take_along_axis(y_pred, labels, axis=-1)[:, 0] / self.scale
        theta = ops.arccos(ops.clip(cos_y, -1.0, 1.0)) * (180.0 / math.pi)
        self.total.assign_add(ops.sum(theta))
        self.total_sq.assign_add(ops.sum(ops.square(theta)))
        self.count.assign_add(ops.cast(ops.size(theta), "float32"))

    def result(self):
        mean = ops.divide_no_nan(self.total, self.count)
        variance = ops.divide_no_nan(self.total_sq, self.count) - ops.square(mean)
        return {
            "theta_y_mean": mean,
            "theta_y_std": ops.sqrt(ops.maximum(variance, 0.0)),
        }

    def get_config(self):
        return {"scale": self.scale, "name": self.name, "dtype": self.dtype}


@keras.saving.register_keras_serializable(package="tfmargin")
class ArcMarginLayer(keras.layers.Layer):
    """Angular-margin logits: ``s * psi(theta_y)`` for the target, ``s * cos(theta_j)`` else.

    With ``x`` the embedding and ``W_j`` the weight of class j, both
    L2-normalised, ``cos(theta_j) = W_j . x``. During training, when labels are
    given, the target class y gets ``psi(theta_y)`` instead:

    | margin_type  | psi(theta)                                                  |
    |--------------|-------------------------------------------------------------|
    | `arcface`    | cos(theta + m)                                              |
    | `cosface`    | cos(theta) - m                                              |
    | `sphereface` | (-1)^k cos(m*theta) - 2k,  k = floor(m*theta / pi)          |
    | `combined`   | cos(m1*theta + m2) - m3,   margin = (m1, m2, m3)            |
    | `normface`   | cos(theta)  (no margin)                                     |

    Without labels, or with ``training=False``, every class (the target
    included) gets ``s * cos(theta_j)``: labels never reach evaluation,
    ``predict`` or an export.

    ``cos(theta + m)`` turns back up once ``theta + m > pi``. ``fallback``
    decides what happens there:

    * ``"monotonic"`` (default): for ``theta > pi - m`` use
      ``cos(theta) - c`` with ``c = max(m*sin(m), 1 - cos(m))``; this is
      InsightFace's ``cos(theta) - m*sin(m)`` for m <= 2.33 and stays
      non-increasing beyond (general form for ``combined``).
    * ``"easy"``: apply the margin only where ``cos(theta) > 0`` (InsightFace's
      ``easy_margin`` for ArcFace). Not monotonic: psi jumps up at 90 degrees
      (by 0.48 for ArcFace m = 0.5); here it applies to every margin type.
    * ``"none"``: the raw formula, as the paper used it.

    Args:
        num_classes: int. Number of classes C, >= 2.
        margin_type: str. One of `arcface`, `cosface`, `sphereface`,
            `combined`, `normface`.
        margin: float, triple or None. m in radians (a multiplier of theta for
            `sphereface`, ``(m1, m2, m3)`` for `combined`). ArcFace needs
            ``0 <= m < pi``. None takes the type's default from
            ``tfmargin.margins.MARGIN_TYPES`` (chosen on CIFAR-10 validation; the
            published face-recognition values are recorded beside it).
        scale: float, ``"auto"`` or None. s > 0; None takes the type's default
            from ``MARGIN_TYPES``; ``"auto"`` the AdaCos fixed scale
            ``sqrt(2) * ln(C - 1)`` (3.11 for C=10, 6.50 for C=100), resolved to a
            float once, at construction.
        fallback: str. `monotonic`, `easy` or `none`, see above.
        sub_centers: int. K >= 1 centres per class; the class cosine is the max
            over its K centres (Sub-center ArcFace).
        epsilon: float. cos(theta) is clipped to ``[-1 + eps, 1 - eps]``
            before arccos, so gradients stay finite at cos = +-1.
        kernel_initializer: initializer of the class weights ``W`` (D, C*K).
        **kwargs: base ``Layer`` arguments. ``dtype`` defaults to ``"float32"``
            so the head computes in float32 under mixed-precision policies.

    Call arguments:
        embeddings: float tensor ``(batch, dim)``.
        labels: optional int tensor ``(batch,)`` or ``(batch, 1)``, used only
            when ``training`` is true.
        training: bool. The margin is applied only in training.

    Returns: logits ``(batch, num_classes)``, float32.

    Example:

    >>> import numpy as np
    >>> head = ArcMarginLayer(10, margin_type="arcface", margin=0.1, scale=1.0)
    >>> x = np.random.rand(4, 64).astype("float32")
    >>> y = np.array([0, 3, 9, 1])
    >>> tuple(head(x, labels=y, training=True).shape)  # margin on the target
    (4, 10)
    >>> tuple(head(x).shape)                            # label-free inference path
    (4, 10)

    References:
        - Deng et al., ArcFace: Additive Angular Margin Loss for Deep Face
          Recognition, CVPR 2019 (arXiv 1801.07698).
        - Wang et al., CosFace: Large Margin Cosine Loss, CVPR 2018 (arXiv 1801.09414).
        - Liu et al., SphereFace: Deep Hypersphere Embedding, CVPR 2017 (arXiv 1704.08063).
        - Wang et al., NormFace: L2 Hypersphere Embedding, ACM MM 2017 (arXiv 1704.06369).
        - Zhang et al., AdaCos: Adaptively Scaling Cosine Logits, CVPR 2019 (arXiv 1905.00292).
        - Deng et al., Sub-center ArcFace, ECCV 2020.
    """

    def __init__(
        self,
        num_classes,
        margin_type="arcface",
        margin=None,
        scale=None,
        fallback="monotonic",
        sub_centers=1,
        epsilon=1e-7,
        kernel_initializer="glorot_uniform",
        **kwargs,
    ):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        (self.m1, self.m2, self.m3), self.scale = check_head_arguments(
            num_classes, margin_type, margin, scale, fallback, sub_centers)
        if not 0.0 < epsilon < 0.1:
            raise ValueError(f"epsilon must be in (0, 0.1), got {epsilon!r}.")
        self.num_classes = int(num_classes)
        self.margin_type = margin_type
        # The margin as the user gives it (m, or (m1, m2, m3) for combined).
        self.margin = (self.m1, self.m2, self.m3) if margin_type == "combined" else \
            {"arcface": self.m2, "cosface": self.m3, "sphereface": self.m1}.get(margin_type, 0.0)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.fallback = fallback
        self.sub_centers = int(sub_centers)
        self.epsilon = float(epsilon)

    def build(self, embeddings_shape, labels_shape=None):
        self.kernel = self.add_weight(
            name="kernel",
            shape=(embeddings_shape[-1], self.num_classes * self.sub_centers),
            initializer=self.kernel_initializer,
        )

    def cosine(self, embeddings):
        """cos(theta_j) for every class, shape ``(batch, num_classes)``."""
        x = ops.normalize(embeddings, axis=-1, epsilon=1e-12)
        w = ops.normalize(self.kernel, axis=0, epsilon=1e-12)
        cos = ops.matmul(x, w)
        if self.sub_centers > 1:
            cos = ops.max(
                ops.reshape(cos, (-1, self.num_classes, self.sub_centers)), axis=-1
            )
        return cos

    def call(self, embeddings, labels=None, training=None):
        cos = self.cosine(embeddings)
        if labels is None:
            return self.scale * cos
        return self.margin_logits(cos, labels, training)

    def margin_logits(self, cos, labels, training=True):
        """Logits from the cosines ``(batch, num_classes)``: ``s * psi(theta_y)`` for the
        target class when ``training``, ``s * cos(theta_j)`` everywhere else.

        A model that computes ``s * cos(theta)`` label-free can apply the margin later, in its
        loss, by passing ``logits / scale`` here (``MarginClassifier`` does).
        """
        if not training:
            return self.scale * cos
        labels = check_labels(ops.reshape(ops.cast(labels, "int32"), (-1,)), self.num_classes)
        one_hot = ops.one_hot(labels, self.num_classes, dtype=cos.dtype)
        cos_y = ops.sum(cos * one_hot, axis=-1)
        theta_y = ops.arccos(ops.clip(cos_y, -1.0 + self.epsilon, 1.0 - self.epsilon))
        psi = target_logit(cos_y, self.margin_type, self.m1, self.m2, self.m3, self.fallback,
                           self.epsilon, theta=theta_y)
        return self.scale * (cos + one_hot * ops.expand_dims(psi - cos_y, -1))

    def compute_output_spec(self, embeddings, labels=None, training=None):
        return keras.KerasTensor((embeddings.shape[0], self.num_classes), dtype=self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(
            num_classes=self.num_classes,
            margin_type=self.margin_type,
            margin=list(self.margin) if self.margin_type == "combined" else self.margin,
            scale=self.scale,
            fallback=self.fallback,
            sub_centers=self.sub_centers,
            epsilon=self.epsilon,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
        )
        return config
