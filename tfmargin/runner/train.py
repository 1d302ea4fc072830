"""One training run: data, the ``MarginClassifier``, ``model.fit`` under a tf.distribute
strategy, evaluation, export.

``train`` reads as the run's data flow: load the splits, build and compile the
model, fit, choose on the validation split (the BatchNorm statistics, the temperature, the
reject threshold), evaluate (the test split, once), record and export. Everything a run
writes goes to ``runs/<name>/``: ``config.json`` (every setting, resolved, with where the
run came from: commit, library versions, machine, data fingerprint), ``metrics.json``
(written last: a run without it is unfinished), ``log.csv``, TensorBoard ``logs/``,
``checkpoints/`` (until the run finishes), ``test_predictions.npz``, and ``inference.keras``
when no ``.keras`` export holds the model.
"""

import json
import math
import os
import shutil
import time

import keras
import tensorflow as tf

from tfmargin import quiet
from tfmargin.atomic import atomic_file, check_writable, point_latest
from tfmargin.backbones import build_backbone
from tfmargin.classifier import MarginClassifier, layers_of
from tfmargin.data import SPLIT_SEED, channel_statistics, load_dataset
from tfmargin.export import export_models
from tfmargin.metrics import save_predictions
from tfmargin.pipeline import make_pipeline
from tfmargin.projector import EmbeddingProjector
from tfmargin.runner import provenance
from tfmargin.runner.config import ConfigError
from tfmargin.runner.evaluation import evaluate, split_top1
from tfmargin.runner.far_images import far_image_sets
from tfmargin.runner.progress import ResumeEpoch, Throughput
from tfmargin.runner.recipes import make_optimizer, peak_learning_rate, recipe_callbacks

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
                              "(see docs/training.md, 'Scaling out')")
        from tfmargin.runner.multiworker import patch_keras

        patch_keras()  # until keras-team/keras#20585 is fixed
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_logical_devices("GPU")
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices)


def _write_json(path, data):
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def precision_policy(config):
    """The Keras dtype policy of a run: ``mixed_float16`` on a GPU and ``mixed_bfloat16``
    on a CPU when the run is mixed (``RunConfig.resolved_mixed_precision``), else
    ``float32``."""
    if not config.mixed_precision:
        return "float32"
    return "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"


def soft_targets(config):
    return bool(config.label_smoothing) or config.mix != "none"


def compile_model(model, config, steps_per_epoch, global_batch):
    """Compile as ``train`` does: the recipe's optimizer, the cross-entropy (categorical
    with label smoothing or mixing, else sparse), accuracy and top-5."""
    if soft_targets(config):
        loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                    label_smoothing=config.label_smoothing)
        metrics = [keras.metrics.CategoricalAccuracy(name="accuracy"),
                   keras.metrics.TopKCategoricalAccuracy(5, name="top5")]
    else:
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        metrics = [keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
                   keras.metrics.SparseTopKCategoricalAccuracy(5, name="top5")]
    model.compile(optimizer=make_optimizer(config, steps_per_epoch, global_batch), loss=loss,
                  metrics=metrics, jit_compile=config.jit_compile,
                  steps_per_execution=config.steps_per_execution)


def make_datasets(config, data, global_batch, first_epoch=None):
    """Training and validation ``(images, targets)`` batches; targets one-hot when the
    loss smooths or mixes them. ``first_epoch``: see ``tfmargin.pipeline.epoch_permutations``."""
    def to_targets(images, labels):
        if soft_targets(config) and labels.dtype.is_integer:
            labels = tf.one_hot(labels, data.num_classes)
        return images, labels

    train_ds = make_pipeline(data.train, batch_size=global_batch, training=True,
                             augment=config.augment, seed=config.seed, mix=config.mix,
                             num_classes=data.num_classes, epochs=config.epochs,
                             first_epoch=first_epoch)
    if data.val is None:  # --val-split 0
        return train_ds.map(to_targets), None
    val_ds = make_pipeline(data.val, batch_size=global_batch, training=False)
    return train_ds.map(to_targets), val_ds.map(to_targets)


