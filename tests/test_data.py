import os
from unittest import mock

import numpy as np
import pytest
import tensorflow_datasets as tfds
from synthetic import write_image_folder

from tfmargin.data import DatasetError, load_dataset, make_pipeline


def test_image_folder_with_train_and_test(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=3, per_class=5, test_per_class=2)
    data = load_dataset(root)
    assert data.class_names == ["class_0", "class_1", "class_2"]
    assert (data.train_size, data.test_size) == (15, 6)
    images, labels = next(iter(data.test.batch(6)))
    assert images.dtype.name == "uint8" and tuple(images.shape) == (6, 32, 32, 3)
    assert sorted(labels.numpy().tolist()) == [0, 0, 1, 1, 2, 2]


def test_flat_jpeg_folder_gets_a_stratified_held_out_split(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=10, fmt="jpg", size=40)
    data = load_dataset(root, val_split=0.2)
    assert (data.train_size, data.test_size) == (16, 4)
    test_labels = [int(y) for _, y in data.test]
    assert sorted(test_labels) == [0, 0, 1, 1]
    image, _ = next(iter(data.train))
    assert tuple(image.shape) == (32, 32, 3)  # resized from 40x40


def test_pipeline_batches_augments_and_feeds_labels_as_second_input(tmp_path):
    root = write_image_folder(tmp_path / "d", num_classes=2, per_class=8, test_per_class=2)
    data = load_dataset(root)
    ds = make_pipeline(data.train, batch_size=4, training=True, with_label_input=True, seed=1)
    assert ds.cardinality() == -1  # endless: fit takes steps_per_epoch
    inputs, labels = next(iter(ds))
    assert set(inputs) == {"image", "label"}
    assert inputs["image"].shape == (4, 32, 32, 3) and inputs["image"].dtype.name == "float32"
    np.testing.assert_array_equal(inputs["label"], labels)
    assert float(inputs["image"].numpy().max()) <= 255.0
    plain = make_pipeline(data.test, batch_size=4, training=False, with_label_input=False)
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


def test_tfds_path_with_mock_data():
    # mock_data replaces the download and the files; only our network probe is left.
    with tfds.testing.mock_data(num_examples=12), mock.patch("tfmargin.data._check_reachable"):
        data = load_dataset("cifar10", limit_train=8)
    assert data.num_classes == 10 and len(data.class_names) == 10
    assert data.test_size == 12 and data.train_size == 8
    image, label = next(iter(data.train))
    assert image.dtype.name == "uint8" and tuple(image.shape) == (32, 32, 3)
    assert 0 <= int(label) < 10


def test_tfds_offline_says_how_to_place_the_archive(tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    with mock.patch.object(tfds.download.DownloadManager, "download_and_extract", offline), \
            mock.patch.object(tfds.download.DownloadManager, "download", offline):
        with pytest.raises(DatasetError, match=r"Cannot download 'cifar10'.*manual.*--dataset"):
            load_dataset("cifar10", data_dir=str(tmp_path))


def test_unknown_dataset_name():
    with pytest.raises(DatasetError, match="Unknown dataset 'cifar11': not a TFDS name"):
        load_dataset("cifar11")


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_mixup_and_cutmix_give_soft_targets_and_the_dominant_label(tmp_path, mix):
    root = write_image_folder(tmp_path / "d", num_classes=3, per_class=8, test_per_class=2)
    data = load_dataset(root)
    ds = make_pipeline(data.train, batch_size=8, training=True, with_label_input=True, seed=3,
                       mix=mix, num_classes=3)
    inputs, targets = next(iter(ds))
    targets = targets.numpy()
    assert targets.shape == (8, 3)
    np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
    assert np.any((targets > 0.01) & (targets < 0.99))  # mixed, not one-hot
    np.testing.assert_array_equal(inputs["label"], targets.argmax(axis=1))
