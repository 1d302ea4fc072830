"""FusedBatchNormalization against a per-sample NumPy BatchNorm (float64), on every backend
(on TensorFlow its training step is FusedBatchNormV3, elsewhere Keras's layer); its
TensorFlow gradient against the closed-form BatchNorm gradient; the backbones' swap."""

import keras
import numpy as np
import pytest

from tfmargin.backbones import build_backbone
from tfmargin.normalization import FUSED_EPSILON_FLOOR, FusedBatchNormalization

RNG = np.random.default_rng(0)
X = RNG.normal(2.0, 3.0, size=(4, 5, 5, 3))
GAMMA, BETA = np.array([0.5, 1.5, -2.0]), np.array([0.1, -0.3, 2.0])
MOMENTUM, EPSILON = 0.6, 1e-3


def batch_statistics(x):
    """Per channel, the mean and the biased variance of every value in the batch, summed
    one value at a time."""
    values = [[] for _ in range(x.shape[-1])]
    for index in np.ndindex(x.shape[:-1]):
        for channel in range(x.shape[-1]):
            values[channel].append(float(x[index + (channel,)]))
    mean = np.array([sum(v) / len(v) for v in values])
    variance = np.array([sum((value - m) ** 2 for value in v) / len(v)
                         for v, m in zip(values, mean, strict=True)])
    return mean, variance


def reference_forward(x, mean, variance, epsilon):
    """gamma * (x - mean) / sqrt(variance + epsilon) + beta, element by element."""
    out = np.empty_like(x)
    for index in np.ndindex(x.shape):
        channel = index[-1]
        out[index] = (GAMMA[channel] * (x[index] - mean[channel])
                      / np.sqrt(variance[channel] + epsilon) + BETA[channel])
    return out


def make_layer(shape=X.shape, **kwargs):
    layer = FusedBatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, **kwargs)
    layer.build(shape)
    layer.gamma.assign(GAMMA)
    layer.beta.assign(BETA)
    return layer


def test_training_step_normalises_with_batch_statistics_and_updates_moving_ones():
    layer = make_layer()
    y = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(X, "float32"),
                                         training=True))
    mean, variance = batch_statistics(X)
    np.testing.assert_allclose(y, reference_forward(X, mean, variance, EPSILON), atol=2e-5)
    # Moving statistics start at 0 and 1; one step: momentum * old + (1 - momentum) * batch,
    # with the biased variance (the fused op returns the unbiased one, corrected).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean),
                               (1 - MOMENTUM) * mean, rtol=1e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_variance),
                               MOMENTUM + (1 - MOMENTUM) * variance, rtol=1e-5)


def test_inference_uses_the_moving_statistics():
    layer = make_layer()
    layer.moving_mean.assign([1.0, -1.0, 0.0])
    layer.moving_variance.assign([4.0, 0.25, 9.0])
    y = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(X, "float32"),
                                         training=False))
    np.testing.assert_allclose(
        y, reference_forward(X, np.array([1.0, -1.0, 0.0]), np.array([4.0, 0.25, 9.0]),
                             EPSILON), atol=2e-5)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean), [1.0, -1.0, 0.0])


def test_a_two_dimensional_input_takes_keras_path_with_the_same_result():
    flat = X.reshape(-1, 3)
    layer = make_layer(flat.shape)
    y = keras.ops.convert_to_numpy(layer(keras.ops.convert_to_tensor(flat, "float32"),
                                         training=True))
    mean, variance = batch_statistics(flat)
    np.testing.assert_allclose(y, reference_forward(flat, mean, variance, EPSILON), atol=2e-5)


def test_bfloat16_inputs_stay_bfloat16_with_float32_statistics():
    layer = FusedBatchNormalization(momentum=MOMENTUM, epsilon=EPSILON, dtype="mixed_bfloat16")
    layer.build(X.shape)
    layer.gamma.assign(GAMMA)
    layer.beta.assign(BETA)
    inputs = keras.ops.cast(keras.ops.convert_to_tensor(X, "float32"), "bfloat16")
    y = layer(inputs, training=True)
    assert keras.backend.standardize_dtype(y.dtype) == "bfloat16"
    assert keras.backend.standardize_dtype(layer.moving_mean.dtype) == "float32"
    rounded = keras.ops.convert_to_numpy(keras.ops.cast(inputs, "float32")).astype(float)
    mean, variance = batch_statistics(rounded)
    expected = reference_forward(rounded, mean, variance, EPSILON)
    # One rounding of the output to bfloat16: 2^-8 relative, plus the absolute error of the
    # largest values' rounding (|y| up to ~6 here).
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(y, "float32")),
                               expected, rtol=2.0 ** -8, atol=3e-2)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.moving_mean),
                               (1 - MOMENTUM) * mean, rtol=1e-4)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the fused training path is TensorFlow's")