def prepare_run_dir(config, overwrite=False):
    """``runs/<name>``; returns ``(run_dir, finished)``.

    A directory made with other settings is refused (named setting by
    setting) unless ``overwrite``; the same command continues an interrupted run and
    reports a finished one again (``overwrite`` trains it again).
    """
    run_dir = os.path.join(config.runs_dir, config.name)
    config_path = os.path.join(run_dir, "config.json")
    if overwrite or not os.path.exists(config_path):
        return run_dir, False
    with open(config_path) as f:
        differences = config.differences(json.load(f))
    if differences:
        raise ConfigError(f"run directory {run_dir!r} was made with other settings ("
                          f"{'; '.join(differences)}); pass another --name, or "
                          "--overwrite to replace it")
    finished = os.path.exists(os.path.join(run_dir, "metrics.json"))
    if not finished:
        print(f"continuing the interrupted run in {run_dir} (--overwrite starts it again)",
              flush=True)
    return run_dir, finished


def load_run_data(config, global_batch):
    """The run's splits, checked against the head and the batch size."""
    data = load_dataset(config.dataset, image_size=config.image_size,
                        limit_train=config.limit_train or None, val_split=config.val_split,
                        test_split=config.test_split, seed=config.seed,
                        classes=config.class_list())
    if config.loss != "softmax":
        config.check_head(data.num_classes)  # e.g. scale="auto" on a 2-class folder
    if data.train_size < global_batch:
        raise ConfigError(f"the training split has {data.train_size} images, fewer than one "
                          f"global batch of {global_batch}; lower --batch-size")
    return data


