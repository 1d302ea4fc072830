"""Datasets as tf.data pipelines: TFDS names or image folders, one input pipeline.

``load_dataset`` returns decoded ``(uint8 image, int label)`` splits;
``make_pipeline`` turns a split into batches for ``model.fit``.
"""

import dataclasses
import os
import random

import keras
import numpy as np
import tensorflow as tf

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
AUGMENTATIONS = ("standard", "randaugment", "none")
MIXES = ("none", "mixup", "cutmix")


class DatasetError(ValueError):
    """A dataset that cannot be used, with a message saying how to fix it."""


@dataclasses.dataclass
class Dataset:
    train: tf.data.Dataset  # (uint8 HxWx3, int32), decoded and cached
    test: tf.data.Dataset
    class_names: list
    train_size: int
    test_size: int
    source: str

    @property
    def num_classes(self):
        return len(self.class_names)


def _list_images(folder):
    classes = sorted(
        d for d in os.listdir(folder) if os.path.isdir(os.path.join(folder, d))
    )
    files = {
        c: sorted(
            os.path.join(folder, c, f)
            for f in os.listdir(os.path.join(folder, c))
            if f.lower().endswith(IMAGE_EXTENSIONS)
        )
        for c in classes
    }
    return {c: fs for c, fs in files.items() if fs}


def _decode(path, label, image_size):
    image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)
    image.set_shape((image_size, image_size, 3))
    return image, label


def _find_unreadable(paths):
    for path in paths:
        try:
            tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            return path
    return None


def _fill_cache(ds):
    """Iterate a cached dataset once (the decoding epoch 1 would do); returns its size."""
    return sum(int(y.shape[0]) for _, y in ds.batch(1024).prefetch(2))


def _materialise(paths, labels, image_size):
    """Decode every image once into a cached dataset; name the file that fails."""
    ds = tf.data.Dataset.from_tensor_slices((paths, np.asarray(labels, np.int32)))
    ds = ds.map(lambda p, y: _decode(p, y, image_size), num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.cache()
    try:
        _fill_cache(ds)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        bad = _find_unreadable(paths)
        where = f"{bad!r} is corrupt, truncated or not an image" if bad else str(error)
        raise DatasetError(f"Cannot decode an image: {where}. Remove or replace it.") from None
    return ds


def load_image_folder(folder, image_size=32, val_split=0.1, limit_train=None, seed=0):
    """Class sub-folders (``folder/<class>/*.jpg``), or ``train/`` and ``test/`` of them.

    Without ``train/``+``test/``, a stratified ``val_split`` of each class is
    held out as the test split. Class ids are the sorted folder names.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"Dataset folder {folder!r} does not exist.")
    split_dirs = [os.path.join(folder, s) for s in ("train", "test")]
    if all(os.path.isdir(d) for d in split_dirs):
        train_files, test_files = (_list_images(d) for d in split_dirs)
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise DatasetError(
                f"{split_dirs[1]!r} has classes missing from train/: {', '.join(unknown)}."
            )
        pairs = {"train": [], "test": []}
        for split, files in (("train", train_files), ("test", test_files)):
            for c, fs in files.items():
                pairs[split] += [(f, c) for f in fs]
    else:
        train_files = _list_images(folder)
        if not 0.0 < val_split < 1.0:
            raise DatasetError(f"val_split must be in (0, 1), got {val_split}.")
        pairs = {"train": [], "test": []}
        rng = random.Random(seed)
        for c, fs in train_files.items():
            fs = list(fs)
            rng.shuffle(fs)
            n_test = max(1, round(len(fs) * val_split)) if len(fs) > 1 else 0
            pairs["test"] += [(f, c) for f in fs[:n_test]]
            pairs["train"] += [(f, c) for f in fs[n_test:]]
    class_names = sorted(train_files)
    if len(class_names) < 2:
        raise DatasetError(
            f"{folder!r} has {len(class_names)} class folder(s) with images; a classifier "
            "needs at least 2 (layout: <folder>/<class>/<image>.jpg)."
        )
    if not pairs["test"]:
        raise DatasetError(f"{folder!r} leaves no images for the test split.")
    index = {c: i for i, c in enumerate(class_names)}
    random.Random(seed).shuffle(pairs["train"])
    if limit_train:
        pairs["train"] = pairs["train"][:limit_train]
    splits = {
        name: _materialise([p for p, _ in ps], [index[c] for _, c in ps], image_size)
        for name, ps in pairs.items()
    }
    return Dataset(splits["train"], splits["test"], class_names, len(pairs["train"]),
                   len(pairs["test"]), source=os.path.abspath(folder))


def _check_reachable(url):
    """One request, honouring proxies: TFDS itself retries for minutes when offline."""
    import requests

    requests.head(url, timeout=10, allow_redirects=False)


def load_tfds(name, image_size=32, limit_train=None, data_dir=None):
    """A TFDS image-classification dataset with ``train`` and ``test`` splits."""
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise DatasetError(
            f"Unknown dataset {name!r}: not a TFDS name and not a folder. Use a TFDS "
            "image-classification name (cifar10, cifar100, ...) or a path to an image folder."
        ) from None
    try:
        if not builder.is_prepared():
            _check_reachable(builder.info.homepage)
        builder.download_and_prepare()
    except Exception as error:  # TFDS raises many types when offline
        raise DatasetError(
            f"Cannot download {name!r} ({type(error).__name__}). Offline? Place the official "
            f"archive in {os.path.join(builder.data_dir_root, 'downloads', 'manual')} "
            f"(tfds manual_dir) or pass --dataset <folder> with one sub-folder per class."
        ) from None
    keys = builder.info.supervised_keys
    if not keys or "label" not in builder.info.features:
        raise DatasetError(f"{name!r} is not an image-classification dataset.")
    class_names = list(builder.info.features["label"].names)
    splits = {}
    for key in ("train", "test"):
        ds = builder.as_dataset(split=key, as_supervised=True)
        if key == "train" and limit_train:
            ds = ds.take(limit_train)
        ds = ds.map(
            lambda x, y: (tf.image.resize(x, (image_size, image_size)) if
                          x.shape[0] != image_size else x, tf.cast(y, tf.int32)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        splits[key] = ds.map(lambda x, y: (tf.cast(x, tf.uint8), y)).cache()
    sizes = [_fill_cache(splits[key]) for key in ("train", "test")]
    return Dataset(splits["train"], splits["test"], class_names, sizes[0], sizes[1],
                   source=f"tfds:{name}")


def load_dataset(name, image_size=32, limit_train=None, val_split=0.1, seed=0, data_dir=None):
    """A folder path or a TFDS name to a :class:`Dataset`."""
    if os.path.sep in name or os.path.isdir(name):
        return load_image_folder(name, image_size, val_split, limit_train, seed)
    return load_tfds(name, image_size, limit_train, data_dir)


def build_augmenter(kind, image_size, seed=None):
    """Keras preprocessing layers applied to uint8-valued float batches."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {kind!r}; choose one of "
                         f"{', '.join(AUGMENTATIONS)}.")
    if kind == "none":
        return None
    shift = 4 / image_size  # the classic CIFAR pad-4-and-crop, as a per-image shift
    steps = [
        keras.layers.RandomTranslation(shift, shift, fill_mode="constant",
                                       interpolation="nearest", seed=seed),
        keras.layers.RandomFlip("horizontal", seed=seed),
    ]
    if kind == "randaugment":
        steps.append(keras.layers.RandAugment(value_range=(0, 255), seed=seed))
    return keras.Sequential(steps, name=f"augment_{kind}")