def test_tensorflow_gradient_is_the_closed_form_batchnorm_gradient():
    import tensorflow as tf

    layer = make_layer()
    x = tf.constant(X, tf.float32)
    upstream = RNG.normal(size=X.shape)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = tf.reduce_sum(layer(x, training=True) * tf.constant(upstream, tf.float32))
    dx, dgamma, dbeta = tape.gradient(loss, [x, layer.gamma, layer.beta])
    # x_hat = (x - mean) / sqrt(var + eps); dL/dx = gamma / sqrt(var + eps) * (dy - mean(dy)
    # - x_hat * mean(dy * x_hat)), means per channel over the batch (Ioffe and Szegedy, 2015).
    mean, variance = batch_statistics(X)
    inverse = 1.0 / np.sqrt(variance + EPSILON)
    x_hat = (X - mean) * inverse
    axes = (0, 1, 2)
    expected_dx = GAMMA * inverse * (upstream - upstream.mean(axes)
                                     - x_hat * (upstream * x_hat).mean(axes))
    np.testing.assert_allclose(dx.numpy(), expected_dx, atol=2e-5)
    np.testing.assert_allclose(dgamma.numpy(), (upstream * x_hat).sum(axes), rtol=1e-4)
    np.testing.assert_allclose(dbeta.numpy(), upstream.sum(axes), rtol=1e-5)


def test_epsilon_is_raised_to_the_fused_floor_and_survives_a_config_round_trip():
    layer = FusedBatchNormalization(epsilon=1e-12, scale=False, momentum=0.6, name="bn")
    assert layer.epsilon == FUSED_EPSILON_FLOOR
    assert FusedBatchNormalization(epsilon=1e-3).epsilon == 1e-3
    clone = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert type(clone) is FusedBatchNormalization
    assert (clone.epsilon, clone.scale, clone.momentum, clone.name) == (
        FUSED_EPSILON_FLOOR, False, 0.6, "bn")


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnetb0", "airbench93"])
def test_backbones_swap_every_batchnorm_and_keep_their_parameters(name):
    if keras.backend.backend() != "tensorflow" and name != "resnet18":
        pytest.skip("the swap is the same Keras code on every backend: one backbone is enough")
    stock, fused = build_backbone(name), build_backbone(name, batchnorm="fused")
    norms = [layer for layer in stock.layers if isinstance(layer, keras.layers.BatchNormalization)]
    swapped = [layer for layer in fused.layers if isinstance(layer, FusedBatchNormalization)]
    assert norms and not any(isinstance(layer, FusedBatchNormalization) for layer in norms)
    assert [layer.name for layer in swapped] == [layer.name for layer in norms]
    assert fused.count_params() == stock.count_params()
    assert [layer.momentum for layer in swapped] == [layer.momentum for layer in norms]


def test_a_fused_backbone_matches_keras_in_inference_and_reloads(tmp_path):
    stock, fused = build_backbone("resnet18"), build_backbone("resnet18", batchnorm="fused")
    fused.set_weights(stock.get_weights())
    images = RNG.normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(fused.predict(images, verbose=0),
                               stock.predict(images, verbose=0), rtol=1e-4, atol=1e-4)
    fused.save(tmp_path / "fused.keras")
    reloaded = keras.saving.load_model(tmp_path / "fused.keras")
    assert isinstance(reloaded.get_layer("stem_bn"), FusedBatchNormalization)
    np.testing.assert_array_equal(reloaded.predict(images, verbose=0),
                                  fused.predict(images, verbose=0))


def test_unknown_or_misplaced_batchnorm_is_refused_with_the_choices():
    with pytest.raises(ValueError, match="Unknown batchnorm 'sync'; choose one of keras, fused"):
        build_backbone("resnet18", batchnorm="sync")
    with pytest.raises(ValueError, match="batchnorm='fused' needs a backbone built with "
                                         "BatchNorm .*; tinycnn has none"):
        build_backbone("tinycnn", batchnorm="fused")


def test_docstring_example_runs():
    import doctest

    import tfmargin.normalization

    result = doctest.testmod(tfmargin.normalization)
    assert result.attempted >= 2 and result.failed == 0
