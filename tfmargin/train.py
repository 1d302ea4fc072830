"""One training run: data, models, ``model.fit`` under a tf.distribute strategy, metrics.

Everything a run writes goes to ``runs/<name>/``: ``config.json``,
``metrics.json``, ``log.csv``, TensorBoard ``logs/``, ``checkpoints/``,
``inference.keras`` and ``test_predictions.npz``.
"""

import dataclasses
import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from tfmargin.atomic import atomic_file, check_writable
from tfmargin.callbacks import (
    AtomicModelCheckpoint,
    EmbeddingProjector,
    PreciseBatchNorm,
    Throughput,
)
from tfmargin.data import AUGMENTATIONS, MIXES, load_dataset, make_pipeline
from tfmargin.export import EXPORT_FORMATS, export_models
from tfmargin.margins import FALLBACKS, check_head_arguments
from tfmargin.metrics import classification_metrics, save_prediction_summary
from tfmargin.models import LOSSES, build_models

STRATEGIES = ("mirrored", "default", "multiworker")
OPTIMIZERS = ("sgd", "adamw")


class ConfigError(ValueError):
    """An impossible run configuration, with a message saying how to fix it."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN; the message names the epoch and what to try."""


@dataclasses.dataclass
class RunConfig:
    backbone: str = "mobilenetv2"
    loss: str = "arcface"
    dataset: str = "cifar10"
    epochs: int = 30
    batch_size: int = 128  # per replica
    scale: object = 16.0  # float or "auto"
    margin: object = 0.2
    fallback: str = "monotonic"
    sub_centers: int = 1
    ce_weight: float = 0.0
    embedding_dim: int = 512
    optimizer: str = "sgd"
    learning_rate: float = 0.05  # for a global batch of 128; see docs/results.md
    weight_decay: float = 5e-4
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: str = "standard"
    mix: str = "none"
    mixed_precision: bool = False
    jit_compile: bool = False
    steps_per_execution: int = 1
    strategy: str = "mirrored"
    limit_train: int = 0
    precise_bn_batches: int = 20
    validation_freq: int = 1
    val_split: float = 0.1
    image_size: int = 32
    seed: int = 0
    deterministic: bool = False
    projector_samples: int = 1000
    projector_every: int = 0
    export: str = "savedmodel,keras"
    export_dir: str = "saved_models"
    name: str = ""
    runs_dir: str = "runs"

    def export_formats(self):
        return tuple(f for f in self.export.split(",") if f and f != "none")

    def run_name(self):
        if self.name:
            return self.name
        data = os.path.basename(os.path.normpath(self.dataset))
        head = self.loss
        if self.loss != "softmax":
            margin = "-".join(str(m) for m in self.margin) if isinstance(
                self.margin, (list, tuple)) else self.margin
            head += f"-s{self.scale}-m{margin}-{self.fallback}"
            if self.ce_weight:
                head += f"-ce{self.ce_weight}"
        budget = f"e{self.epochs}" + (f"-n{self.limit_train}" if self.limit_train else "")
        return f"{data}-{self.backbone}-{head}-{budget}"

    def validate(self):
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        from tfmargin.backbones import BACKBONES

        need(self.backbone in BACKBONES,
             f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        need(self.loss in LOSSES, f"unknown loss {self.loss!r}; choose one of {', '.join(LOSSES)}")
        need(self.fallback in FALLBACKS,
             f"unknown fallback {self.fallback!r}; choose one of {', '.join(FALLBACKS)}")
        need(self.optimizer in OPTIMIZERS,
             f"unknown optimizer {self.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
        need(self.strategy in STRATEGIES,
             f"unknown strategy {self.strategy!r}; choose one of {', '.join(STRATEGIES)}")
        need(self.augment in AUGMENTATIONS,
             f"unknown augmentation {self.augment!r}; choose one of {', '.join(AUGMENTATIONS)}")
        need(self.mix in MIXES, f"unknown mix {self.mix!r}; choose one of {', '.join(MIXES)}")
        need(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        need(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        need(self.steps_per_execution >= 1,
             f"--steps-per-execution must be >= 1, got {self.steps_per_execution}")
        need(self.embedding_dim >= 1 or self.embedding_dim == 0,
             f"--embedding-dim must be >= 1 (0: pooled features), got {self.embedding_dim}")
        need(self.learning_rate > 0, f"--learning-rate must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        unknown = set(self.export_formats()) - set(EXPORT_FORMATS)
        need(not unknown, f"unknown --export format(s) {', '.join(sorted(unknown))}; choose "
             f"from {', '.join(EXPORT_FORMATS)} (comma-separated) or none")
        need(self.projector_samples >= 0,
             f"--projector-samples must be >= 0, got {self.projector_samples}")
        need(self.precise_bn_batches >= 0,
             f"--precise-bn-batches must be >= 0, got {self.precise_bn_batches}")
        need(self.validation_freq >= 1,
             f"--validation-freq must be >= 1, got {self.validation_freq}")
        need(self.limit_train >= 0, f"--limit-train must be >= 0, got {self.limit_train}")
        need(self.image_size >= 32, f"--image-size must be >= 32, got {self.image_size}")
        if self.loss != "softmax":
            try:  # the head's own checks, before any data is read or TF starts
                check_head_arguments(1000, self.loss, self.margin, self.scale, self.fallback,
                                     self.sub_centers)
            except ValueError as error:
                raise ConfigError(str(error)) from None
            need(0 <= self.ce_weight < 1, f"--ce-weight must be in [0, 1), got {self.ce_weight}")


def make_strategy(name):
    """``mirrored``: all visible GPUs (all logical CPUs when there is no GPU)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "multiworker":
        if "TF_CONFIG" not in os.environ:
            raise ConfigError("--strategy multiworker needs TF_CONFIG set on every worker "
                              "(see README, 'Fault tolerance and scaling out')")
        from tfmargin.multiworker import patch_keras

        patch_keras()  # until keras-team/keras#20585 is fixed
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)


def _write_json(path, data):
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def set_precision(config):
    """Global dtype policy: float16 on GPU, bfloat16 on CPU with --mixed-precision."""
    mixed = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    keras.config.set_dtype_policy(mixed if config.mixed_precision else "float32")


def build_run_models(config, num_classes):
    """``build_models`` with a run's settings; call inside the strategy's scope."""
    try:  # e.g. scale="auto" on a 2-class folder
        return build_models(config.backbone, num_classes, config.loss, config.image_size,
                            config.embedding_dim, config.scale, config.margin, config.fallback,
                            config.sub_centers, config.ce_weight)
    except ValueError as error:
        raise ConfigError(str(error)) from None


def compile_models(models, config, steps_per_epoch):
    """Compile the training model as ``train`` does: schedule, optimizer, losses, metrics."""
    total = steps_per_epoch * config.epochs
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else config.learning_rate, max(total - warmup, 1),
        warmup_target=config.learning_rate if warmup else None, warmup_steps=warmup)
    if config.optimizer == "sgd":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True,
                                         weight_decay=config.weight_decay)
    else:
        optimizer = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
    # Decay on BatchNorm parameters and biases only fights the normalisation.
    optimizer.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
    if soft_targets(config):
        loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                    label_smoothing=config.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
                   keras.metrics.TopKCategoricalAccuracy(5, name="top5")]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                   keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]
    loss_weights = None
    if models.uses_label_input:
        loss = {"margin": loss, "plain": loss}
        loss_weights = {"margin": 1.0 - config.ce_weight, "plain": config.ce_weight}
        metrics = {"plain": metrics}
    models.train.compile(optimizer=optimizer, loss=loss, loss_weights=loss_weights,
                         metrics=metrics, jit_compile=config.jit_compile,
                         steps_per_execution=config.steps_per_execution)


def soft_targets(config):
    return bool(config.label_smoothing) or config.mix != "none"


def make_datasets(config, data, models, global_batch):
    """Training and validation batches in the form the compiled training model takes."""
    multi = models.uses_label_input

    def to_targets(inputs, labels):
        y = labels
        if soft_targets(config) and labels.dtype.is_integer:
            y = tf.one_hot(labels, data.num_classes)
        return inputs, ({"margin": y, "plain": y} if multi else y)

    pipeline = dict(batch_size=global_batch, with_label_input=multi)
    train_ds = make_pipeline(data.train, training=True, augment=config.augment,
                             seed=config.seed, mix=config.mix, num_classes=data.num_classes,
                             **pipeline)
    test_ds = make_pipeline(data.test, training=False, **pipeline)
    return train_ds.map(to_targets), test_ds.map(to_targets)


def predict_scores(model, split, batch_size):
    """Logits and labels of a split through the label-free inference model."""
    batches = split.batch(batch_size).map(lambda x, y: (tf.cast(x, tf.float32), y))
    scores = model.predict(batches.map(lambda x, y: x), verbose=0)
    labels = np.concatenate([y.numpy() for _, y in batches])
    return scores, labels


def prepare_run_dir(config, resume=False, overwrite=False):
    """``runs/<name>``: refuses to silently replace a finished run."""
    run_dir = os.path.join(config.runs_dir, config.run_name())
    finished = os.path.exists(os.path.join(run_dir, "metrics.json"))
    if finished and not (resume or overwrite):
        raise ConfigError(f"run directory {run_dir!r} already holds a finished run; pass "
                          "--resume to keep it or --overwrite to train again")
    return run_dir, finished and resume


def train(config, resume=False, overwrite=False, callbacks=()):
    """Train and evaluate one run; returns the final metrics dict."""
    config.validate()
    run_dir, already_done = prepare_run_dir(config, resume, overwrite)
    if already_done:
        with open(os.path.join(run_dir, "metrics.json")) as f:
            return json.load(f)
    check_writable(config.runs_dir, "--runs-dir")
    if config.export_formats():
        check_writable(config.export_dir, "--export-dir")
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
    strategy = make_strategy(config.strategy)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    set_precision(config)
    replicas = strategy.num_replicas_in_sync
    global_batch = config.batch_size * replicas
    data = load_dataset(config.dataset, config.image_size, config.limit_train or None,
                        config.val_split, config.seed)
    steps_per_epoch = data.train_size // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"the training split has {data.train_size} images, fewer than one "
                          f"global batch of {global_batch}; lower --batch-size")
    with strategy.scope():
        models = build_run_models(config, data.num_classes)
        compile_models(models, config, steps_per_epoch)
    multi = models.uses_label_input
    train_ds, test_ds = make_datasets(config, data, models, global_batch)

    if overwrite and os.path.isdir(run_dir):  # only now that data and model are sound
        shutil.rmtree(run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    resolved = dataclasses.asdict(config) | {
        "run_dir": run_dir, "num_classes": data.num_classes, "class_names": data.class_names,
        "train_size": data.train_size, "test_size": data.test_size, "replicas": replicas,
        "global_batch": global_batch, "data_source": data.source,
        "head_scale": getattr(models.head, "scale_value", None)}
    _write_json(os.path.join(run_dir, "config.json"), resolved)
    # Lowest validation loss: a NaN never compares as better, so a diverged
    # epoch cannot replace the last good checkpoint.
    monitor = "val_plain_loss" if multi else "val_loss"
    throughput = Throughput(global_batch)
    all_callbacks = [
        # double_checkpoint: a backup torn by a crash falls back to the one before it.
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"),
                                         double_checkpoint=True),
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")),
        AtomicModelCheckpoint(os.path.join(run_dir, "checkpoints", "best.weights.h5"),
                              monitor=monitor, mode="min", save_best_only=True,
                              initial_value_threshold=math.inf, save_weights_only=True),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "log.csv"), append=True),
        keras.callbacks.TerminateOnNaN(),
        throughput,
    ]
    if config.precise_bn_batches:
        images = train_ds.map(lambda inputs, y: inputs["image"] if isinstance(inputs, dict)
                              else inputs)
        all_callbacks.append(PreciseBatchNorm(models.embedding, images,
                                              config.precise_bn_batches))
    if config.projector_samples:  # after PreciseBatchNorm: it embeds in inference mode
        all_callbacks.append(EmbeddingProjector(
            os.path.join(run_dir, "logs", "projector"), models, data.test, data.class_names,
            config.projector_samples, config.projector_every))
    all_callbacks += list(callbacks)
    start = time.perf_counter()
    history = models.train.fit(train_ds, validation_data=test_ds, epochs=config.epochs,
                               steps_per_epoch=steps_per_epoch, callbacks=all_callbacks,
                               validation_freq=config.validation_freq, shuffle=False,
                               verbose=2 if os.environ.get("CI") else 1)
    wall = time.perf_counter() - start
    losses = history.history.get("loss", [])
    if losses and not math.isfinite(losses[-1]):
        # The backup holds the diverged weights: a rerun must not resume from them.
        shutil.rmtree(os.path.join(run_dir, "backup"), ignore_errors=True)
        best = os.path.join(run_dir, "checkpoints", "best.weights.h5")
        kept = f"the last good checkpoint is {best}" if os.path.exists(best) else \
            "no epoch finished before it, so there is no checkpoint"
        raise TrainingDiverged(f"loss became NaN in epoch {len(losses)}; {kept}. "
                               "Try a smaller --learning-rate or --scale.")
    scores, labels = predict_scores(models.inference, data.test, global_batch)
    metrics = classification_metrics(scores, labels)
    train_accuracy = history.history.get("plain_accuracy" if multi else "accuracy", [None])
    metrics.update(
        epochs=config.epochs, wall_seconds=wall, train_images_per_second=
        throughput.images_per_second, train_accuracy_last_epoch=train_accuracy[-1],
        test_size=int(len(labels)))
    with atomic_file(os.path.join(run_dir, "inference.keras")) as tmp:
        models.inference.save(tmp)
    save_prediction_summary(run_dir, scores, labels, resolved["head_scale"])
    if config.export_formats():
        metrics["export"] = export_models(
            models, data.class_names, os.path.join(config.export_dir, config.run_name()),
            config.export_formats(), config.image_size)
    log_hparams(os.path.join(run_dir, "logs"), resolved, metrics)
    _write_json(os.path.join(run_dir, "metrics.json"), metrics)
    return metrics


HPARAM_KEYS = ("backbone", "loss", "scale", "margin", "fallback", "ce_weight", "dataset",
               "epochs", "global_batch", "limit_train", "learning_rate", "optimizer")


def log_hparams(log_dir, resolved, metrics):
    """One HParams session per run: its settings and final test metrics."""
    from tensorboard.plugins.hparams import api as hp

    hparams = {key: resolved[key] if isinstance(resolved[key], (int, float, bool))
               else str(resolved[key]) for key in HPARAM_KEYS}
    with tf.summary.create_file_writer(os.path.join(log_dir, "hparams")).as_default():
        hp.hparams(hparams, trial_id=os.path.basename(resolved["run_dir"]))
        for key in ("top1", "top5", "mAP"):
            tf.summary.scalar(f"test/{key}", metrics[key], step=resolved["epochs"])
