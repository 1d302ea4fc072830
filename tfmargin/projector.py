"""The TensorBoard embedding projector: validation images and class centres, L2-normalised,
with thumbnails and metadata."""

import math
import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfmargin.atomic import atomic_file


def stratified_sample(split, num_samples, num_classes, seed=0):
    """Up to ``num_samples`` (image, label) pairs, about equally many per class.

    Reads the labels first and keeps only the chosen images, so the split is
    never held in memory whole.
    """
    labels = np.array([int(y) for y in split.map(lambda x, y: y)])
    rng = np.random.default_rng(seed)
    per_class = max(1, num_samples // num_classes)
    index = np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)])
    chosen = set(np.sort(index)[:num_samples].tolist())
    images = [x.numpy() for i, (x, _) in enumerate(split) if i in chosen]
    return np.stack(images), labels[sorted(chosen)]


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


def angle_to_nearest_centre(embeddings, centres, labels):
    """Degrees between each normalised embedding and the nearest of its class's K centres
    (``centres``: (C, K, D), normalised), as the head takes the max over sub-centres."""
    cosine = np.einsum("nd,nkd->nk", embeddings, centres[labels]).max(axis=1)
    return np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0)))


class EmbeddingProjector(keras.callbacks.Callback):
    """Writes L2-normalised embeddings and class centres for TensorBoard's projector.

    Every ``every`` epochs if > 0, and when ``write`` is called (``train``
    calls it after recalibrating BatchNorm), it embeds a fixed stratified
    sample of validation images and writes, into ``log_dir`` (a run of its
    own, ``<run>/logs/projector``): a checkpoint with tensors ``embeddings``
    (N x D) and ``class_centres`` (C*K x D, the head's normalised class
    weights, K sub-centres per class), ``metadata.tsv`` (class, label,
    predicted, correct, angle to the nearest centre of the true class in
    degrees), ``centres.tsv``, ``sprite.png`` and ``projector_config.pbtxt``.
    Points and centres lie on the same sphere.

    ``models``: anything with ``embedding`` (image -> embedding model) and
    ``head`` (``ArcMarginLayer`` or Dense), such as a ``MarginClassifier``.
    ``split``: ``(image, label)`` pairs, unbatched.
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

    def class_centres(self):
        """(C, K, D) normalised centres; a Dense head's columns count as K = 1."""
        kernel = ops.convert_to_numpy(self.models.head.kernel)
        sub_centers = getattr(self.models.head, "sub_centers", 1)
        return normalize_rows(kernel.T.reshape(len(self.class_names), sub_centers, -1))

    def write(self, step):
        from PIL import Image
        from tensorboard.plugins import projector

        os.makedirs(self.log_dir, exist_ok=True)
        raw = self.models.embedding.predict(self.images.astype("float32"), verbose=0)
        # The head on the embeddings: one backbone pass serves points and predictions.
        predicted = np.argmax(ops.convert_to_numpy(self.models.head(raw)), axis=1)
        embeddings = normalize_rows(raw)
        centres = self.class_centres()
        angles = angle_to_nearest_centre(embeddings, centres, self.labels)
        sub_centers = centres.shape[1]
        centres = centres.reshape(-1, centres.shape[-1])
        with atomic_file(os.path.join(self.log_dir, "metadata.tsv")) as tmp, open(tmp, "w") as f:
            f.write("class\tlabel\tpredicted\tcorrect\tangle_to_centre\n")
            for y, p, a in zip(self.labels, predicted, angles, strict=True):
                f.write(f"{self.class_names[y]}\t{y}\t{self.class_names[p]}\t{int(y == p)}"
                        f"\t{a:.2f}\n")
        with atomic_file(os.path.join(self.log_dir, "centres.tsv")) as tmp, open(tmp, "w") as f:
            f.write("class\tsub_centre\n" + "".join(
                f"{name}\t{k}\n" for name in self.class_names for k in range(sub_centers)))
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
