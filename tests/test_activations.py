"""FusedGELU against the exact GELU from math.erf, on every backend; its TensorFlow gradient
against central differences of that reference."""

import math

import keras
import numpy as np
import pytest

from tfmargin.activations import FusedGELU, fused_gelu


def exact_gelu(x):
    """x * Phi(x), Phi from math.erf, per element in float64."""
    return x * 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


X = np.linspace(-6.0, 6.0, 241)


def test_forward_is_exact_gelu_and_keeps_bfloat16():
    y = keras.ops.convert_to_numpy(FusedGELU()(keras.ops.convert_to_tensor(X, "float32")))
    np.testing.assert_allclose(y, exact_gelu(X), atol=2e-6)
    inputs = keras.ops.cast(keras.ops.convert_to_tensor(X), "bfloat16")
    half = fused_gelu(inputs)
    assert keras.backend.standardize_dtype(half.dtype) == "bfloat16"
    # Of the bfloat16 inputs, computed in float32 and rounded once: within half a bfloat16
    # ulp (at most 2^-8 relative: 8 significant bits) of the exact value.
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(inputs, "float32")).astype(float)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(half, "float32")),
                               exact_gelu(rounded), rtol=2.0 ** -8, atol=1e-6)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the hand-written derivative is the TensorFlow path's")
def test_tensorflow_gradient_is_the_derivative_of_exact_gelu():
    import tensorflow as tf

    tensor = tf.constant(X, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(tensor)
        y = fused_gelu(tensor)
    h = 1e-5
    np.testing.assert_allclose(tape.gradient(y, tensor).numpy(),
                               (exact_gelu(X + h) - exact_gelu(X - h)) / (2 * h), atol=2e-5)
    half = tf.cast(tensor, tf.bfloat16)
    with tf.GradientTape() as tape:
        tape.watch(half)
        y = fused_gelu(half)
    assert y.dtype == tf.bfloat16 and tape.gradient(y, half).dtype == tf.bfloat16


def test_layer_config_round_trip_and_mixed_policy():
    layer = FusedGELU(name="act", dtype="mixed_bfloat16")
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is FusedGELU and clone.name == "act"
    out = clone(keras.ops.ones((2, 3)))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def test_docstring_example_runs():
    import doctest

    import tfmargin.activations

    result = doctest.testmod(tfmargin.activations)
    assert result.attempted >= 2 and result.failed == 0
