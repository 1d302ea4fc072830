"""One training run: data, models, ``model.fit`` under a tf.distribute strategy, metrics.

``train`` reads as the run's data flow: load the splits, build and compile the
models, fit (the validation split picks what is chosen), recalibrate
BatchNorm, evaluate (the test split, once), save and export. Everything a run
writes goes to ``runs/<name>/``: ``config.json``, ``metrics.json``,
``log.csv``, TensorBoard ``logs/``, ``checkpoints/``, ``inference.keras`` and
``test_predictions.npz``.
"""

import json
import math
import os
import shutil
import time

import keras
import numpy as np
import tensorflow as tf

from tfmargin.airbench import PatchWhitening
from tfmargin.atomic import atomic_file, check_writable
from tfmargin.callbacks import BestWeights, EmbeddingProjector, ResumeEpoch, Throughput
from tfmargin.config import ADDED_LATER, ConfigError, RunConfig
from tfmargin.data import channel_statistics, load_dataset, make_pipeline
from tfmargin.export import export_models
from tfmargin.heads import TargetAngle
from tfmargin.metrics import classification_metrics, retrieval_metrics, save_prediction_summary
from tfmargin.models import build_models
from tfmargin.recipes import (
    REFERENCE_BATCH,
    make_optimizer,
    peak_learning_rate,
    recipe_callbacks,
)
from tfmargin.tta import tta_logits

__all__ = ["ConfigError", "RunConfig", "TrainingDiverged", "train"]
METRIC_KEYS = ("top1", "top5", "mAP", "precision_at_1", "map_at_r")


class TrainingDiverged(RuntimeError):
    """The loss became NaN; the message names the epoch and what to try."""


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


def compile_models(models, config, steps_per_epoch, global_batch=REFERENCE_BATCH):
    """Compile the training model as ``train`` does: the recipe's optimizer, losses, metrics."""
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
        metrics = {"plain": [*metrics, TargetAngle(models.head.scale)]}
    models.train.compile(optimizer=make_optimizer(config, steps_per_epoch, global_batch),
                         loss=loss, loss_weights=loss_weights,
                         metrics=metrics, jit_compile=config.jit_compile,
                         steps_per_execution=config.steps_per_execution)


def soft_targets(config):
    return bool(config.label_smoothing) or config.mix != "none"


def make_datasets(config, data, uses_label_input, global_batch, first_epoch=None):
    """Training and validation batches in the form the compiled training model takes;
    ``first_epoch``: see ``tfmargin.data.epoch_permutations``."""
    def to_targets(inputs, labels):
        y = labels
        if soft_targets(config) and labels.dtype.is_integer:
            y = tf.one_hot(labels, data.num_classes)
        return inputs, ({"margin": y, "plain": y} if uses_label_input else y)

    pipeline = dict(batch_size=global_batch, with_label_input=uses_label_input)
    train_ds = make_pipeline(data.train, training=True, augment=config.augment,
                             seed=config.seed, mix=config.mix, num_classes=data.num_classes,
                             epochs=config.epochs, first_epoch=first_epoch, **pipeline)
    if data.val is None:  # --val-split 0
        return train_ds.map(to_targets), None
    val_ds = make_pipeline(data.val, training=False, **pipeline)
    return train_ds.map(to_targets), val_ds.map(to_targets)


def predict_split(model, split, batch_size, tta=0):
    """Logits, embeddings and labels of a split, each batch's outputs with its own labels.

    ``model``: ``Models.evaluation_model()``. A plain per-batch loop on this
    worker (no distributed ``predict``, whose gathered order need not match a
    separate pass over the labels). ``tta > 0``: also the logits averaged over
    the test-time augmentation views (``tfmargin.tta``), else None.
    """
    def outputs(x):
        x = tf.cast(x, tf.float32)
        logits, embedding = model(x, training=False)
        averaged = tta_logits(lambda v: model(v, training=False)[0], x, tta, plain=logits) \
            if tta else logits
        return logits, embedding, averaged

    step = tf.function(outputs, reduce_retracing=True)
    columns = [[], [], [], []]
    for x, y in split.batch(batch_size).prefetch(2):
        for column, value in zip(columns, (*step(x), y), strict=True):
            column.append(value.numpy())
    logits, embeddings, averaged, labels = (np.concatenate(c) for c in columns)
    return logits, embeddings, labels, averaged if tta else None


def evaluate_split(model, split, batch_size, tta=0):
    """Classification and retrieval metrics of a split (with ``tta``: and ``metrics["tta"]``
    from the averaged logits), plus its logits and labels."""
    logits, embeddings, labels, averaged = predict_split(model, split, batch_size, tta)
    metrics = classification_metrics(logits, labels) | retrieval_metrics(embeddings, labels)
    if tta:
        metrics["tta"] = classification_metrics(averaged, labels) | {"level": tta}
    return metrics, logits, labels


def layers_of(model, layer_class):
    """Every layer of ``layer_class`` in ``model``, nested models included (through the
    public ``Model.layers``: our backbones and heads are functional models of plain layers)."""
    found = []
    for layer in model.layers:
        if isinstance(layer, layer_class):
            found.append(layer)
        if isinstance(layer, keras.Model):
            found.extend(layers_of(layer, layer_class))
    return found


