"""Datasets as tf.data pipelines: TFDS names or image folders, one input pipeline.

``load_dataset`` returns decoded ``(uint8 image, int label)`` splits: ``train``,
``val`` (held out from the training data; everything that is chosen is chosen
on it) and ``test`` (touched once, for the reported numbers); with ``classes``,
also ``unknown_test``, the test images of the classes left out (open-set
evaluation), and ``unknown_val``, a ``val_split`` share of their training images (open-set
figures on validation that never touch a test image). ``tfmargin.pipeline.make_pipeline``
turns a split into batches for ``model.fit``.
"""

import dataclasses
import os
import random

import numpy as np
import tensorflow as tf

from tfmargin.fingerprint import fingerprint_files

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
# The seed of the splits that must not change with a run's --seed: a flat folder's test
# split (so paired seeds are tested on the same images) and the held-out classes'
# validation images.
SPLIT_SEED = 0
TFDS_PREFIX = "tfds:"


class DatasetError(ValueError):
    """A dataset that cannot be used, with a message saying how to fix it."""


@dataclasses.dataclass
class Dataset:
    train: tf.data.Dataset  # (uint8 HxWx3, int32), decoded and cached
    val: tf.data.Dataset  # held out from the training data; None with val_split 0
    test: tf.data.Dataset
    class_names: list
    sizes: dict  # images per split: {"train": n, "val": n, "test": n[, "unknown_test": n,
    #              "unknown_val": n]}
    source: str
    fingerprint: str  # SHA-256 of the data's files (tfmargin.fingerprint)
    notes: list = dataclasses.field(default_factory=list)  # what loading left out or changed
    unknown_test: tf.data.Dataset = None  # test images of the classes left out (label -1)
    unknown_val: tf.data.Dataset = None  # some of their training images (label -1)

    @property
    def num_classes(self):
        return len(self.class_names)

    @property
    def train_size(self):
        return self.sizes["train"]


