"""Keras callbacks of a run: precise BatchNorm, embedding projector, throughput, checkpoint."""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfmargin.atomic import atomic_file
from tfmargin.backbones import recalibrate_batchnorm


class PreciseBatchNorm(keras.callbacks.Callback):
    """At the end of training, recompute BatchNorm statistics exactly.

    See :func:`tfmargin.backbones.recalibrate_batchnorm`. Place it before
    callbacks whose ``on_train_end`` uses the model in inference mode.
    """

    def __init__(self, embedding_model, images, num_batches=20):
        super().__init__()
        self.embedding_model = embedding_model
        self.images = images
        self.num_batches = num_batches

    def on_train_end(self, logs=None):
        recalibrate_batchnorm(self.embedding_model, self.images, self.num_batches)


class AtomicModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` whose file is replaced atomically.

    Keras writes the file in place, so a crash during the write would destroy
    the previous best checkpoint; here it is written aside and renamed.
    Takes a fixed ``filepath`` (no ``{epoch}`` placeholders).
    """

    def _save_model(self, epoch, batch, logs):
        final = self.filepath
        with atomic_file(final) as tmp:
            self.filepath = tmp
            try:
                super()._save_model(epoch, batch, logs)
            finally:
                self.filepath = final


class Throughput(keras.callbacks.Callback):
    """Training images/s, timing only the training part of each epoch."""

    def __init__(self, global_batch):
        super().__init__()
        self.global_batch = global_batch
        self.seconds = 0.0
        self.batches = 0

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self._start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self._last = time.perf_counter()
        self._count = batch + 1

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += self._last - self._start
        self.batches += self._count

    @property
    def images_per_second(self):
        return self.batches * self.global_batch / self.seconds if self.seconds else 0.0


def stratified_sample(split, num_samples, num_classes, seed=0):
    """Up to ``num_samples`` (image, label) pairs, about equally many per class."""
    images, labels = zip(*((x.numpy(), int(y)) for x, y in split), strict=True)
    labels = np.array(labels)
    rng = np.random.default_rng(seed)
    per_class = max(1, num_samples // num_classes)
    index = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)])
    index = np.sort(index)[:num_samples]
    return np.stack([images[i] for i in index]), labels[index]


def _sprite(images):
    """Square grid of thumbnails, as the projector expects (row-major, padded)."""
    n, h, w = images.shape[:3]
    side = math.ceil(math.sqrt(n))
    grid = np.zeros((side * h, side * w, 3), np.uint8)
    for i, image in enumerate(images):
        r, c = divmod(i, side)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = image
    return grid


def normalize_rows(x):
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class EmbeddingProjector(keras.callbacks.Callback):
    """Writes L2-normalised embeddings and class centres for TensorBoard's projector.

    At the end of training (and every ``every`` epochs if > 0) it embeds a
    fixed stratified sample of validation images and writes, into
    ``log_dir`` (a run of its own, ``<run>/logs/projector``): a checkpoint
    with tensors ``embeddings`` (N x D) and
    ``class_centres`` (C x D, the head's normalised class weights),
    ``metadata.tsv`` (class, label, predicted, correct, angle to the true
    centre in degrees), ``centres.tsv``, ``sprite.png`` and
    ``projector_config.pbtxt``. Points and centres lie on the same sphere.
    """

    def __init__(self, log_dir, models, split, class_names, num_samples=1000, every=0):
        super().__init__()
        self.log_dir = log_dir
        self.models = models
        self.class_names = list(class_names)
        self.images, self.labels = stratified_sample(split, num_samples, len(class_names))
        self.every = every

    def on_epoch_end(self, epoch, logs=None):
        if self.every and (epoch + 1) % self.every == 0:
            self.write(epoch + 1)

    def on_train_end(self, logs=None):
        self.write(self.params.get("epochs", 0) if self.params else 0)

    def class_centres(self):
        kernel = self.models.head.kernel.numpy()
        sub_centers = getattr(self.models.head, "sub_centers", 1)
        centres = kernel.T.reshape(len(self.class_names), sub_centers, -1)[:, 0]
        return normalize_rows(centres)

    def write(self, step):
        from PIL import Image
        from tensorboard.plugins import projector

        os.makedirs(self.log_dir, exist_ok=True)
        raw = self.models.embedding.predict(self.images.astype("float32"), verbose=0)
        # The head on the embeddings: one backbone pass serves points and predictions.
        predicted = np.argmax(ops.convert_to_numpy(self.models.head(raw)), axis=1)
        embeddings = normalize_rows(raw)
        centres = self.class_centres()
        cosine = np.clip(np.sum(embeddings * centres[self.labels], axis=1), -1.0, 1.0)
        angles = np.degrees(np.arccos(cosine))
        with open(os.path.join(self.log_dir, "metadata.tsv"), "w") as f:
            f.write("class\tlabel\tpredicted\tcorrect\tangle_to_centre\n")
            for y, p, a in zip(self.labels, predicted, angles, strict=True):
                f.write(f"{self.class_names[y]}\t{y}\t{self.class_names[p]}\t{int(y == p)}"
                        f"\t{a:.2f}\n")
        with open(os.path.join(self.log_dir, "centres.tsv"), "w") as f:
            f.write("".join(f"{name}\n" for name in self.class_names))
        Image.fromarray(_sprite(self.images)).save(os.path.join(self.log_dir, "sprite.png"))
        checkpoint = tf.train.Checkpoint(embeddings=tf.Variable(embeddings),
                                         class_centres=tf.Variable(centres))
        checkpoint.save(os.path.join(self.log_dir, "projector.ckpt"))
        config = projector.ProjectorConfig()
        points = config.embeddings.add()
        points.tensor_name = "embeddings/.ATTRIBUTES/VARIABLE_VALUE"
        points.metadata_path = "metadata.tsv"
        points.sprite.image_path = "sprite.png"
        points.sprite.single_image_dim.extend(self.images.shape[1:3])
        centres_config = config.embeddings.add()
        centres_config.tensor_name = "class_centres/.ATTRIBUTES/VARIABLE_VALUE"
        centres_config.metadata_path = "centres.tsv"
        projector.visualize_embeddings(self.log_dir, config)
        # TensorBoard lists a folder as a run only once it holds an event file.
        with tf.summary.create_file_writer(self.log_dir).as_default():
            tf.summary.scalar("projector/points", len(self.labels), step=step)
            tf.summary.scalar("projector/mean_angle_to_centre", float(np.mean(angles)),
                              step=step)
        self.written_at = step