def recalibrate_batchnorm(model, images, num_batches=20):
    """Replace every BatchNorm's moving statistics by exact averages over batches.

    "Precise BN" (Wu & Johnson, 2021): after a short run, exponential moving
    averages still carry their initial values and those of much older
    weights, so inference-mode outputs drift from training-mode ones. This
    recomputes them as the plain mean over ``num_batches`` batches of
    un-augmented training ``images`` (what inference sees) under the final
    weights. Trainable weights are untouched.
    """
    layers_bn = layers_of(model, keras.layers.BatchNormalization)
    if not layers_bn:
        return 0
    momenta = [layer.momentum for layer in layers_bn]
    seen = 0
    try:
        for seen, batch in enumerate(images.take(num_batches)):
            for layer in layers_bn:
                layer.momentum = seen / (seen + 1.0)  # running mean of per-batch statistics
            model(tf.cast(batch, tf.float32), training=True)
    finally:
        for layer, momentum in zip(layers_bn, momenta, strict=True):
            layer.momentum = momentum
    return seen + 1


def prepare_run_dir(config, resume=False, overwrite=False):
    """``runs/<name>``; returns ``(run_dir, finished)``.

    A directory made with other settings is refused (named setting by
    setting) unless ``overwrite``; a finished one needs ``resume`` to be
    reported again or ``overwrite`` to be trained again.
    """
    run_dir = os.path.join(config.runs_dir, config.run_name())
    config_path = os.path.join(run_dir, "config.json")
    if os.path.exists(config_path) and not overwrite:
        with open(config_path) as f:
            differences = config.differences(json.load(f))
        if differences:
            raise ConfigError(f"run directory {run_dir!r} was made with other settings ("
                              f"{'; '.join(differences)}); pass another --name, or "
                              "--overwrite to replace it")
    finished = os.path.exists(os.path.join(run_dir, "metrics.json"))
    if finished and not (resume or overwrite):
        raise ConfigError(f"run directory {run_dir!r} already holds a finished run; pass "
                          "--resume to keep it or --overwrite to train again")
    return run_dir, finished and resume


def load_run_data(config, global_batch):
    """The run's splits, checked against the head and the batch size."""
    data = load_dataset(config.dataset, config.image_size, config.limit_train or None,
                        config.val_split, config.test_split, config.seed)
    if config.loss != "softmax":
        config.check_head(data.num_classes)  # e.g. scale="auto" on a 2-class folder
    if data.train_size < global_batch:
        raise ConfigError(f"the training split has {data.train_size} images, fewer than one "
                          f"global batch of {global_batch}; lower --batch-size")
    return data


def adapt_whitening(models, split, num_images=5000):
    """Fit every ``PatchWhitening`` layer on the first ``num_images`` training images,
    normalised as the model normalises them (airbench uses 5,000)."""
    layers_w = layers_of(models.embedding, PatchWhitening)
    if layers_w:
        images = np.concatenate([x.numpy() for x, _ in split.take(num_images).batch(1024)])
        normalized = models.embedding.get_layer("normalize")(images.astype("float32"))
        for layer in layers_w:  # the whitening layer is the backbone's first
            layer.adapt(normalized)
    return len(layers_w)


def build_run_models(config, data, strategy, global_batch):
    """Models with normalisation statistics (and whitening filters) from the training
    images, compiled."""
    mean, variance = channel_statistics(data.train)
    with strategy.scope():
        models = build_models(config.backbone, data.num_classes, config.loss, config.image_size,
                              config.embedding_dim, config.scale, config.margin,
                              config.fallback, config.sub_centers, config.ce_weight, mean,
                              variance)
        adapt_whitening(models, data.train)
        compile_models(models, config, data.train_size // global_batch, global_batch)
    return models


def start_run_dir(config, run_dir, overwrite, data, models, strategy, global_batch):
    """Create the run directory (replacing an old one only now that data and model are
    sound) and write the resolved ``config.json``; returns it."""
    if overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    resolved = config.identity() | {key: getattr(config, key) for key in ADDED_LATER} | {
        "name": config.name, "run_dir": run_dir, "num_classes": data.num_classes,
        "class_names": data.class_names, "split_sizes": data.sizes,
        "train_size": data.train_size, "replicas": strategy.num_replicas_in_sync,
        "global_batch": global_batch, "peak_learning_rate": peak_learning_rate(
            config, global_batch), "data_source": data.source,
        "head_scale": getattr(models.head, "scale", None)}
    _write_json(os.path.join(run_dir, "config.json"), resolved)
    return resolved


def fit(config, run_dir, data, models, global_batch, projector, extra_callbacks):
    """``model.fit`` with the run's callbacks; returns ``(history, timing)``: the wall time
    and training images/s of this process's ``fit`` and the epoch it resumed at (0 when the
    run started here), so a resumed run's time is not mistaken for the whole run's."""
    steps = data.train_size // global_batch
    resume = ResumeEpoch(steps)
    train_ds, val_ds = make_datasets(config, data, models.uses_label_input, global_batch,
                                     resume.first_epoch)
    throughput = Throughput(global_batch)
    callbacks = [
        # double_checkpoint: a backup torn by a crash falls back to the one before it.
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"),
                                         double_checkpoint=True),
        resume,  # after BackupAndRestore: reads the restored step
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")),
        BestWeights(os.path.join(run_dir, "checkpoints", "best.weights.h5"),
                    "val_plain_loss" if models.uses_label_input else "val_loss"),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "log.csv"), append=True),
        keras.callbacks.TerminateOnNaN(),
        throughput,
        # After BackupAndRestore, which restores the fast weights the lookahead continues.
        *recipe_callbacks(config, config.epochs * steps, run_dir),
        *([projector] if projector else []),
        *extra_callbacks,
    ]
    start = time.perf_counter()
    history = models.train.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                               steps_per_epoch=steps, callbacks=callbacks,
                               validation_freq=config.validation_freq, shuffle=False,
                               verbose=2 if os.environ.get("CI") else 1)
    return history, {"wall_seconds": time.perf_counter() - start,
                     "train_images_per_second": throughput.images_per_second,
                     "resumed_at_epoch": int(resume.first_epoch.numpy())}