def build_mixer(kind, seed=None):
    """Keras core MixUp or CutMix, acting on ``{"images", "labels"}`` with one-hot labels."""
    if kind not in MIXES:
        raise ValueError(f"Unknown mix {kind!r}; choose one of {', '.join(MIXES)}.")
    if kind == "none":
        return None
    return keras.layers.MixUp(seed=seed) if kind == "mixup" else keras.layers.CutMix(seed=seed)


def make_pipeline(split, batch_size, training, with_label_input, augment="standard",
                  shuffle_buffer=50_000, seed=None, mix="none", num_classes=None):
    """Cached decoded split -> shuffled, augmented, batched, prefetched batches.

    Training batches repeat forever: pass ``steps_per_epoch`` to ``fit``.
    With ``mix`` (``mixup``/``cutmix``, needs ``num_classes``) the targets are
    soft one-hot vectors and the label input is the dominant class.
    Yields ``(inputs, labels)``; ``inputs`` is ``{"image", "label"}`` for a
    margin head's training model (labels as its second input), else the image.
    """
    ds = split
    if training:
        # One endless stream shuffled once (fit gets steps_per_epoch): with
        # reshuffle_each_iteration a distributed copy of the dataset draws a
        # different order than the plain one, so strategies would not agree.
        ds = ds.repeat().shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=False)
    ds = ds.batch(batch_size, drop_remainder=training)
    augmenter = build_augmenter(augment, split.element_spec[0].shape[0], seed) if training \
        else None

    mixer = build_mixer(mix, seed) if training else None

    def to_model(images, labels):
        images = tf.cast(images, tf.float32)
        if augmenter is not None:
            images = augmenter(images, training=True)
        targets = labels
        if mixer is not None:  # soft targets; the margin goes to the dominant class
            mixed = mixer({"images": images, "labels": tf.one_hot(labels, num_classes)},
                          training=True)
            images, targets = mixed["images"], mixed["labels"]
            labels = tf.argmax(targets, axis=-1, output_type=tf.int32)
        inputs = {"image": images, "label": labels} if with_label_input else images
        return inputs, targets

    ds = ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