def build_run_model(config, data, strategy, global_batch):
    """The ``MarginClassifier`` of the run, with normalisation statistics (and whitening
    filters) from the training images, compiled under ``strategy``."""
    mean, variance = channel_statistics(data.train)
    with strategy.scope():
        backbone = build_backbone(config.backbone, (config.image_size, config.image_size, 3),
                                  gelu=config.gelu, batchnorm=config.batchnorm)
        model = MarginClassifier(
            backbone, data.num_classes, margin_type=config.loss, margin=config.margin,
            scale=config.scale, fallback=config.fallback, sub_centers=config.sub_centers,
            ce_weight=config.ce_weight, embedding_dim=config.embedding_dim, mean=mean,
            variance=variance, name="classifier")
        model.adapt(data.train.batch(1024).map(lambda x, y: x))
        compile_model(model, config, data.train_size // global_batch, global_batch)
    return model


# The commit of the code this process runs, read when it was imported: a process that trains
# run after run (a sweep) must not record the commit its checkout moved on to since.
CODE_AT_IMPORT = provenance.code_version()


def provenance_record(data):
    """Where the run comes from: code (as imported), libraries, machine (with the CPU
    allocator TensorFlow started with, which sets its speed), data bytes."""
    gpus = [d.name for d in tf.config.list_logical_devices("GPU")]
    return {"code": CODE_AT_IMPORT, "versions": provenance.library_versions(),
            "machine": provenance.cpu_description() | {
                "gpus": gpus, "cpu_allocator": quiet.cpu_allocator()},
            "data_fingerprint": data.fingerprint}


def start_run_dir(config, *, run_dir, overwrite, data, model, replicas, global_batch):
    """Create the run directory (replacing an old one only now that data and model are
    sound) and write the resolved ``config.json``; returns it."""
    if overwrite and os.path.isdir(run_dir):
        shutil.rmtree(run_dir)
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    resolved = config.record() | {
        "run_dir": run_dir,
        "num_classes": data.num_classes,
        "class_names": data.class_names, "split_sizes": data.sizes,
        "test_split_seed": SPLIT_SEED,
        "train_size": data.train_size, "replicas": replicas,
        "global_batch": global_batch, "peak_learning_rate": peak_learning_rate(
            config, global_batch),
        "precision_policy": keras.config.dtype_policy().name,
        "head_scale": getattr(model.head, "scale", None),
        "started_at": provenance.utc_now(), **provenance_record(data)}
    _write_json(os.path.join(run_dir, "config.json"), resolved)
    return resolved


def fit(config, *, run_dir, data, model, global_batch, projector, extra_callbacks):
    """``model.fit`` with the run's callbacks; returns ``(history, timing)``: the wall time
    and training images/s of this process's ``fit``, the epoch it resumed at (0 when the
    run started here), so a resumed run's time is not mistaken for the whole run's, and the
    share of the machine's CPU other processes used meanwhile (None off Linux), so a time
    measured beside other work is not mistaken for a speed."""
    steps = data.train_size // global_batch
    resume = ResumeEpoch(steps)
    train_ds, val_ds = make_datasets(config, data, global_batch, resume.first_epoch)
    throughput = Throughput(global_batch, config.epochs)
    callbacks = [
        # double_checkpoint: a backup torn by a crash falls back to the one before it.
        keras.callbacks.BackupAndRestore(os.path.join(run_dir, "backup"),
                                         double_checkpoint=True),
        resume,  # after BackupAndRestore: reads the restored step
        keras.callbacks.TensorBoard(os.path.join(run_dir, "logs")),
        keras.callbacks.CSVLogger(os.path.join(run_dir, "log.csv"), append=True),
        keras.callbacks.TerminateOnNaN(),
        throughput,
        # After BackupAndRestore, which restores the fast weights the lookahead continues.
        *recipe_callbacks(config, config.epochs * steps, run_dir),
        *([projector] if projector else []),
        *extra_callbacks,
    ]
    share = provenance.MachineShare()
    start = time.perf_counter()
    history = model.fit(train_ds, validation_data=val_ds, epochs=config.epochs,
                        steps_per_epoch=steps, callbacks=callbacks,
                        validation_freq=config.validation_freq, shuffle=False,
                        verbose=2 if os.environ.get("CI") else 1)
    return history, {"wall_seconds": time.perf_counter() - start,
                     "train_images_per_second": throughput.images_per_second,
                     "resumed_at_epoch": int(resume.first_epoch.numpy()),
                     "cpu_share_of_other_processes": share.others()}


FIT_RECORD = "fit.json"
TRAINED_WEIGHTS = os.path.join("checkpoints", "trained.weights.h5")


def fit_once(config, *, run_dir, model, **fit_args):
    """``fit``'s history (``{metric: [per epoch]}``) and timing, from this process or from
    the one before it. ``BackupAndRestore`` deletes its backup when ``fit`` returns, so a
    run killed while it evaluated would otherwise train again from epoch 1: the weights fit
    ended with and its history are kept (weights first; the record marks them whole) until
    ``metrics.json`` is written, and the same command then evaluates them."""
    record_path = os.path.join(run_dir, FIT_RECORD)
    weights_path = os.path.join(run_dir, TRAINED_WEIGHTS)
    if os.path.exists(record_path):
        with model.distribute_strategy.scope():  # the file holds the optimizer's state too
            model.optimizer.build(model.trainable_variables)
        model.load_weights(weights_path)
        with open(record_path) as f:
            done = json.load(f)
        return done["history"], done["timing"]
    history, timing = fit(config, run_dir=run_dir, model=model, **fit_args)
    history = {key: [float(value) for value in values]
               for key, values in history.history.items()}
    check_diverged(history)
    with atomic_file(weights_path) as tmp:
        model.save_weights(tmp)
    _write_json(record_path, {"history": history, "timing": timing})
    return history, timing


def check_diverged(history):
    losses = history.get("loss", [])
    if losses and not math.isfinite(losses[-1]):
        raise TrainingDiverged(f"loss became NaN in epoch {len(losses)}; no weights are "
                               "kept. Try a smaller --learning-rate or --scale.")


def choose_batchnorm_statistics(model, data, *, global_batch, num_batches):
    """After ``fit``, the BatchNorm statistics inference uses: the moving averages training
    left, or ``MarginClassifier.recalibrate_batchnorm`` over ``num_batches`` batches of
    un-augmented training images, whichever gives the higher validation top-1 (a tie keeps
    the moving averages). After a short fit the moving averages still hold their initial
    values and inference is near chance; after a long one on augmented images they can be
    the better ones (they were gathered on the images the weights were trained under; see
    ``docs/training.md``). Without a validation split the recalibrated ones
    are kept, unchosen. Returns what ``metrics.json`` records under ``batchnorm`` (None
    when ``num_batches`` is 0 or the model has no BatchNorm)."""
    norms = layers_of(model, keras.layers.BatchNormalization)
    if not num_batches or not norms:
        return None

    def recalibrate():
        return model.recalibrate_batchnorm(data.train.batch(global_batch).map(lambda x, y: x),
                                           num_batches)

    if data.val is None:
        return {"recalibration_batches": recalibrate(), "chosen": "recalibrated",
                "chosen_on": None}
    moving = [(layer.moving_mean.numpy(), layer.moving_variance.numpy()) for layer in norms]
    moving_top1 = split_top1(model, data.val, global_batch)
    batches = recalibrate()
    recalibrated_top1 = split_top1(model, data.val, global_batch)
    chosen = "recalibrated" if recalibrated_top1 > moving_top1 else "moving"
    if chosen == "moving":
        for layer, (mean, variance) in zip(norms, moving, strict=True):
            layer.moving_mean.assign(mean)
            layer.moving_variance.assign(variance)
    return {"recalibration_batches": batches, "chosen": chosen, "chosen_on": "validation",
            "val_top1": {"moving": moving_top1, "recalibrated": recalibrated_top1}}


# Fewer optimizer steps than this in a whole run: the run says it will barely train.
FEW_STEPS = 100


def describe_run(config, data, strategy, global_batch):
    """What a run is about to do, before it starts: data found (and any note on it), model
    and head, budget, precision and why, devices. Returns the lines."""
    sizes = data.sizes
    split_text = ", ".join(f"{sizes[key]:,} {label}" for key, label in (
        ("train", "training"), ("val", "validation"), ("test", "test"),
        ("unknown_test", "held-out-class test"), ("unknown_val", "held-out-class validation"))
        if sizes.get(key))
    names = ", ".join(data.class_names[:10]) + (", ..." if data.num_classes > 10 else "")
    lines = [f"data: {config.dataset}: {data.num_classes} classes ({names}); {split_text} "
             "images"] + [f"  note: {note}" for note in data.notes]
    head = "a Dense (softmax) head" if config.loss == "softmax" else (
        f"{'an' if config.loss[0] in 'aeiou' else 'a'} {config.loss} head "
        f"(s={config.scale}" + ("" if config.loss == "normface" else f", m={config.margin}")
        + ")")
    steps = data.train_size // global_batch
    lines.append(f"model: {config.backbone} with {head}, label smoothing "
                 f"{config.label_smoothing:g}; {config.recipe} recipe, {config.epochs} epoch(s) "
                 f"of {steps:,} steps at batch {global_batch:,} ({config.epochs * steps:,} "
                 f"steps), peak learning rate {peak_learning_rate(config, global_batch):g}")
    policy = keras.config.dtype_policy().name
    why = ("" if config.asked.mixed_precision != "auto" else
           " (auto: " + ("a GPU" if provenance.has_gpu() else "a CPU with bfloat16 "
                         "instructions" if policy != "float32" else "measured faster only on "
                         "a GPU or a CPU with bfloat16 instructions, for some backbones")
           + ")")
    try:
        devices = ", ".join(d.split("device:")[-1] for d in strategy.extended.worker_devices)
        placement = f"{type(strategy).__name__} over {devices}"
    except RuntimeError:  # the default strategy (--strategy default) lists none
        placement = "no distribution strategy (the default device)"
    lines.append(f"precision: {policy}{why}; {placement}")
    if config.recipe == "standard" and config.epochs == 5 and provenance.has_gpu():
        lines.append("  note: the standard recipe's 5 epochs were chosen for 2 CPU cores "
                     "(docs/recipe.md); a GPU affords more: --epochs")
    if config.epochs * steps < FEW_STEPS:
        lines.append(f"  note: only {config.epochs * steps} optimizer steps in all: the model "
                     "will barely train; add images or epochs, or lower --batch-size")
    return lines


def record(run_dir, resolved, metrics, outputs):
    """``test_predictions.npz`` (with the per-image outputs), then ``metrics.json`` (last: it
    marks the run finished)."""
    save_predictions(run_dir, outputs, resolved["head_scale"])
    metrics["finished_at"] = provenance.utc_now()
    _write_json(os.path.join(run_dir, "metrics.json"), metrics)


def recorded_metrics(run_dir):
    """A finished run's ``metrics.json``, said to be the recorded result."""
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    print(f"{run_dir} finished at {metrics['finished_at']}; its recorded result follows "
          "(--overwrite trains it again)", flush=True)
    return metrics


def set_up_process(config):
    """The distribution strategy, seed, determinism and precision policy of this process;
    returns the strategy."""
    # MultiWorkerMirroredStrategy must exist before any other TensorFlow op runs.
    strategy = make_strategy(config.strategy)
    keras.utils.set_random_seed(config.seed)
    if config.deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.config.set_dtype_policy(precision_policy(config))
    return strategy


def make_projector(config, run_dir, model, data):
    """The embedding projector callback (validation images; training images without a
    validation split), or None with ``--projector-samples 0``."""
    if not config.projector_samples:
        return None
    return EmbeddingProjector(os.path.join(run_dir, "logs", "projector"), model,
                              data.train if data.val is None else data.val, data.class_names,
                              config.projector_samples, config.projector_every)


def evaluate_run(config, *, model, data, global_batch, projector, history, timing):
    """After ``fit``: the BatchNorm statistics, the projector's last write, and the
    evaluation (test split once, validation, gallery, far-away images); returns
    ``(metrics, outputs, gallery)``."""
    print("after training: choosing BatchNorm statistics and evaluating (test, validation, "
          "training images as the retrieval gallery, far-away images)" + (", then exporting" if
                                                           config.export_formats else ""),
          flush=True)
    batchnorm = choose_batchnorm_statistics(model, data, global_batch=global_batch,
                                            num_batches=config.precise_bn_batches)
    if projector:  # after the statistics are chosen: it embeds in inference mode
        projector.write(config.epochs)
    metrics, outputs, gallery = evaluate(
        model, data, global_batch, config.tta, reject_score=config.reject_score,
        knn_k=config.knn_k, far_sets=None if config.far_ood == "none" else far_image_sets(
            config.image_size, config.far_ood_folders()))
    if "reject" in metrics:
        metrics["reject"]["chosen_by"] = config.reject_chosen_by
    metrics |= {"epochs": config.epochs, **timing, **({"batchnorm": batchnorm} if batchnorm
                                                        else {}),
                "train_accuracy_last_epoch": history.get("accuracy", [None])[-1]}
    return metrics, outputs, gallery


def save_model(config, *, run_dir, model, data, metrics, gallery):
    """The export (``saved_models/<name>/``, its path into ``metrics``) or, without one,
    ``inference.keras`` in the run directory."""
    if "keras" not in config.export_formats:  # else the export's model.keras holds it
        with atomic_file(os.path.join(run_dir, "inference.keras")) as tmp:
            model.save(tmp)
    if config.export_formats:
        metrics["export"] = export_models(
            model, data.class_names, os.path.join(config.export_dir, config.name),
            formats=config.export_formats, image_size=config.image_size, tta=config.tta,
            temperature=metrics["calibration"].get("temperature", 1.0),
            reject=metrics.get("reject"), gallery=gallery)


def train(config, overwrite=False, callbacks=()):
    """Train and evaluate one run of ``config`` (a ``RunConfig``; continue it if it was
    interrupted); returns the final metrics dict, a finished run's as recorded."""
    config.validate()
    config = config.resolved()  # from here on, the run reads one frozen record
    run_dir, already_done = prepare_run_dir(config, overwrite)
    if already_done:
        return recorded_metrics(run_dir)
    check_writable(config.runs_dir, "--runs-dir")
    if config.export_formats:
        check_writable(config.export_dir, "--export-dir")
    strategy = set_up_process(config)
    global_batch = config.batch_size * strategy.num_replicas_in_sync
    data = load_run_data(config, global_batch)
    print("\n".join(describe_run(config, data, strategy, global_batch)), flush=True)
    model = build_run_model(config, data, strategy, global_batch)
    resolved = start_run_dir(config, run_dir=run_dir, overwrite=overwrite, data=data,
                             model=model, replicas=strategy.num_replicas_in_sync,
                             global_batch=global_batch)
    projector = make_projector(config, run_dir, model, data)
    history, timing = fit_once(config, run_dir=run_dir, data=data, model=model,
                               global_batch=global_batch, projector=projector,
                               extra_callbacks=callbacks)
    metrics, outputs, gallery = evaluate_run(config, model=model, data=data,
                                             global_batch=global_batch, projector=projector,
                                             history=history, timing=timing)
    save_model(config, run_dir=run_dir, model=model, data=data, metrics=metrics,
               gallery=gallery)
    log_hparams(os.path.join(run_dir, "logs"), resolved, metrics)
    record(run_dir, resolved, metrics, outputs)
    # The model lives on in the export (or inference.keras): no training checkpoint is kept.
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))
    if config.export_formats:  # not in runs/: TensorBoard would list the run twice
        point_latest(config.export_dir, config.name)
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