def resize_image(image, image_size):
    """The one resize of every path (folders, TFDS, the serving endpoint): antialiased
    bilinear to ``image_size`` squared, rounded and clipped back to uint8."""
    image = tf.image.resize(image, (image_size, image_size), antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode_image(encoded, image_size):
    """Encoded JPEG/PNG/BMP/GIF bytes to a uint8 ``(image_size, image_size, 3)`` image."""
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image = resize_image(image, image_size)
    image.set_shape((image_size, image_size, 3))
    return image


def channel_statistics(split):
    """Per-channel mean and variance of a split's images on the 0..255 scale (float64)."""
    count, total, total_sq = 0, np.zeros(3), np.zeros(3)
    for images, _ in split.batch(1024):
        pixels = images.numpy().reshape(-1, 3).astype(np.float64)
        count += len(pixels)
        total += pixels.sum(axis=0)
        total_sq += np.square(pixels).sum(axis=0)
    mean = total / count
    return mean.tolist(), np.maximum(total_sq / count - mean**2, 1e-6).tolist()


def write_image_folder(root, images, labels, class_names, fmt="png"):
    """Write ``root/<class name>/NNNN.<fmt>`` for uint8 ``images`` and their ``labels``."""
    from PIL import Image

    counts = {}
    for image, label in zip(images, labels, strict=True):
        folder = os.path.join(root, class_names[label])
        os.makedirs(folder, exist_ok=True)
        index = counts[label] = counts.get(label, -1) + 1
        Image.fromarray(np.asarray(image, np.uint8)).save(
            os.path.join(folder, f"{index:04d}.{fmt}"))
    return str(root)


def _list_images(folder, notes):
    """``{class: [image path]}`` of the class sub-folders of ``folder``; what is left out
    (an empty class folder, a file that is not an image) is said in ``notes``."""
    entries = sorted(os.listdir(folder))
    strays = [f for f in entries if not os.path.isdir(os.path.join(folder, f))]
    files, empty = {}, []
    for c in (d for d in entries if os.path.isdir(os.path.join(folder, d))):
        names = sorted(os.listdir(os.path.join(folder, c)))
        images = [os.path.join(folder, c, f) for f in names
                  if f.lower().endswith(IMAGE_EXTENSIONS)]
        strays += [os.path.join(c, f) for f in names if not f.lower().endswith(IMAGE_EXTENSIONS)]
        if images:
            files[c] = images
        else:
            empty.append(c)
    if empty:
        notes.append(f"{folder}: class folder(s) {', '.join(empty)} hold no images "
                     f"({'/'.join(IMAGE_EXTENSIONS)}) and are left out")
    if strays:
        notes.append(f"{folder}: {len(strays)} file(s) that are not images ignored "
                     f"({', '.join(strays[:3])}"
                     f"{', ...' if len(strays) > 3 else ''})")
    return files


def describe_images(paths, image_size):
    """Notes on what decoding will change: images of other sizes (resized) and images
    that are not RGB (converted). Reads only each file's header."""
    from PIL import Image, UnidentifiedImageError

    sizes, modes = {}, {}
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes[image.size] = sizes.get(image.size, 0) + 1
                modes[image.mode] = modes.get(image.mode, 0) + 1
        except (OSError, UnidentifiedImageError):
            continue  # named by the decode that follows, with the fix
    notes = []
    if set(sizes) - {(image_size, image_size)}:
        small, large = min(sizes, key=lambda s: s[0] * s[1]), max(sizes, key=lambda s: s[0] * s[1])
        notes.append(f"images come in {len(sizes)} size(s), {small[0]}x{small[1]} to "
                     f"{large[0]}x{large[1]}: each is resized to {image_size}x{image_size}")
    other = {mode: n for mode, n in modes.items() if mode != "RGB"}
    if other:
        notes.append(f"{sum(other.values())} image(s) are not RGB ("
                     + ", ".join(f"{n} {mode}" for mode, n in sorted(other.items()))
                     + "): converted to RGB (grey repeated, alpha dropped)")
    return notes


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
    ds = ds.map(lambda p, y: (decode_image(tf.io.read_file(p), image_size), y),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.cache()
    try:
        _fill_cache(ds)
    except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as error:
        bad = _find_unreadable(paths)
        where = f"{bad!r} is corrupt, truncated or not an image" if bad else str(error)
        raise DatasetError(f"Cannot decode an image: {where}. Remove or replace it.") from None
    return ds


def _stratified_split(files, fraction, rng):
    """Split ``{class: [file]}`` into (kept, held out) pair lists, ``fraction`` per class."""
    kept, held_out = [], []
    if not fraction:
        return [(f, c) for c, fs in files.items() for f in fs], held_out
    for c, fs in files.items():
        fs = list(fs)
        rng.shuffle(fs)
        n_out = max(1, round(len(fs) * fraction)) if len(fs) > 1 else 0
        held_out += [(f, c) for f in fs[:n_out]]
        kept += [(f, c) for f in fs[n_out:]]
    return kept, held_out


def _by_class(pairs):
    files = {}
    for f, c in pairs:
        files.setdefault(c, []).append(f)
    return files


def check_classes(classes, available, source):
    """The chosen class names, in the dataset's own order; a name it lacks is an error."""
    missing = [c for c in classes if c not in available]
    if missing:
        raise DatasetError(f"{source!r} has no class {', '.join(map(repr, missing))}; its "
                           f"classes are {', '.join(available)}.")
    return [c for c in available if c in classes]


def load_image_folder(folder, *, image_size=32, val_split=0.1, test_split=0.1,
                      limit_train=None, seed=0, classes=None):
    """Class sub-folders (``folder/<class>/*.jpg``), or ``train/`` and ``test/`` of them.

    Without ``train/``+``test/``, a stratified ``test_split`` of each class is
    held out as the test split (drawn with ``SPLIT_SEED``, whatever ``seed``). Then a
    stratified ``val_split`` of the training images is held out for validation;
    ``limit_train`` keeps the first N of the rest (in a fixed shuffled order).
    Class ids are the sorted folder names.
    ``classes``: train on these only; the others' test images become
    ``unknown_test``, a stratified ``val_split`` of their training images (drawn with
    ``SPLIT_SEED``) ``unknown_val``.
    """
    if not os.path.isdir(folder):
        raise DatasetError(f"Dataset folder {folder!r} does not exist.")
    rng = random.Random(seed)
    notes = []
    split_dirs = [os.path.join(folder, s) for s in ("train", "test")]
    if all(os.path.isdir(d) for d in split_dirs):
        train_files, test_files = (_list_images(d, notes) for d in split_dirs)
        unknown = sorted(set(test_files) - set(train_files))
        if unknown:
            raise DatasetError(
                f"{split_dirs[1]!r} has classes missing from train/: {', '.join(unknown)}."
            )
        test = [(f, c) for c, fs in test_files.items() for f in fs]
        all_files = [f for fs in (*train_files.values(), *test_files.values()) for f in fs]
    else:
        if any(os.path.isdir(d) for d in split_dirs):
            present = next(d for d in split_dirs if os.path.isdir(d))
            raise DatasetError(f"{folder!r} has {os.path.basename(present)}/ but not both "
                               "train/ and test/: give it both, or class folders only.")
        train_files = _list_images(folder, notes)
        all_files = [f for fs in train_files.values() for f in fs]
        kept, test = _stratified_split(train_files, test_split, random.Random(SPLIT_SEED))
        train_files = _by_class(kept)
    class_names = sorted(train_files)
    if len(class_names) < 2:
        raise DatasetError(
            f"{folder!r} has {len(class_names)} class folder(s) with images; a classifier "
            "needs at least 2 (layout: <folder>/<class>/<image>.jpg)."
        )
    fingerprint = fingerprint_files(folder, [os.path.relpath(f, folder) for f in all_files])
    notes += describe_images(all_files, image_size)
    unknown_test, unknown_val = [], []
    if classes:
        class_names = check_classes(classes, class_names, folder)
        unknown_test = [(f, c) for f, c in test if c not in class_names]
        unknown_val = _stratified_split({c: fs for c, fs in train_files.items()
                                         if c not in class_names}, val_split,
                                        random.Random(SPLIT_SEED))[1]
        test = [(f, c) for f, c in test if c in class_names]
        train_files = {c: train_files[c] for c in class_names}
    train, val = _stratified_split(train_files, val_split, rng)
    pairs = {"train": train, "val": val, "test": test}
    for split, ps in pairs.items():
        if not ps and not (split == "val" and not val_split):
            raise DatasetError(f"{folder!r} leaves no images for the {split} split.")
    index = {c: i for i, c in enumerate(class_names)}
    rng.shuffle(pairs["train"])
    if limit_train:
        pairs["train"] = pairs["train"][:limit_train]
    if unknown_test:
        pairs["unknown_test"] = unknown_test
    if unknown_val:
        pairs["unknown_val"] = unknown_val
    splits = {
        name: _materialise([p for p, _ in ps], [index.get(c, -1) for _, c in ps], image_size)
        if ps else None for name, ps in pairs.items()
    }
    return Dataset(splits["train"], splits["val"], splits["test"], class_names,
                   {name: len(ps) for name, ps in pairs.items()},
                   source=os.path.abspath(folder), fingerprint=fingerprint, notes=notes,
                   unknown_test=splits.get("unknown_test"),
                   unknown_val=splits.get("unknown_val"))


def _check_reachable(url):
    """One request, honouring proxies: TFDS itself retries for minutes when offline."""
    import requests

    requests.head(url, timeout=10, allow_redirects=False)


def _offline_errors():
    import requests

    return ConnectionError, TimeoutError, requests.exceptions.RequestException


def tfds_builder(name, data_dir=None):
    """The TFDS builder of ``name``; an unknown name is a ``DatasetError``, one line."""
    import tensorflow_datasets as tfds

    try:
        return tfds.builder(name, data_dir=data_dir)
    except (tfds.core.registered.DatasetNotFoundError, ValueError) as error:
        # ValueError: a malformed name (TFDS parses "cifar-10" as name and version).
        raise DatasetError(
            f"Unknown dataset {name!r}: not a TFDS name and not a folder ({error_line(error)}). "
            "Use a TFDS image-classification name (cifar10, cifar100, ...; "
            "python -c 'import tensorflow_datasets as t; print(t.list_builders())' lists "
            "them) or a path to an image folder."
        ) from None


def error_line(error):
    """The first line of an exception's message (TFDS's run to dozens of lines)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:160]


def expected_archives(builder):
    """``{file name: url}`` that TFDS downloads for ``builder`` (its recorded checksums)."""
    infos = type(builder).url_infos or {}
    return {info.filename or os.path.basename(url): url for url, info in infos.items()}


def prepare_tfds(builder, name):
    """Download and prepare, or say in one line what to place where when offline."""
    import tensorflow_datasets as tfds

    manual = os.path.join(builder.data_dir_root, "downloads", "manual")
    archives = expected_archives(builder)
    in_manual = archives and all(os.path.exists(os.path.join(manual, f)) for f in archives)
    try:
        if not builder.is_prepared() and not in_manual:
            _check_reachable(builder.info.homepage)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(manual_dir=manual))
    except _offline_errors() as error:
        files = ", ".join(f"{f} (from {url})" for f, url in archives.items())
        raise DatasetError(
            f"Cannot download {name!r} ({type(error).__name__}). Offline? Place "
            f"{files or 'the official archive'} in {manual} (tfds manual_dir), or pass "
            "--dataset <folder> with one sub-folder per class."
        ) from None
    except tfds.core.download.DownloadError as error:
        raise DatasetError(f"Cannot download {name!r}: {error_line(error)}") from None


def load_tfds(name, *, image_size=32, limit_train=None, val_split=0.1, classes=None,
              data_dir=None):
    """A TFDS image-classification dataset; validation is the last ``val_split`` of train.
    ``classes``: train on these only; the others' test images become ``unknown_test``, the
    last ``val_split`` of their training images ``unknown_val``."""
    builder = tfds_builder(name, data_dir)
    prepare_tfds(builder, name)
    keys = builder.info.supervised_keys
    if not keys or "label" not in builder.info.features:
        raise DatasetError(f"{name!r} is not an image-classification dataset.")
    class_names = list(builder.info.features["label"].names)
    kept = check_classes(classes, class_names, f"tfds:{name}") if classes else class_names
    remap = tf.constant([kept.index(c) if c in kept else -1 for c in class_names], tf.int32)

    def decoded(split, known=True):
        ds = builder.as_dataset(split=split, as_supervised=True).map(
            lambda x, y: (resize_image(x, image_size), tf.gather(remap, tf.cast(y, tf.int32))),
            num_parallel_calls=tf.data.AUTOTUNE)
        if classes:
            ds = ds.filter((lambda x, y: y >= 0) if known else (lambda x, y: y < 0))
        return ds.cache()

    full_train, test = decoded("train"), decoded("test")
    n_train = _fill_cache(full_train)
    n_fit = n_train - (max(1, round(n_train * val_split)) if val_split else 0)
    limit = min(limit_train or n_fit, n_fit)
    sizes = {"train": limit, "val": n_train - n_fit, "test": _fill_cache(test)}
    val = full_train.skip(n_fit) if n_fit < n_train else None
    unknown_test = unknown_val = None
    if classes and len(kept) < len(class_names):
        unknown_test = decoded("test", known=False)
        sizes["unknown_test"] = _fill_cache(unknown_test)
        unknown_train = decoded("train", known=False)
        n_unknown = _fill_cache(unknown_train)
        if val_split:
            sizes["unknown_val"] = max(1, round(n_unknown * val_split))
            unknown_val = unknown_train.skip(n_unknown - sizes["unknown_val"])
    files = [os.path.relpath(os.path.join(folder, f), builder.data_dir)
             for folder, _, names in os.walk(builder.data_dir) for f in names]
    return Dataset(full_train.take(limit), val, test, kept, sizes, source=f"tfds:{name}",
                   fingerprint=fingerprint_files(builder.data_dir, files),
                   unknown_test=unknown_test, unknown_val=unknown_val)


def load_dataset(name, *, image_size=32, limit_train=None, val_split=0.1, test_split=0.1,
                 seed=0, classes=None, data_dir=None):
    """``tfds:<name>`` (or a bare TFDS name that is not a folder) or a folder path."""
    tfds_settings = dict(image_size=image_size, limit_train=limit_train, val_split=val_split,
                         classes=classes, data_dir=data_dir)
    if name.startswith(TFDS_PREFIX):
        return load_tfds(name.removeprefix(TFDS_PREFIX), **tfds_settings)
    if os.path.isdir(name) or os.path.sep in name:
        return load_image_folder(name, image_size=image_size, val_split=val_split,
                                 test_split=test_split, limit_train=limit_train, seed=seed,
                                 classes=classes)
    return load_tfds(name, **tfds_settings)
