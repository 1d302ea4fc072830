"""Keras callbacks of a run: resume, lookahead, throughput, embedding
projector."""

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tfmargin.atomic import atomic_file


class ResumeEpoch(keras.callbacks.Callback):
    """Tells the training pipeline which epoch a (resumed) run starts at.

    ``first_epoch`` is a ``tf.Variable`` the pipeline reads as it makes
    batches (``tfmargin.data.epoch_permutations``); at the start of training,
    after ``BackupAndRestore`` (listed before this callback) has restored the
    optimizer, it is set to ``iterations // steps_per_epoch``. Without it a
    resumed run would start over at epoch 0's permutation and augmentation.
    """

    def __init__(self, steps_per_epoch, printer=print):
        super().__init__()
        self.steps_per_epoch = int(steps_per_epoch)
        self.first_epoch = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.printer = printer

    def on_train_begin(self, logs=None):
        step = int(ops.convert_to_numpy(self.model.optimizer.iterations))
        self.first_epoch.assign(step // self.steps_per_epoch)
        if step:
            self.printer(f"resuming at epoch {step // self.steps_per_epoch + 1} (the epochs "
                         "before it were restored from the run's backup)", flush=True)


class Lookahead(keras.callbacks.Callback):
    """Lookahead averaging of every float weight, BatchNorm statistics included (airbench).

    Every ``every`` optimizer steps: ``slow <- decay * slow + (1 - decay) *
    fast``, then the model's (fast) weights are reset to ``slow``. With
    ``steps_per_execution`` > 1 Keras calls batch callbacks once per execution,
    so the update comes at the first call after each multiple of ``every``
    (``RunConfig.validate`` keeps executions no longer than ``every`` steps, so
    none is skipped). ``decay``
    ramps up cubically, ``base**every * (step / total_steps)**3``, so early
    training is barely averaged and the end strongly. When training ends the
    model holds the slow weights. The slow weights are written to
    ``state_path`` at every epoch end (atomically, with their step), so a run
    resumed by ``BackupAndRestore`` (listed before this callback) continues
    them; a missing or stale file restarts them from the restored weights.

    Args:
        total_steps: optimizer steps of the whole run.
        every: steps between updates.
        base: per-step decay at the end of the ramp (airbench: 0.95).
        state_path: where the slow weights are kept (``.npz``), or None.
    """

    def __init__(self, total_steps, every=5, base=0.95, state_path=None):
        super().__init__()
        self.total_steps, self.every, self.base = int(total_steps), int(every), float(base)
        self.state_path = state_path
        self.slow = None
        self.updates = 0  # multiples of ``every`` passed so far

    def decay(self, step):
        return self.base**self.every * (step / self.total_steps) ** 3

    def _step(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def _weights(self):
        return [w for w in self.model.weights if "float" in str(w.dtype)]

    def on_train_begin(self, logs=None):
        step = self._step()
        self.updates = step // self.every
        self.slow = [ops.convert_to_numpy(w) for w in self._weights()]
        if self.state_path and os.path.exists(self.state_path):
            with np.load(self.state_path) as saved:
                if int(saved["step"]) == step and len(saved.files) - 1 == len(self.slow):
                    self.slow = [saved[f"w{i}"] for i in range(len(self.slow))]

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step // self.every > self.updates:
            self.updates = step // self.every
            self.update(self.decay(self.updates * self.every))

    def update(self, decay):
        for i, weight in enumerate(self._weights()):
            self.slow[i] = decay * self.slow[i] + (1.0 - decay) * ops.convert_to_numpy(weight)
            weight.assign(self.slow[i])

    def on_epoch_end(self, epoch, logs=None):
        if self.state_path:
            step = self._step()
            with atomic_file(self.state_path) as tmp, open(tmp, "wb") as f:
                np.savez(f, step=step, **{f"w{i}": w for i, w in enumerate(self.slow)})

    def on_train_end(self, logs=None):
        self.update(1.0)  # the model ends on the slow weights


class Throughput(keras.callbacks.Callback):
    """Training images/s, timing only the training part of each epoch; after each epoch
    (and once early in the first) it prints when the whole run should end."""

    def __init__(self, global_batch, epochs=None, printer=print):
        super().__init__()
        self.global_batch = global_batch
        self.epochs = epochs
        self.printer = printer
        self.started = None
        self.seconds = 0.0
        self.batches = 0
        self.epoch_start = self.last_batch_end = 0.0
        self.epoch_batches = 0

    def on_train_begin(self, logs=None):
        self.started = time.perf_counter()
        self.first_epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        if self.first_epoch is None:
            self.first_epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if batch == 0:
            self.epoch_start = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        self.last_batch_end = time.perf_counter()
        self.epoch_batches = batch + 1
        steps = self.params.get("steps") if self.params else None
        if steps and self.batches == 0 and batch + 1 == max(steps // 10, 2) < steps:
            self.report_eta(epoch_fraction=(batch + 1) / steps)

    def on_epoch_end(self, epoch, logs=None):
        self.seconds += self.last_batch_end - self.epoch_start
        self.batches += self.epoch_batches
        if self.epochs and epoch + 1 < self.epochs:
            self.report_eta(epochs_done=epoch + 1)

    def report_eta(self, epochs_done=None, epoch_fraction=0.0):
        """Print the estimated end of the run from the pace of this process so far."""
        if not self.epochs or self.first_epoch is None:
            return
        done = (epochs_done if epochs_done is not None else self.first_epoch) + epoch_fraction
        elapsed = time.perf_counter() - self.started
        remaining = elapsed / max(done - self.first_epoch, 1e-9) * (self.epochs - done)
        end = time.strftime("%H:%M", time.localtime(time.time() + remaining))
        # Keras's progress bar (verbose 1) holds the line without a newline: start our own.
        start = "\n" if (self.params or {}).get("verbose") == 1 else ""
        self.printer(f"{start}run: {done:.1f}/{self.epochs} epochs, about "
                     f"{format_duration(remaining)} to go (ends near {end})", flush=True)

    @property
    def images_per_second(self):
        return self.batches * self.global_batch / self.seconds if self.seconds else 0.0


def format_duration(seconds):
    """``"1 h 05 min"``, ``"12 min"``, ``"40 s"``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 60 else f"{seconds} s"


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
