"""Batches for ``model.fit`` from a split of ``tfmargin.data``: shuffling (or airbench's
per-epoch permutations), augmentation and mixing, then the model's inputs (images and, in
training, labels) and targets.
"""

import keras
import tensorflow as tf

from tfmargin.names import AUGMENTATIONS, MIXES, choices


def build_augmenter(kind, image_size, seed=None):
    """Keras preprocessing layers applied to uint8-valued float batches."""
    if kind not in AUGMENTATIONS:
        raise ValueError(f"Unknown augmentation {kind!r}; choose one of "
                         f"{choices(AUGMENTATIONS)}.")
    if kind in ("none", "airbench"):  # airbench: per image, in epoch_permutations
        return None
    # Each random layer its own seed: layers seeded alike draw the same random numbers.
    seeds = [None] * 3 if seed is None else [seed, seed + 1, seed + 2]
    shift = 4 / image_size  # the classic CIFAR pad-4-and-crop, as a per-image shift
    # float32 whatever the global policy: the pipeline feeds pixel values, and a model's
    # mixed-precision policy must not turn them (or MixUp's labels) into 16-bit floats.
    steps = [
        keras.layers.RandomTranslation(shift, shift, fill_mode="constant",
                                       interpolation="nearest", seed=seeds[0],
                                       dtype="float32"),
        keras.layers.RandomFlip("horizontal", seed=seeds[1], dtype="float32"),
    ]
    if kind == "randaugment":
        steps.append(keras.layers.RandAugment(value_range=(0, 255), seed=seeds[2],
                                              dtype="float32"))
    return keras.Sequential(steps, name=f"augment_{kind}")


def build_mixer(kind, seed=None):
    """Keras core MixUp or CutMix, acting on ``{"images", "labels"}`` with one-hot labels."""
    if kind not in MIXES:
        raise ValueError(f"Unknown mix {kind!r}; choose one of {choices(MIXES)}.")
    if kind == "none":
        return None
    seed = None if seed is None else seed + 3  # apart from the augmenter's seeds
    layer = keras.layers.MixUp if kind == "mixup" else keras.layers.CutMix
    return layer(seed=seed, dtype="float32")  # float32 whatever the policy (build_augmenter)


def alternating_flip_translate(epoch, seed=0, shift=2):
    """airbench's augmentation of one image in epoch ``epoch``: ``fn(index, (image, label))``.

    Alternating flip: a fixed random half of the images (drawn from ``seed``
    and the image's index) is mirrored in even epochs, the other half in odd
    epochs, so every image is seen both ways in every pair of epochs. Then a
    translation by up to ``shift`` pixels each way, uniform over the
    ``(2 shift + 1)^2`` offsets, from the reflect-padded image (the edge not
    repeated, as PyTorch's reflect padding). Stateless draws: the result
    depends only on (seed, epoch, index).
    """
    def augment(index, element):
        image, label = element
        flip_seed = tf.stack([tf.cast(seed, tf.int64), index])
        mirrored = tf.random.stateless_uniform([], flip_seed) < 0.5
        if epoch % 2:
            mirrored = tf.logical_not(mirrored)
        image = tf.where(mirrored, tf.reverse(image, axis=[1]), image)
        padded = tf.pad(image, [[shift, shift], [shift, shift], [0, 0]], mode="REFLECT")
        shift_seed = tf.stack([tf.cast(seed, tf.int64) * 1009 + epoch + 1, index])
        offset = tf.random.stateless_uniform([2], shift_seed, 0, 2 * shift + 1, tf.int32)
        return tf.slice(padded, tf.concat([offset, [0]], 0), tf.shape(image)), label

    return augment


def epoch_permutations(split, batch_size, epochs, seed=None, per_image=None, first_epoch=None):
    """Batches of ``epochs`` epochs, each one permutation of ``split`` with its own seed.

    Every epoch is a permutation (shuffling after ``repeat`` mixes epochs: some
    images come 2-3 times in an "epoch", others not at all). Epoch e is a
    shuffle with the fixed seed ``(seed, e)``, so the order does not depend on
    how many iterators are opened: ``fit`` under a distribution strategy opens
    an extra one to build the model, which would advance a reshuffling seed
    generator and start that run on the second permutation. The last partial
    batch of each epoch is dropped, so an epoch is ``len(split) // batch_size``
    steps. ``per_image(epoch)``, if given, is mapped over ``(index, (image,
    label))`` pairs of that epoch (``alternating_flip_translate``).
    ``first_epoch``, a ``tf.Variable`` read as the batches are made, skips the
    epochs before it: a resumed run (``ResumeEpoch``) continues with the
    permutation it would have seen, not epoch 0's.
    """
    size = int(split.cardinality())
    if size < 0:  # unknown after a filter, say: count once (the split is cached)
        size = int(split.reduce(0, lambda n, _: n + 1))
    steps = size // batch_size

    def epoch(e):
        ds = split.enumerate() if per_image else split
        ds = ds.shuffle(max(size, 1), seed=None if seed is None else seed * 100_003 + e,
                        reshuffle_each_iteration=False)
        if per_image:
            ds = ds.map(per_image(e), num_parallel_calls=tf.data.AUTOTUNE)
        return ds.batch(batch_size, drop_remainder=True)

    order = tf.data.Dataset.range(epochs)
    if first_epoch is not None:
        order = order.filter(lambda e: e >= first_epoch)
    order = order.flat_map(lambda e: tf.data.Dataset.from_tensors(e).repeat(steps))
    return tf.data.Dataset.choose_from_datasets([epoch(e) for e in range(epochs)], order)


def make_pipeline(split, *, batch_size, training, augment="standard", seed=None, mix="none",
                  num_classes=None, epochs=1, first_epoch=None):
    """Cached decoded split -> shuffled, augmented, batched, prefetched ``(images, targets)``.

    Training batches cover ``epochs`` epochs, one permutation each: pass
    ``steps_per_epoch = len(split) // batch_size`` to ``fit``. Targets are the
    integer labels, or with ``mix`` (``mixup``/``cutmix``, needs
    ``num_classes``) soft one-hot vectors (``MarginClassifier`` puts the
    margin on the dominant class).
    """
    per_image = None
    if training and augment == "airbench":
        def per_image(epoch):
            return alternating_flip_translate(epoch, seed or 0)
    if training:
        ds = epoch_permutations(split, batch_size, epochs, seed, per_image, first_epoch)
    else:
        ds = split.batch(batch_size)
    augmenter = build_augmenter(augment, split.element_spec[0].shape[0], seed) if training \
        and not per_image else None
    mixer = build_mixer(mix, seed) if training else None

    def to_model(images, labels):
        images = tf.cast(images, tf.float32)
        if augmenter is not None:
            images = augmenter(images, training=True)
        if mixer is None:
            return images, labels
        mixed = mixer({"images": images, "labels": tf.one_hot(labels, num_classes)},
                      training=True)
        return mixed["images"], mixed["labels"]

    ds = ds.map(to_model, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