def check_diverged(history, run_dir):
    losses = history.history.get("loss", [])
    if losses and not math.isfinite(losses[-1]):
        best = os.path.join(run_dir, "checkpoints", "best.weights.h5")
        kept = f"the last good checkpoint is {best}" if os.path.exists(best) else \
            "no epoch finished before it, so there is no checkpoint"
        raise TrainingDiverged(f"loss became NaN in epoch {len(losses)}; {kept}. "
                               "Try a smaller --learning-rate or --scale.")


def evaluate(data, models, global_batch, run_dir, resolved):
    """Validation and test metrics of the final model, each also under test-time
    augmentation if ``tta``; the test split is read here only."""
    model = models.evaluation_model()
    tta = resolved["tta"]
    metrics, logits, labels = evaluate_split(model, data.test, global_batch, tta)
    save_prediction_summary(run_dir, logits, labels, resolved["head_scale"])
    if data.val is not None:
        metrics["val"] = evaluate_split(model, data.val, global_batch, tta)[0]
    return metrics | {"test_size": int(len(labels))}


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
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    data = load_run_data(config, global_batch)
    models = build_run_models(config, data, strategy, global_batch)
    resolved = start_run_dir(config, run_dir, overwrite, data, models, strategy, global_batch)
    projector = EmbeddingProjector(
        # Without a validation split (--val-split 0) it shows training images.
        os.path.join(run_dir, "logs", "projector"), models,
        data.train if data.val is None else data.val, data.class_names,
        config.projector_samples, config.projector_every) if config.projector_samples else None

    history, timing = fit(config, run_dir, data, models, global_batch, projector, callbacks)
    check_diverged(history, run_dir)
    if config.precise_bn_batches:
        recalibrate_batchnorm(models.embedding, data.train.batch(global_batch).map(
            lambda x, y: x), config.precise_bn_batches)
    if projector:  # after recalibration: it embeds in inference mode
        projector.write(config.epochs)
    metrics = evaluate(data, models, global_batch, run_dir, resolved)
    train_accuracy = history.history.get(
        "plain_accuracy" if models.uses_label_input else "accuracy", [None])
    metrics |= {"epochs": config.epochs, **timing,
                "train_accuracy_last_epoch": train_accuracy[-1]}
    with atomic_file(os.path.join(run_dir, "inference.keras")) as tmp:
        models.inference.save(tmp)
    if config.export_formats():
        metrics["export"] = export_models(
            models, data.class_names, os.path.join(config.export_dir, config.run_name()),
            config.export_formats(), config.image_size, config.tta)
    log_hparams(os.path.join(run_dir, "logs"), resolved, metrics)
    _write_json(os.path.join(run_dir, "metrics.json"), metrics)
    return metrics


HPARAM_KEYS = ("backbone", "loss", "recipe", "tta", "scale", "margin", "fallback", "ce_weight",
               "dataset", "epochs", "global_batch", "limit_train", "learning_rate", "optimizer",
               "weight_decay", "seed")


def log_hparams(log_dir, resolved, metrics):
    """One HParams session per run: its settings and final validation and test metrics."""
    from tensorboard.plugins.hparams import api as hp

    hparams = {key: resolved[key] if isinstance(resolved[key], (int, float, bool))
               else str(resolved[key]) for key in HPARAM_KEYS}
    with tf.summary.create_file_writer(os.path.join(log_dir, "hparams")).as_default():
        hp.hparams(hparams, trial_id=os.path.basename(resolved["run_dir"]))
        for key in METRIC_KEYS:
            tf.summary.scalar(f"test/{key}", metrics[key], step=resolved["epochs"])
            if "val" in metrics:
                tf.summary.scalar(f"val/{key}", metrics["val"][key], step=resolved["epochs"])
        if "tta" in metrics:
            tf.summary.scalar("test/tta_top1", metrics["tta"]["top1"], step=resolved["epochs"])
