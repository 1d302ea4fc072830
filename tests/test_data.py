import os
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from synthetic import write_image_folder

from tfmargin.data import DatasetError, load_dataset, resize_image
from tfmargin.pipeline import build_augmenter, epoch_permutations, make_pipeline


def labels_of(split):
    return sorted(int(y) for _, y in split)


def test_image_folder_with_train_and_test_holds_out_validation_from_train(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=3, per_class=10, test_per_class=2)
    data = load_dataset(root, val_split=0.2)
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert data.sizes == {"train": 24, "val": 6, "test": 6}
    images, labels = next(iter(data.test.batch(6)))
    assert images.dtype.name == "uint8" and tuple(images.shape) == (6, 32, 32, 3)
    assert sorted(labels.numpy().tolist()) == [0, 0, 1, 1, 2, 2]
    assert labels_of(data.val) == [0, 0, 1, 1, 2, 2]  # stratified
    train_pixels = {x.numpy().tobytes() for x, _ in data.train}
    assert not train_pixels & {x.numpy().tobytes() for x, _ in data.val}


def test_flat_jpeg_folder_gets_stratified_test_and_validation_splits(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=20, fmt="jpg", size=40)
    data = load_dataset(root, val_split=0.25, test_split=0.2)
    assert data.sizes == {"train": 24, "val": 8, "test": 8}
    assert labels_of(data.test) == [0] * 4 + [1] * 4
    assert labels_of(data.val) == [0] * 4 + [1] * 4
    image, _ = next(iter(data.train))
    assert tuple(image.shape) == (32, 32, 3)  # resized from 40x40


def test_every_epoch_is_one_permutation_and_epochs_differ():
    split = tf.data.Dataset.from_tensor_slices((tf.zeros((10, 1)), tf.range(10))).cache()
    batches = iter(epoch_permutations(split, batch_size=3, epochs=4, seed=5))
    epochs = [np.concatenate([next(batches)[1].numpy() for _ in range(3)]) for _ in range(4)]
    for order in epochs:  # 3 batches of 3: 9 distinct images, one dropped per epoch
        assert len(set(order.tolist())) == 9
    assert len({tuple(order) for order in epochs}) == 4
    with pytest.raises(StopIteration):  # exactly 4 epochs of 3 steps
        next(batches)
    again = iter(epoch_permutations(split, batch_size=3, epochs=4, seed=5))
    np.testing.assert_array_equal(next(again)[1], epochs[0][:3])  # a seed fixes the order


SAME_ORDER_DISTRIBUTED = r"""
import tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)
tf.random.set_seed(0)
from tfmargin.pipeline import epoch_permutations
split = tf.data.Dataset.from_tensor_slices((tf.zeros((10, 1)), tf.range(10))).cache()
plain = iter(epoch_permutations(split, 4, 3, seed=0))
plain = [next(plain)[1].numpy().tolist() for _ in range(6)]
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
distributed = strategy.experimental_distribute_dataset(epoch_permutations(split, 4, 3, seed=0))
iter(distributed)  # fit opens one iterator to build the model: it must not shift the order
shared = iter(distributed)
shared = [sum((v.numpy().tolist() for v in strategy.experimental_local_results(next(shared)[1])),
              []) for _ in range(6)]
print(plain == shared, plain)
"""


def test_mirrored_strategy_sees_the_same_epoch_order_as_one_device():
    done = subprocess.run([sys.executable, "-c", SAME_ORDER_DISTRIBUTED], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("True"), done.stdout


def test_augmentation_layers_draw_independently():
    """Shared seeds made the first batch's flip decision equal the sign of its shift."""
    x = np.arange(32, dtype="float32")
    ramps = np.stack([np.broadcast_to(x, (32, 32)), np.broadcast_to(x[:, None], (32, 32)),
                      np.zeros((32, 32))], axis=-1)
    images = np.repeat(ramps[None] + 1.0, 64, axis=0)  # +1: fill (0) differs from content
    out = build_augmenter("standard", 32, seed=0)(images, training=True).numpy()
    flipped = out[:, 16, 20, 0] < out[:, 16, 10, 0]
    shift = 21.0 - out[:, 20, 16, 1]  # rows the vertical ramp moved
    combinations = {(bool(f), int(np.sign(d))) for f, d in zip(flipped, shift, strict=True)
                    if d != 0}
    # One shared seed gave only [(False, 1), (True, -1)]: flip decided by the shift's sign.
    assert combinations == {(False, -1), (False, 1), (True, -1), (True, 1)}


def test_one_decode_for_folders_and_tfds(tmp_path):
    """Folders and TFDS resize with the same function (the export's too, in test_export)."""
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=4, size=40)
    data = load_dataset(root, val_split=0.25, test_split=0.25)
    loaded = {x.numpy().tobytes() for split in (data.train, data.val, data.test)
              for x, _ in split}
    for name in sorted(os.listdir(os.path.join(root, "class_0"))):
        pixels = tf.io.decode_png(tf.io.read_file(os.path.join(root, "class_0", name)))
        assert resize_image(pixels, 32).numpy().tobytes() in loaded
    with tfds.testing.mock_data(num_examples=6), mock.patch("tfmargin.data._check_reachable"):
        raw = [x for x, _ in tfds.load("cifar10", split="test", as_supervised=True)]
        data = load_dataset("cifar10", image_size=48, limit_train=2, val_split=0.5)
        resized = [x for x, _ in data.test]
    assert resized[0].shape == (48, 48, 3) and resized[0].dtype == tf.uint8
    for got, pixels in zip(resized, raw, strict=True):
        np.testing.assert_array_equal(got, resize_image(pixels, 48))


