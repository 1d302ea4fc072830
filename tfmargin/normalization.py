"""BatchNorm as one TensorFlow op each way in training.

Keras 3's ``BatchNormalization`` computes its batch statistics and the normalisation as
separate ops (mean, squared difference, multiply, add, and under ``mixed_bfloat16`` a cast to
float32 and back around them), and its gradient as a dozen more. On the 2-core CPUs
measured here that made BatchNorm the largest cost of the airbench step after the
convolutions (``docs/performance.md``). ``FusedBatchNormalization`` computes the same
training-mode normalisation with TensorFlow's ``FusedBatchNormV3`` (one oneDNN kernel
forward, one backward, bfloat16 in and out with float32 statistics) and otherwise is
Keras's layer.
"""

import keras
from keras import layers

# FusedBatchNormV3 refuses a smaller epsilon (cuDNN's floor, kept on every device).
FUSED_EPSILON_FLOOR = 1.001e-5


@keras.saving.register_keras_serializable(package="tfmargin")
class FusedBatchNormalization(layers.BatchNormalization):
    """``keras.layers.BatchNormalization`` whose training step is one fused op each way.

    ``y = gamma * (x - mean_B) / sqrt(var_B + epsilon) + beta``, ``mean_B`` and ``var_B``
    the biased statistics of the batch over every axis but the last; the moving statistics
    are updated as Keras updates them, ``moving = momentum * moving + (1 - momentum) * stat``
    with the biased variance. In inference, and on every backend but TensorFlow, it is
    Keras's layer unchanged.

    Args:
        epsilon: float, raised to ``FUSED_EPSILON_FLOOR`` (1.001e-5) where smaller, in
            training and inference alike, since the fused op refuses less. This is the
            one difference from Keras's layer (airbench asks for 1e-12).
        **kwargs: the arguments of ``keras.layers.BatchNormalization``. The fused path is
            taken for a 4-D input normalised over its last axis, without a mask, renorm or
            synchronisation; anything else is Keras's computation.

    Call arguments:
        inputs: a tensor, channels last.
        training: bool, batch statistics (and a moving-statistics update) when true.

    Example:
    >>> norm = FusedBatchNormalization(scale=False)
    >>> y = norm(keras.ops.ones((2, 4, 4, 3)), training=True)
    >>> tuple(y.shape), float(keras.ops.max(keras.ops.abs(y)))
    ((2, 4, 4, 3), 0.0)

    References:
        Ioffe and Szegedy, "Batch Normalization", ICML 2015 (arXiv:1502.03167).
    """

    def __init__(self, epsilon=1e-3, **kwargs):
        super().__init__(epsilon=max(float(epsilon), FUSED_EPSILON_FLOOR), **kwargs)

    def _fused(self, inputs, training, mask):
        return (training is True and mask is None and not self.synchronized
                and not getattr(self, "renorm", False) and len(inputs.shape) == 4
                and self.axis in (-1, 3) and keras.backend.backend() == "tensorflow")

    def call(self, inputs, training=None, mask=None):
        if not self._fused(inputs, training, mask):
            return super().call(inputs, training=training, mask=mask)
        import tensorflow as tf

        beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros(
            inputs.shape[-1], tf.float32)
        gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones_like(beta)
        outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            inputs, gamma, beta, epsilon=self.epsilon, is_training=True)
        # The op returns the unbiased (Bessel-corrected) variance; Keras averages the biased.
        count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
        variance = variance * (count - 1.0) / count
        for moving, statistic in ((self.moving_mean, mean), (self.moving_variance, variance)):
            moving.assign(moving * self.momentum
                          + tf.cast(statistic, moving.dtype) * (1.0 - self.momentum))
        return outputs


# The layer of each ``batchnorm`` of ``tfmargin.names.BATCHNORMS``.
BATCHNORM_LAYERS = {"keras": layers.BatchNormalization, "fused": FusedBatchNormalization}
