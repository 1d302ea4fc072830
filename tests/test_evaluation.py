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


def test_far_away_images_are_the_same_for_every_run_and_a_folder_is_read_resized(tmp_path):
    from PIL import Image

    from tfmargin.runner.far_images import SYNTHETIC_SIZE, far_image_sets

    folder = tmp_path / "clothes"
    folder.mkdir()
    Image.new("L", (28, 28), 9).save(folder / "a.png")  # grey: read as RGB
    Image.new("RGB", (64, 64), (255, 0, 0)).save(folder / "b.png")
    (folder / "notes.txt").write_text("not an image")
    sets = far_image_sets(32, [str(folder)])
    assert list(sets) == ["flat", "noise", "digits", "clothes"]
    for name, images in far_image_sets(32).items():
        np.testing.assert_array_equal(sets[name], images)  # a fixed seed
    assert {name: images.shape for name, images in sets.items()} == {
        "flat": (SYNTHETIC_SIZE, 32, 32, 3), "noise": (SYNTHETIC_SIZE, 32, 32, 3),
        "digits": (SYNTHETIC_SIZE, 32, 32, 3), "clothes": (2, 32, 32, 3)}
    flat = sets["flat"].reshape(SYNTHETIC_SIZE, -1, 3)
    assert np.all(flat == flat[:, :1])  # one colour per image
    digits = sets["digits"].astype(int)
    assert np.all(digits[..., 0] == digits[..., 2])  # grey
    ink = np.mean(np.abs(digits[..., 0] - np.median(digits[..., 0], axis=(1, 2),
                                                     keepdims=True)) > 40, axis=(1, 2))
    assert np.all((ink > 0.03) & (ink < 0.5))  # a glyph on each, not a blank or a blot
    assert sets["clothes"][0, 5, 5].tolist() == [9, 9, 9]
    assert sets["clothes"][1, 5, 5].tolist() == [255, 0, 0]


def test_far_away_auroc_and_rejection_against_a_count_of_pairs():
    """Per far-away set, the AUROC of a score is the share of (known, far) pairs the known
    image wins (ties half), and the rejected share is the far images below the threshold."""
    from tfmargin.runner.evaluation import far_away

    rng = np.random.default_rng(0)
    known, far = rng.normal(1.0, 1.0, (40, 3)), rng.normal(0.0, 1.0, (30, 3))
    far[:3] = known[:3]  # ties
    outputs = {"logits": known.astype(np.float16), "labels": np.zeros(40, np.int32),
               "embedding_norm": rng.uniform(1, 2, 40).astype(np.float32),
               "knn": rng.uniform(size=(40, 5)).astype(np.float16),
               "far_logits": far.astype(np.float16),
               "far_embedding_norm": rng.uniform(1, 2, 30).astype(np.float32),
               "far_knn": rng.uniform(size=(30, 5)).astype(np.float16),
               "far_set": np.array([0] * 10 + [1] * 20, np.int8),
               "far_set_names": np.array(["flat", "digits"])}
    result = far_away(outputs, reject={"score": "max_logit", "threshold": 0.8})
    known_max = outputs["logits"].astype(np.float64).max(axis=1)
    for index, name in enumerate(["flat", "digits"]):
        far_max = outputs["far_logits"].astype(np.float64).max(axis=1)[
            outputs["far_set"] == index]
        wins = known_max[:, None] > far_max[None, :]
        ties = known_max[:, None] == far_max[None, :]
        assert result[name]["size"] == len(far_max)
        assert result[name]["auroc"]["max_logit"] == pytest.approx(
            np.mean(wins) + 0.5 * np.mean(ties))
        assert result[name]["rejected"] == pytest.approx(np.mean(far_max < 0.8))
    assert set(result["flat"]["auroc"]) >= {"max_logit", "msp", "energy", "feature_norm",
                                            "knn"}