def test_pipeline_batches_augments_and_yields_images_and_labels(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=8, test_per_class=2)
    data = load_dataset(root)
    ds = make_pipeline(data.train, batch_size=4, training=True, seed=1)
    assert sum(1 for _ in ds) == 3  # one epoch: 14 images (2 held out for validation) // 4
    images, labels = next(iter(ds))
    assert images.shape == (4, 32, 32, 3) and images.dtype.name == "float32"
    assert labels.shape == (4,) and set(labels.numpy().tolist()) <= {0, 1}
    assert float(images.numpy().max()) <= 255.0
    plain = make_pipeline(data.test, batch_size=4, training=False)
    x, _ = next(iter(plain))
    assert x.shape == (4, 32, 32, 3)


def test_corrupt_jpeg_is_named(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=4, fmt="jpg")
    bad = os.path.join(root, "class_1", "0002.jpg")
    with open(bad, "r+b") as f:
        data = f.read()
        f.seek(0)
        f.write(data[:60])
        f.truncate()
    with pytest.raises(DatasetError, match="0002.jpg' is corrupt, truncated or not an image"):
        load_dataset(root)


def test_folder_with_one_class_or_none_is_refused(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=1, per_class=4)
    with pytest.raises(DatasetError, match="has 1 class folder\\(s\\) with images; a classifier"
                                           " needs at least 2"):
        load_dataset(root)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(DatasetError, match="has 0 class folder"):
        load_dataset(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(str(tmp_path / "missing") + "/")


@pytest.mark.parametrize("name", ["cifar10", "tfds:cifar10", "tfds:cifar100"])
def test_tfds_path_with_mock_data(name):
    # mock_data replaces the download and the files; only our network probe is left.
    with tfds.testing.mock_data(num_examples=20), mock.patch("tfmargin.data._check_reachable"):
        data = load_dataset(name, limit_train=8, val_split=0.2)
    classes = 100 if name.endswith("100") else 10
    assert data.num_classes == classes and len(data.class_names) == classes
    assert data.sizes == {"train": 8, "val": 4, "test": 20}
    image, label = next(iter(data.train))
    assert image.dtype.name == "uint8" and tuple(image.shape) == (32, 32, 3)
    assert 0 <= int(label) < classes


def test_tfds_offline_names_the_archive_and_where_to_place_it(tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    # No request leaves the machine: our probe and TFDS's downloads both fail here.
    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", offline), \
            mock.patch.object(tfds.download.DownloadManager, "download", offline), \
            mock.patch("tfmargin.data._check_reachable", offline):
        with pytest.raises(DatasetError) as error:
            load_dataset("cifar10", data_dir=str(tmp_path))
    message = str(error.value)
    assert "Cannot download 'cifar10' (ConnectionError)" in message
    manual = os.path.join(str(tmp_path), "downloads", "manual")
    assert f"Place cifar-10-binary.tar.gz (from https://www.cs.toronto.edu/~kriz/" \
           f"cifar-10-binary.tar.gz) in {manual}" in message and "--dataset <folder>" in message
    assert "\n" not in message


@pytest.mark.parametrize("name", ["cifar11", "cifar-smal", "tfds:cifar-10"])
def test_unknown_or_malformed_dataset_name_is_one_line(name):
    with pytest.raises(DatasetError) as error:
        load_dataset(name)
    message = str(error.value)
    assert f"Unknown dataset {name.removeprefix('tfds:')!r}: not a TFDS name" in message
    assert "\n" not in message and "list_builders" in message


def test_classes_keep_a_subset_and_the_rest_become_unknown_test_images(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=4, per_class=10, test_per_class=3)
    data = load_dataset(root, classes=["class_3", "class_1"])
    assert data.class_names == ["class_1", "class_3"]  # the dataset's order, ids 0 and 1
    # 10 % of each held-out class's training images: validation unknowns, never test ones.
    assert data.sizes == {"train": 18, "val": 2, "test": 6, "unknown_test": 6,
                          "unknown_val": 2}
    assert {int(y) for _, y in data.train} == {0, 1}
    assert {int(y) for _, y in data.unknown_test} == {-1}
    assert {int(y) for _, y in data.unknown_val} == {-1}
    test_pixels = {x.numpy().tobytes() for _, x in ((y, x) for x, y in data.unknown_test)}
    assert not test_pixels & {x.numpy().tobytes() for x, _ in data.unknown_val}
    with pytest.raises(DatasetError, match="has no class 'dog'; its classes are class_0"):
        load_dataset(root, classes=["class_1", "dog"])


def test_tfds_classes_are_remapped_and_the_others_held_out():
    with tfds.testing.mock_data(num_examples=40), mock.patch("tfmargin.data._check_reachable"):
        # The mock metadata names the classes "0".."9".
        data = load_dataset("cifar10", classes=["3", "0"], val_split=0.0)
        labels = [int(y) for _, y in data.train]
        unknown = [int(y) for _, y in data.unknown_test]
        test = [int(y) for _, y in data.test]
    assert data.class_names == ["0", "3"]
    assert set(labels) <= {0, 1} and set(test) <= {0, 1} and set(unknown) == {-1}
    assert data.sizes["test"] + data.sizes["unknown_test"] == 40


def test_folder_fingerprint_follows_the_bytes_and_is_cached(tmp_path, monkeypatch):
    from tfmargin import fingerprint

    monkeypatch.setattr(fingerprint, "FINGERPRINT_CACHE", str(tmp_path / "cache.json"))
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=3)
    first = load_dataset(root).fingerprint
    assert len(first) == 64 and load_dataset(root).fingerprint == first
    assert str(os.path.abspath(root)) in (tmp_path / "cache.json").read_text()
    from PIL import Image

    path = os.path.join(root, "class_0", "0000.png")  # another image: other bytes
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(path)
    assert load_dataset(root).fingerprint != first


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixup_and_cutmix_give_soft_targets_and_the_dominant_label(tmp_path, mix):
    root = write_image_folder(tmp_path / "d", num_classes=3, per_class=8, test_per_class=2)
    data = load_dataset(root)
    ds = make_pipeline(data.train, batch_size=8, training=True, seed=3, mix=mix, num_classes=3)
    images, targets = next(iter(ds))
    targets = targets.numpy()
    assert targets.shape == (8, 3) and images.shape == (8, 32, 32, 3)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    assert np.any((targets > 0.01) & (targets < 0.99))  # mixed, not one-hot


def test_cifar10_jpeg_copy_is_written_as_the_runs_read_it(tmp_path, capsys):
    """experiments/make_cifar10_jpeg.py on TFDS's mock CIFAR-10: class folders of JPEGs at
    quality 75 with 4:2:0 chroma, loadable as an image folder, and its fingerprint printed."""
    import sys

    from PIL import Image, JpegImagePlugin

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments"))
    import make_cifar10_jpeg

    out = tmp_path / "cifar10-jpeg"
    with tfds.testing.mock_data(num_examples=12):
        make_cifar10_jpeg.main([str(out)])
    printed = capsys.readouterr().out
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.jpg"))
    assert len(files) == 24 and files[0].startswith("test/")
    image = Image.open(out / files[0])
    assert image.format == "JPEG" and image.size == (32, 32)
    assert JpegImagePlugin.get_sampling(image) == 2  # 4:2:0
    data = load_dataset(str(out), val_split=0.0)
    assert data.sizes["train"] == 12 and data.sizes["test"] == 12
    assert f"fingerprint of this copy:      {data.fingerprint}" in printed


def test_what_loading_leaves_out_or_changes_is_said(tmp_path):
    """An empty class folder, a stray file, grey and odd-sized images: each one note."""
    from PIL import Image

    root = write_image_folder(tmp_path / "d", num_classes=3, per_class=6)
    os.makedirs(tmp_path / "d" / "horse")
    (tmp_path / "d" / "notes.txt").write_text("mine")
    Image.new("L", (40, 28), 128).save(tmp_path / "d" / "class_0" / "grey.png")
    data = load_dataset(root)
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert data.notes == [
        f"{root}: class folder(s) horse hold no images (.jpg/.jpeg/.png/.bmp/.gif) and are "
        "left out",
        f"{root}: 1 file(s) that are not images ignored (notes.txt)",
        "images come in 2 size(s), 32x32 to 40x28: each is resized to 32x32",
        "1 image(s) are not RGB (1 L): converted to RGB (grey repeated, alpha dropped)"]
    assert load_dataset(write_image_folder(tmp_path / "clean", num_classes=2)).notes == []


def test_a_flat_folders_test_split_is_the_same_for_every_seed(tmp_path):
    """Paired seeds are tested on the same images: the seed moves the validation split and
    the training order, never the test split."""
    root = write_image_folder(tmp_path / "flat", num_classes=3, per_class=20)

    def images(split):
        return sorted(x.numpy().tobytes() for x, _ in split)

    first, second = load_dataset(root, seed=0), load_dataset(root, seed=1)
    assert images(first.test) == images(second.test)
    assert images(first.val) != images(second.val)
