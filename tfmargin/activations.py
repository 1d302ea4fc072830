"""GELU computed in float32 and, on TensorFlow, fused into one kernel each way.

Under ``mixed_bfloat16`` Keras's GELU evaluates ``erf`` and each element-wise op of the
function and of its gradient as its own TensorFlow op, in bfloat16, one pass over memory
each; on the CPUs measured here that made GELU the airbench network's slowest layer
(``docs/performance.md``). ``FusedGELU`` computes the same exact GELU in float32 and, on the
TensorFlow backend, compiles the forward and the backward into one XLA loop each.
"""

import functools
import math

import keras
from keras import layers, ops

SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@functools.cache
def _tensorflow_gelu():
    """The TensorFlow op: a ``tf.custom_gradient`` over two XLA-compiled functions (built
    on first use, so importing this module does not import TensorFlow)."""
    import tensorflow as tf

    @tf.function(jit_compile=True)
    def forward(x):
        x32 = tf.cast(x, tf.float32)
        return tf.cast(0.5 * x32 * (1.0 + tf.math.erf(x32 * SQRT_HALF)), x.dtype)

    @tf.function(jit_compile=True)
    def backward(x, dy):
        x32 = tf.cast(x, tf.float32)
        cdf = 0.5 * (1.0 + tf.math.erf(x32 * SQRT_HALF))
        pdf = INV_SQRT_2PI * tf.exp(-0.5 * x32 * x32)
        return tf.cast(tf.cast(dy, tf.float32) * (cdf + x32 * pdf), dy.dtype)

    @tf.custom_gradient
    def gelu(x):
        return forward(x), lambda dy: backward(x, dy)

    return gelu


def fused_gelu(x):
    """Exact GELU ``x * Phi(x)`` (``Phi`` the standard normal CDF) in float32, returned in
    ``x``'s dtype. TensorFlow: one XLA-compiled loop forward and one backward, the
    derivative ``Phi(x) + x * phi(x)``. Other backends: ``keras.ops.gelu`` in float32, which
    their compilers fuse themselves."""
    if keras.backend.backend() == "tensorflow":
        return _tensorflow_gelu()(x)
    return ops.cast(ops.gelu(ops.cast(x, "float32"), approximate=False), x.dtype)


@keras.saving.register_keras_serializable(package="tfmargin")
class FusedGELU(layers.Layer):
    """Exact GELU, computed in float32, fused into one kernel each way on TensorFlow.

    ``y = x * Phi(x) = x / 2 * (1 + erf(x / sqrt(2)))``, the same function as
    ``keras.layers.Activation("gelu")``; under a mixed policy the input and output stay in
    the compute dtype (bfloat16) and only the arithmetic is float32.

    Example:
    >>> layer = FusedGELU()
    >>> [round(float(v), 4) for v in layer(ops.convert_to_tensor([-1.0, 0.0, 2.0]))]
    [-0.1587, 0.0, 1.9545]

    References:
        Hendrycks and Gimpel, "Gaussian Error Linear Units (GELUs)", arXiv:1606.08415.
    """

    def call(self, inputs):
        return fused_gelu(inputs)

    def compute_output_shape(self, input_shape):
        return input_shape
