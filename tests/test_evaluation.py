"""After training: the inference model's accuracy on a split, predictions paired with
labels, and the BatchNorm statistics chosen on validation."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")


PAIRING = r"""
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from tfmargin.classifier import MarginClassifier
from tfmargin.runner.evaluation import predict_split, prediction_step
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = MarginClassifier("tinycnn", 10, margin_type="softmax", embedding_dim=0)
labels = np.arange(50) % 10
images = np.zeros((50, 32, 32, 3), np.uint8) + (labels * 20)[:, None, None, None].astype(np.uint8)
split = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(
    50, seed=1, reshuffle_each_iteration=False)
got = predict_split(prediction_step(model.logits_and_embeddings()), split, 8)  # 7 batches
again = model.predict(np.stack([x for x, _ in split]).astype("float32"), verbose=0)
print("PAIRED", np.allclose(got["logits"], again, atol=1e-5),
      got["labels"].tolist() == [int(y) for _, y in split])
"""


def test_predictions_stay_paired_with_their_labels_over_many_batches():
    done = subprocess.run([sys.executable, "-c", PAIRING], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "PAIRED True True", done.stdout


def test_layers_of_finds_layers_inside_nested_models():
    import keras

    from tfmargin.classifier import layers_of

    inputs = keras.Input((4,))
    inner = keras.Model(inputs, keras.layers.BatchNormalization(name="inner_bn")(
        keras.layers.Dense(3, name="inner_dense")(inputs)), name="inner")
    outer_inputs = keras.Input((4,))
    outputs = keras.layers.BatchNormalization(name="outer_bn")(inner(outer_inputs))
    outer = keras.Model(outer_inputs, keras.layers.Dense(2, name="outer_dense")(outputs))
    assert [layer.name for layer in layers_of(outer, keras.layers.BatchNormalization)] == [
        "inner_bn", "outer_bn"]
    assert [layer.name for layer in layers_of(outer, keras.layers.Dense)] == [
        "inner_dense", "outer_dense"]


def small_split(num=24, seed=0):
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    labels = np.arange(num) % 3
    images = rng.integers(0, 90, (num, 32, 32, 3)).astype("uint8")
    for i, label in enumerate(labels):  # class = the bright third
        images[i, :, label * 10:(label + 1) * 10] += 150
    return tf.data.Dataset.from_tensor_slices((images, labels))


def test_split_top1_is_the_accuracy_of_the_inference_logits():
    import keras

    from tfmargin.classifier import MarginClassifier
    from tfmargin.runner.evaluation import split_top1

    keras.utils.set_random_seed(0)
    model = MarginClassifier("tinycnn", 3, embedding_dim=4, scale=8.0)
    split = small_split()
    images, labels = (np.stack(c) for c in zip(*split.as_numpy_iterator(), strict=True))
    expected = np.mean(np.argmax(model.predict(images.astype("float32"), verbose=0), 1)
                       == labels)
    assert split_top1(model, split, batch_size=7) == pytest.approx(expected)


@pytest.mark.parametrize("moving_top1,recalibrated_top1,chosen", [
    (0.40, 0.90, "recalibrated"), (0.80, 0.70, "moving"), (0.50, 0.50, "moving")])
def test_batchnorm_statistics_are_chosen_on_validation(monkeypatch, moving_top1,
                                                       recalibrated_top1, chosen):
    """The higher validation top-1 wins (a tie keeps the moving averages); the losing
    statistics are not left behind in the model."""
    import types

    import keras

    from tfmargin.classifier import MarginClassifier
    from tfmargin.runner import train

    keras.utils.set_random_seed(0)
    model = MarginClassifier("tinycnn", 3, embedding_dim=4, scale=8.0)
    bn = model.get_layer("embedding_bn")
    before = bn.moving_mean.numpy().copy(), bn.moving_variance.numpy().copy()
    seen = []

    def fake_top1(model_, split, batch_size):
        seen.append((bn.moving_mean.numpy().copy(), batch_size))
        return (moving_top1, recalibrated_top1)[len(seen) - 1]

    monkeypatch.setattr(train, "split_top1", fake_top1)
    data = types.SimpleNamespace(train=small_split(), val=small_split(9, seed=1))
    record = train.choose_batchnorm_statistics(model, data, global_batch=8, num_batches=2)
    assert record == {"recalibration_batches": 2, "chosen": chosen, "chosen_on": "validation",
                      "val_top1": {"moving": moving_top1, "recalibrated": recalibrated_top1}}
    np.testing.assert_array_equal(seen[0][0], before[0])  # measured before recalibrating
    assert not np.allclose(seen[1][0], before[0]) and seen[1][1] == 8
    kept = seen[1][0] if chosen == "recalibrated" else before[0]
    np.testing.assert_array_equal(bn.moving_mean.numpy(), kept)
    if chosen == "moving":
        np.testing.assert_array_equal(bn.moving_variance.numpy(), before[1])


def test_batchnorm_without_validation_is_recalibrated_unchosen_and_zero_batches_is_off():
    import types

    import keras

    from tfmargin.classifier import MarginClassifier
    from tfmargin.runner import train

    keras.utils.set_random_seed(0)
    model = MarginClassifier("tinycnn", 3, embedding_dim=4, scale=8.0)
    bn = model.get_layer("embedding_bn")
    before = bn.moving_mean.numpy().copy()
    data = types.SimpleNamespace(train=small_split(), val=None)
    assert train.choose_batchnorm_statistics(model, data, global_batch=8,
                                             num_batches=0) is None
    np.testing.assert_array_equal(bn.moving_mean.numpy(), before)
    record = train.choose_batchnorm_statistics(model, data, global_batch=8, num_batches=3)
    assert record == {"recalibration_batches": 3, "chosen": "recalibrated", "chosen_on": None}
    assert not np.allclose(bn.moving_mean.numpy(), before)
