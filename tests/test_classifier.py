import keras
import numpy as np
import pytest

from tfmargin.classifier import MarginClassifier


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    labels = np.arange(24) % 3
    images = rng.uniform(0, 60, (24, 64, 64, 3))
    for i, label in enumerate(labels):  # class = which third of the image is bright
        images[i, :, label * 21:(label + 1) * 21] += 180
    return images.astype("float32"), labels


def small_applications_backbone():
    return keras.applications.MobileNetV2(input_shape=(64, 64, 3), alpha=0.35,
                                          include_top=False, weights=None)


def test_fit_with_plain_labels_applies_the_margin_only_in_the_loss(data):
    images, labels = data
    keras.utils.set_random_seed(0)
    model = MarginClassifier(small_applications_backbone(), 3, margin=0.5, scale=8.0,
                             embedding_dim=16)
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(0.0), ce, metrics=["accuracy"])
    assert [i.name for i in model.inputs] == ["image"]  # no label input anywhere
    x, y = images[:8], labels[:8]
    # What the train step sees: BatchNorm on batch statistics (lr 0 changes no weight).
    cos = keras.ops.convert_to_numpy(model.head.cosine(model.embed(x, training=True)))
    theta = np.arccos(np.clip(cos[np.arange(8), y], -1 + 1e-7, 1 - 1e-7))
    margin = 8.0 * cos
    margin[np.arange(8), y] = 8.0 * np.cos(theta + 0.5)  # ArcFace; theta + m < pi here
    assert np.all(theta + 0.5 < np.pi)
    logs = model.train_on_batch(x, y, return_dict=True)
    assert logs["loss"] == pytest.approx(float(ce(y, margin)), rel=1e-4)
    assert logs["loss"] > float(ce(y, 8.0 * cos)) + 0.1  # not the plain cross-entropy


def test_trains_saves_and_reloads_with_identical_label_free_predictions(data, tmp_path):
    images, labels = data
    model = MarginClassifier(small_applications_backbone(), 3, margin=0.2, embedding_dim=16,
                             mean=images.reshape(-1, 3).mean(0), variance=images.reshape(
                                 -1, 3).var(0))
    model.compile(keras.optimizers.SGD(0.05, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(images, labels, batch_size=8, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert "theta_y_mean" in history.history  # the head's angle metric, from the loss path
    before = model.predict(images, verbose=0)
    path = tmp_path / "classifier.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, MarginClassifier) and loaded.head.m2 == 0.2
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), before)
    assert loaded.get_config()["mean"] == pytest.approx(list(images.reshape(-1, 3).mean(0)))
    # Compiled as saved (loss, accuracy and the angle metric, once), ready to evaluate.
    scores = loaded.evaluate(images, labels, verbose=0, return_dict=True)
    assert sorted(scores) == ["accuracy", "loss", "theta_y_mean", "theta_y_std"]
    assert scores["accuracy"] == pytest.approx(
        model.evaluate(images, labels, verbose=0, return_dict=True)["accuracy"])


def test_docstring_example_runs():
    import doctest

    import tfmargin.classifier

    result = doctest.testmod(tfmargin.classifier)
    assert result.attempted >= 5 and result.failed == 0


MIRRORED = r"""
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from tfmargin.classifier import MarginClassifier
# Seeded: unseeded, some starts train badly at this learning rate and the test flaked (CI,
# 2026-11-29); seeded, the run is the same on every try.
keras.utils.set_random_seed(0)
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
with strategy.scope():
    model = MarginClassifier("tinycnn", 3, margin=0.2, scale=8.0, embedding_dim=8)
    model.compile(keras.optimizers.SGD(0.05), metrics=["accuracy"])
rng = np.random.default_rng(0)
labels = np.arange(32) % 3
images = rng.uniform(0, 60, (32, 32, 32, 3)).astype("float32")
images[np.arange(32), :, :, labels] += 180  # class = the bright channel
history = model.fit(images, labels, batch_size=16, epochs=4, verbose=0)
print("REPLICAS", strategy.num_replicas_in_sync, "LOSS", history.history["loss"],
      "ACC", model.evaluate(images, labels, verbose=0, return_dict=True)["accuracy"])
"""


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="tf.distribute strategies are TensorFlow's")
def test_trains_under_mirrored_strategy_on_two_replicas():
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", MIRRORED], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPLICAS"))
    replicas, rest = line.split(" LOSS ")
    losses, accuracy = rest.split(" ACC ")
    assert replicas == "REPLICAS 2"
    losses = json.loads(losses)
    assert losses[-1] < losses[0] and float(accuracy) > 0.5


