"""A run's progress: the epoch it resumes at, its training images/s, and when it should end."""

import time

import keras
import tensorflow as tf
from keras import ops


class ResumeEpoch(keras.callbacks.Callback):
    """Tells the training pipeline which epoch a (resumed) run starts at.

    ``first_epoch`` is a ``tf.Variable`` the pipeline reads as it makes
    batches (``tfmargin.pipeline.epoch_permutations``); at the start of training,
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