def test_soft_and_one_hot_targets_put_the_margin_on_the_dominant_class(data):
    images, labels = data
    model = MarginClassifier(small_applications_backbone(), 3, margin=0.4, scale=8.0,
                             embedding_dim=16)
    smoothed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    model.compile(keras.optimizers.SGD(0.0), smoothed)
    x, y = images[:8], labels[:8]
    soft = 0.7 * np.eye(3)[y] + 0.3 * np.eye(3)[(y + 1) % 3]  # MixUp-like, dominant y
    cos = keras.ops.convert_to_numpy(model.head.cosine(model.embed(x, training=True)))
    theta = np.arccos(np.clip(cos[np.arange(8), y], -1 + 1e-7, 1 - 1e-7))
    margin = 8.0 * cos
    margin[np.arange(8), y] = 8.0 * np.cos(theta + 0.4)
    logs = model.train_on_batch(x, soft.astype("float32"), return_dict=True)
    assert logs["loss"] == pytest.approx(float(smoothed(soft, margin)), rel=1e-4)


def test_recalibrated_batchnorm_holds_the_exact_mean_of_batch_statistics():
    keras.utils.set_random_seed(0)
    model = MarginClassifier("tinycnn", 3, embedding_dim=4)  # one BatchNorm: the neck's
    rng = np.random.default_rng(0)
    batches = [rng.uniform(0, 255, (5, 32, 32, 3)).astype("float32") for _ in range(3)]
    used = model.recalibrate_batchnorm(iter(batches), num_batches=2)
    assert used == 2
    projection = keras.Model(model.input, model.get_layer("projection").output)
    stats = [keras.ops.convert_to_numpy(projection(b)) for b in batches[:2]]
    bn = model.get_layer("embedding_bn")
    np.testing.assert_allclose(bn.moving_mean.numpy(), np.mean([s.mean(0) for s in stats], 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(bn.moving_variance.numpy(),
                               np.mean([s.var(0) for s in stats], 0), rtol=1e-4, atol=1e-6)
    assert bn.momentum == 0.9  # restored
    assert model.recalibrate_batchnorm(np.concatenate(batches), batch_size=5) == 3


README_SNIPPET_SCENARIO = r"""
import keras, numpy as np, tfmargin
keras.utils.set_random_seed(0)
rng = np.random.default_rng(0)
labels = np.arange(600) % 3
images = rng.uniform(0, 90, (600, 32, 32, 3)).astype("float32")
for i, label in enumerate(labels):  # class = the bright third
    images[i, :, label * 10:(label + 1) * 10] += 150
backbone = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                          weights=None)  # BatchNorm momentum 0.999
model = tfmargin.MarginClassifier(backbone, num_classes=3, margin=0.1, scale=8.0,
                                  mean=images.reshape(-1, 3).mean(0),
                                  variance=images.reshape(-1, 3).var(0))
model.compile(keras.optimizers.SGD(0.05, momentum=0.9), metrics=["accuracy"])
history = model.fit(images, labels, batch_size=32, epochs=4, verbose=0)
before = model.predict(images, verbose=0).argmax(1)
model.recalibrate_batchnorm(images)
after = model.predict(images, verbose=0).argmax(1)
print("RESULT", history.history["accuracy"][-1], len(set(before.tolist())),
      float((before == labels).mean()), float((after == labels).mean()))
"""


@pytest.mark.slow
@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="one backend is enough")
def test_readme_snippet_after_a_short_fit_predicts_soundly_once_recalibrated():
    """The README's own use: keras.applications MobileNetV2 (momentum 0.999), a short fit.
    Its moving statistics are still near their start, so inference collapses; after
    ``recalibrate_batchnorm`` it predicts what it learned."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", README_SNIPPET_SCENARIO], capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    train_accuracy, classes_before, before, after = map(
        float, done.stdout.split("RESULT", 1)[1].split())
    assert train_accuracy > 0.9
    assert before < 0.6  # the collapse the README used to hide
    assert after >= 0.9 and after > before + 0.3


def test_fit_takes_integer_labels_and_one_hot_targets_alike():
    """The default loss reads the target's shape: one-hot targets give the loss integer
    labels give (the README's promise)."""
    from tfmargin.classifier import CrossEntropy

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3)).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2])
    loss = CrossEntropy()
    expected = -np.log(np.exp(logits)[np.arange(6), labels] / np.exp(logits).sum(1)).mean()
    for targets in (labels, labels[:, None], np.eye(3, dtype="float32")[labels]):
        assert float(loss(targets, logits)) == pytest.approx(expected, rel=1e-5)
    model = MarginClassifier("tinycnn", 3, embedding_dim=4)
    model.compile("sgd")
    images = rng.uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    history = model.fit(images, np.eye(3, dtype="float32")[labels], epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_an_airbench_model_must_be_adapted_before_it_trains():
    model = MarginClassifier("airbench93", 3, embedding_dim=0)
    model.compile("sgd")
    images = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    with pytest.raises(ValueError, match=r"have no whitening filters yet; call "
                                         r"model.adapt\(training_images\) before fit"):
        model.fit(images, labels, epochs=1, verbose=0)
    assert model.adapt(images) == 1
    model.fit(images, labels, epochs=1, verbose=0)
    assert MarginClassifier("tinycnn", 3).adapt(images) == 0
