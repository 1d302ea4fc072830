"""Training speed, measured side by side: ratios with targets, FLOP/s against the measured peak.

    python benchmarks/bench.py --quick                 # the targets, under 10 minutes (2 cores)
    python benchmarks/bench.py --json bench.json       # + the levers table of docs/performance.md
    python benchmarks/bench.py --dataset ../shared/datasets/cifar10-jpeg   # + accuracy check

Each ratio compares two set-ups timed in alternating blocks of training steps
in this one process; the reported ratio is the median over rounds of the
paired ratios, so a machine that speeds up or slows down hits both sides.
Images/s are counted between the end of a block's first step and its last,
so tracing, iterator start-up and shuffle-buffer filling are not in them.
Training data is a generated image folder unless ``--dataset`` names one.
"""

import argparse
import contextlib
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from functools import partial
from unittest import mock

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tfmargin.airbench import airbench  # noqa: E402
from tfmargin.backbones import BACKBONES, build_backbone  # noqa: E402
from tfmargin.data import load_dataset, write_image_folder  # noqa: E402
from tfmargin.train import (  # noqa: E402
    RunConfig,
    build_run_models,
    make_datasets,
    set_precision,
    train,
)


class StepClock(keras.callbacks.Callback):
    """(step index, time) at the end of every call into the train function."""

    def on_train_begin(self, logs=None):
        self.marks = []

    def on_train_batch_end(self, batch, logs=None):
        self.marks.append((batch, time.perf_counter()))


def images_per_second(fit, batch_size):
    """Run ``fit(callbacks)`` once; images/s from its first step's end to its last."""
    clock = StepClock()
    fit([clock])
    (first, start), (last, end) = clock.marks[0], clock.marks[-1]
    return (last - first) * batch_size / (end - start)


def pipeline_rate(batches, batch_size, steps=100):
    """Images/s of iterating a pipeline with no model behind it."""
    iterator = iter(batches)
    for _ in range(5):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch_size / (time.perf_counter() - start)


def paired(measure_a, measure_b, rounds):
    """Alternate two zero-argument rate measurements; medians and the median paired ratio."""
    measure_a(), measure_b()  # warm-up: tracing, tf.data autotuning, caches
    a, b = [], []
    for _ in range(rounds):
        a.append(measure_a())
        b.append(measure_b())
    return {"ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
            "a": statistics.median(a), "b": statistics.median(b)}


def matmul_peak(n=2048, repeats=10, trials=5, dtype=tf.float32):
    """Best GFLOP/s of ``tf.matmul`` on n x n matrices (the machine's practical peak)."""
    x = tf.cast(tf.random.normal((n, n)), dtype)

    @tf.function
    def chain(x):
        for _ in range(repeats):
            x = tf.matmul(x, x) * (1.0 / n)  # the scaling keeps values finite
        return x

    chain(x).numpy()
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        chain(x).numpy()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def training_flops_per_image(model, batch_size=2):
    """Float operations of one training step (forward + all gradients), per image.

    Counted by TensorFlow's profiler on the step's graph, so convolution
    backward passes count as what they are rather than a 3x rule of thumb.
    """
    from tensorflow.python.profiler import model_analyzer, option_builder

    specs = tf.nest.map_structure(lambda i: tf.TensorSpec((batch_size, *i.shape[1:]), i.dtype),
                                  model.input)

    def step(inputs):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            loss = sum(tf.reduce_sum(o) for o in tf.nest.flatten(outputs))
        return tape.gradient(loss, model.trainable_variables)

    graph = tf.function(step).get_concrete_function(specs).graph
    options = option_builder.ProfileOptionBuilder(
        option_builder.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops / batch_size


def write_random_folder(root, num_classes=10, per_class=64, test_per_class=8, size=32):
    """JPEG class folders of random images: speed does not depend on what they show."""
    rng = np.random.default_rng(0)
    names = [f"class_{label}" for label in range(num_classes)]
    for split, count in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes), count)
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        write_image_folder(os.path.join(root, split), images, labels, names, fmt="jpg")
    return root


def load_mock_tfds(num_examples):
    """CIFAR-10 through TFDS's reading path, with TFDS's own random examples (offline)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples), \
            mock.patch("tfmargin.data._check_reachable"):
        return load_dataset("cifar10")


class RunSetup:
    """A compiled training model and its batches, built as ``train`` builds them."""

    def __init__(self, data, steps, recipe="standard", **settings):
        if recipe == "standard":
            settings.setdefault("batch_size", 128)
        self.config = RunConfig.for_recipe(recipe, export="none", projector_samples=0,
                                           **settings)
        self.config.validate()
        set_precision(self.config)
        batch = self.config.batch_size
        self.models = build_run_models(self.config, data, tf.distribute.get_strategy(), batch)
        # Repeated: every measurement round starts a fit over the same batches.
        self.batches = make_datasets(self.config, data, self.models.uses_label_input,
                                     batch)[0].repeat()
        keras.config.set_dtype_policy("float32")
        self.steps = steps * self.config.steps_per_execution

    def cached_batches(self, count):
        """``count`` batches of the real pipeline, replayed from memory."""
        memory = self.batches.take(count).cache().repeat()
        for _ in memory.take(count):
            pass
        return memory

    def rate(self, batches=None):
        def fit(callbacks):
            self.models.train.fit(batches or self.batches, steps_per_epoch=self.steps, epochs=1,
                                  verbose=0, callbacks=callbacks, shuffle=False)

        return images_per_second(fit, self.config.batch_size)


def plain_keras_model(backbone, num_classes, image_size=32):
    """What a plain keras.io-style script builds: backbone, pooling, Dense, default settings."""
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes)(x))
    model.compile(optimizer="adam", metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def stock_mobilenetv2(image_size=32):
    return keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3),
                                          include_top=False, weights=None)


def as_arrays(split, limit=None):
    images, labels = zip(*((x.numpy(), int(y)) for x, y in split.take(limit or -1)),
                         strict=True)
    return np.stack(images).astype("float32"), np.array(labels, "int32")


def plain_rate(model, images, labels, batch_size):
    def fit(callbacks):
        model.fit(images, labels, batch_size=batch_size, epochs=1, verbose=0,
                  callbacks=callbacks)

    return images_per_second(fit, batch_size)


class Report:
    def __init__(self):
        self.rows = []

    def markdown(self):
        lines = ["| section | measure | value | target | verdict | details |",
                 "|---|---|---|---|---|---|"]
        for r in self.rows:
            verdict = "" if r["passed"] is None else ("PASS" if r["passed"] else "**MISS**")
            lines.append(f"| {r['section']} | {r['name']} | {r['value']:.3f} {r['unit']} | "
                         f"{r['target'] or ''} | {verdict} | {r['note']} |")
        return "\n".join(lines) + "\n"

    def add(self, section, name, value, unit="", target=None, passed=None, note=""):
        row = {"section": section, "name": name, "value": value, "unit": unit,
               "target": target, "passed": passed, "note": note}
        self.rows.append(row)
        verdict = "" if passed is None else ("PASS" if passed else "MISS")
        print(f"{section:<12} {name:<72} {value:>9.3f} {unit:<8} {target or '':<8} "
              f"{verdict:<4} {note}", flush=True)


def bench_targets(report, data, tfds_data, args):
    steps, rounds, batch = args.steps, args.rounds, args.batch_size
    backbone = "resnet18"

    # 1. Head overhead: same backbone, batches and step; ArcMarginLayer vs Dense.
    arc = RunSetup(data, steps, backbone=backbone, loss="arcface", batch_size=batch)
    dense = RunSetup(data, steps, backbone=backbone, loss="softmax", batch_size=batch)
    arc_memory, dense_memory = arc.cached_batches(steps), dense.cached_batches(steps)
    head = paired(partial(dense.rate, dense_memory), partial(arc.rate, arc_memory), rounds)
    report.add("head", f"{backbone} step time ArcMarginLayer / Dense", head["ratio"], "x",
               "<= 1.02", head["ratio"] <= 1.02,
               f"Dense {head['a']:.1f} img/s, ArcFace {head['b']:.1f} img/s, batch {batch}")

    # 2. Input pipeline: the real pipeline (decode cache, shuffle, augmentation) vs the
    # same batches replayed from memory.
    pipe = paired(arc.rate, partial(arc.rate, arc_memory), rounds)
    report.add("input", f"{backbone} image folder pipeline / in-memory batches", pipe["ratio"],
               "x", ">= 0.95", pipe["ratio"] >= 0.95,
               f"{pipe['a']:.1f} vs {pipe['b']:.1f} img/s, augment standard")
    alone = pipeline_rate(arc.batches, batch)
    report.add("input", "input pipeline alone, no model (images/s)", alone, "img/s",
               note=f"feeding {pipe['b']:.1f} img/s takes {100 * pipe['b'] / alone:.2f}% of "
                    "what it can deliver on these cores")
    if tfds_data is not None:
        arc_tfds = RunSetup(tfds_data, steps, backbone=backbone, loss="arcface",
                            batch_size=batch)
        pipe = paired(arc_tfds.rate, partial(arc.rate, arc_memory), rounds)
        report.add("input", f"{backbone} TFDS pipeline / in-memory batches", pipe["ratio"], "x",
                   ">= 0.95", pipe["ratio"] >= 0.95,
                   f"{pipe['a']:.1f} vs {pipe['b']:.1f} img/s; TFDS mock_data cifar10")

    # 4. Utilization against the machine's matmul peak, measured now.
    peak = matmul_peak()
    report.add("machine", "fp32 matmul peak (tf.matmul 2048^2)", peak, "GFLOP/s")
    for name in args.utilization:
        setup = arc if name == backbone else RunSetup(data, steps, backbone=name,
                                                      loss="arcface", batch_size=batch)
        rate = head["b"] if name == backbone else statistics.median(
            setup.rate(setup.cached_batches(steps)) for _ in range(rounds))
        flops = training_flops_per_image(setup.models.train)
        fraction = flops * rate / 1e9 / peak
        target = name == "resnet18"
        report.add("utilization", f"{name} training FLOP/s / matmul peak", 100 * fraction, "%",
                   ">= 50" if target else None, fraction >= 0.5 if target else None,
                   f"{flops / 1e9:.3f} GFLOP/image x {rate:.1f} img/s")

    # 3. Against plain Keras scripts on MobileNetV2, same batch and images.
    ours = RunSetup(data, steps, backbone="mobilenetv2", loss="arcface", batch_size=batch)
    images, labels = as_arrays(data.train, steps * batch)
    our_flops = training_flops_per_image(ours.models.train)
    for label, backbone_model in (
            ("same adapted network", build_backbone("mobilenetv2", (32, 32, 3))),
            ("stock keras.applications", stock_mobilenetv2())):
        plain = plain_keras_model(backbone_model, data.num_classes)
        result = paired(ours.rate, partial(plain_rate, plain, images, labels, batch), rounds)
        plain_flops = training_flops_per_image(plain)
        report.add("vs plain", f"mobilenetv2 run.py training / plain Keras ({label})",
                   result["ratio"], "x", ">= 1.0", result["ratio"] >= 1.0,
                   f"{result['a']:.1f} vs {result['b']:.1f} img/s; GFLOP/image "
                   f"{our_flops / 1e9:.3f} vs {plain_flops / 1e9:.3f}, so training GFLOP/s "
                   f"{result['a'] * our_flops / 1e9:.1f} vs {result['b'] * plain_flops / 1e9:.1f}")


def bench_levers(report, data, args):
    """Each lever against the default settings, paired, per backbone."""
    steps, rounds, batch = args.steps, args.rounds, args.batch_size
    levers = {
        "jit_compile": dict(jit_compile=True),
        "mixed precision (bfloat16 on CPU)": dict(mixed_precision=True),
        "steps_per_execution 4": dict(steps_per_execution=4),
        f"batch {2 * batch}": dict(batch_size=2 * batch),
        f"batch {batch // 2}": dict(batch_size=batch // 2),
    }
    for backbone in args.lever_backbones:
        base = RunSetup(data, steps, backbone=backbone, loss="arcface", batch_size=batch)
        base_memory = base.cached_batches(steps)
        for name, change in levers.items():
            setup = RunSetup(data, steps, backbone=backbone, loss="arcface",
                             **{"batch_size": batch, **change})
            memory = setup.cached_batches(steps)
            result = paired(partial(setup.rate, memory), partial(base.rate, base_memory), rounds)
            report.add("lever", f"{backbone}: {name} / default", result["ratio"], "x",
                       note=f"{result['a']:.1f} vs {result['b']:.1f} img/s (in-memory batches)")
        options = tf.data.Options()
        options.deterministic = False
        loose = base.batches.with_options(options)
        result = paired(partial(base.rate, loose), base.rate, rounds)
        report.add("lever", f"{backbone}: tf.data deterministic=False / default",
                   result["ratio"], "x",
                   note=f"{result['a']:.1f} vs {result['b']:.1f} img/s (real pipeline)")


def bench_airbench(report, data, args):
    """The airbench recipe: FLOP/s against the matmul peak, and its levers, paired."""
    steps, rounds = args.steps, args.rounds
    peak = matmul_peak()
    report.add("airbench", "fp32 matmul peak (tf.matmul 2048^2)", peak, "GFLOP/s")
    bf16_peak = matmul_peak(dtype=tf.bfloat16)
    report.add("airbench", "bfloat16 matmul peak (tf.matmul 2048^2)", bf16_peak, "GFLOP/s")
    base = RunSetup(data, steps, "airbench", loss="softmax", batch_size=args.airbench_batch)
    base_memory = base.cached_batches(steps)
    flops = training_flops_per_image(base.models.train)
    pipeline = paired(base.rate, partial(base.rate, base_memory), rounds)
    rate = pipeline["a"]
    report.add("airbench", "airbench94 recipe training FLOP/s / matmul peak",
               100 * flops * rate / 1e9 / peak, "%", ">= 80", flops * rate / 1e9 / peak >= 0.8,
               f"{flops / 1e9:.3f} GFLOP/image x {rate:.1f} img/s (real pipeline), batch "
               f"{args.airbench_batch}, GELU, fp32")
    report.add("airbench", "airbench94 image pipeline / in-memory batches", pipeline["ratio"],
               "x", ">= 0.95", pipeline["ratio"] >= 0.95,
               f"{pipeline['a']:.1f} vs {pipeline['b']:.1f} img/s (alternating flip, "
               "reflect translate)")
    relu = {"airbench94": partial(airbench, activation="relu")}
    levers = {
        "ReLU instead of GELU": (relu, {}),
        "jit_compile (XLA)": ({}, dict(jit_compile=True)),
        "mixed_bfloat16": ({}, dict(mixed_precision=True)),
        "mixed_bfloat16 + ReLU": (relu, dict(mixed_precision=True)),
        f"batch {args.airbench_batch // 2}": ({}, dict(batch_size=args.airbench_batch // 2)),
    }
    for name, (backbones, change) in levers.items():
        with mock.patch.dict(BACKBONES, backbones):
            setup = RunSetup(data, steps, "airbench", loss="softmax",
                             **{"batch_size": args.airbench_batch, **change})
        memory = setup.cached_batches(steps)
        result = paired(partial(setup.rate, memory), partial(base.rate, base_memory), rounds)
        report.add("airbench lever", f"airbench94: {name} / recipe default", result["ratio"],
                   "x", note=f"{result['a']:.1f} vs {result['b']:.1f} img/s (in-memory "
                   f"batches); at the default's FLOPs {flops * result['a'] / 1e9 / peak:.0%} of "
                   f"the fp32 peak, {flops * result['a'] / 1e9 / bf16_peak:.0%} of the bf16 one")


def layer_step_rate(make_layer, shape, policy):
    """Zero-argument rate: forward + gradients of one layer on a random batch, per second."""
    keras.config.set_dtype_policy(policy)
    try:
        layer = make_layer()
        x = tf.cast(tf.random.normal(shape), layer.compute_dtype)
        layer(x)
    finally:
        keras.config.set_dtype_policy("float32")

    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.cast(layer(x, training=True), tf.float32))
        return tape.gradient(loss, [x, *layer.trainable_variables])

    def rate(repeats=5):
        step(x)
        start = time.perf_counter()
        for _ in range(repeats):
            for g in step(x):
                g.numpy()
        return repeats / (time.perf_counter() - start)

    return rate


def bench_bf16_layers(report, args):
    """Each airbench layer kind, fp32 against mixed_bfloat16, paired: which ones bf16
    speeds up on this CPU and which it slows down."""
    batch = 128
    layers_at = {
        "conv3x3 24->64 at 31x31": (lambda: keras.layers.Conv2D(64, 3, padding="same",
                                                                use_bias=False),
                                    (batch, 31, 31, 24)),
        "conv3x3 256->256 at 7x7": (lambda: keras.layers.Conv2D(256, 3, padding="same",
                                                                use_bias=False),
                                    (batch, 7, 7, 256)),
        "max-pool 2 at 31x31x64": (lambda: keras.layers.MaxPooling2D(2), (batch, 31, 31, 64)),
        "BatchNorm (no scale) at 15x15x64": (lambda: keras.layers.BatchNormalization(
            momentum=0.6, epsilon=1e-12, scale=False), (batch, 15, 15, 64)),
        "GELU at 15x15x64": (lambda: keras.layers.Activation("gelu"), (batch, 15, 15, 64)),
        "ReLU at 15x15x64": (lambda: keras.layers.Activation("relu"), (batch, 15, 15, 64)),
    }
    for name, (make, shape) in layers_at.items():
        result = paired(layer_step_rate(make, shape, "mixed_bfloat16"),
                        layer_step_rate(make, shape, "float32"), args.rounds)
        report.add("bf16 layer", f"{name}: bfloat16 / float32 speed", result["ratio"], "x",
                   note=f"{1000 / result['a']:.1f} vs {1000 / result['b']:.1f} ms per "
                        f"forward+backward, batch {batch}")


def bench_accuracy(report, args, runs_dir):
    """Test accuracy at equal epochs: run.py's training vs the plain stock script."""
    data = load_dataset(args.dataset, limit_train=args.accuracy_train)
    config = RunConfig(backbone="mobilenetv2", loss="arcface", dataset=args.dataset,
                       epochs=args.accuracy_epochs, limit_train=args.accuracy_train,
                       batch_size=args.batch_size, export="none", projector_samples=0,
                       runs_dir=runs_dir, validation_freq=args.accuracy_epochs)
    ours = train(config)["top1"]
    plain = plain_keras_model(stock_mobilenetv2(), data.num_classes)
    images, labels = as_arrays(data.train)
    plain.fit(images, labels, batch_size=args.batch_size, epochs=args.accuracy_epochs,
              verbose=0)
    test_images, test_labels = as_arrays(data.test)
    baseline = plain.evaluate(test_images, test_labels, verbose=0, return_dict=True)["accuracy"]
    report.add("vs plain", "mobilenetv2 test top-1: run.py - plain stock Keras",
               100 * (ours - baseline), "points", ">= 0", ours >= baseline,
               f"{100 * ours:.2f}% vs {100 * baseline:.2f}%, {data.train_size} train images x "
               f"{args.accuracy_epochs} epochs, {data.test_size} test images")


def airbench_data(data, args, tmp):
    """Enough images for the airbench section's batches: the loaded data, or more random
    JPEGs when it is too small."""
    needed = args.airbench_batch * (args.steps + 1)
    if data.train_size >= needed:
        return data
    if args.dataset:
        return load_dataset(args.dataset, limit_train=needed, val_split=0.0)
    per_class = needed // 10 + 1
    return load_dataset(write_random_folder(os.path.join(tmp, "airbench"),
                                            per_class=per_class), val_split=0.0)


def machine():
    """CPU model, cores, memory and GPUs, in words."""
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = tf.config.list_physical_devices("GPU")
    return (f"{model}, {os.cpu_count()} cores, {memory:.0f} GiB"
            + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="only the four targets, fewer steps (under 10 minutes on 2 cores)")
    parser.add_argument("--dataset", help="image folder for the timings and the accuracy "
                        "check (default: generated random JPEGs, no accuracy check)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-step batch (default 64 quick, 128 full)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=None, help="alternations per ratio")
    parser.add_argument("--accuracy-train", type=int, default=5000,
                        help="training images for the accuracy check")
    parser.add_argument("--accuracy-epochs", type=int, default=3,
                        help="epochs for the accuracy check")
    parser.add_argument("--sections", default=None,
                        help="comma-separated subset of targets,levers,accuracy,airbench,bf16 "
                             "(default: targets with --quick, else the first three)")
    parser.add_argument("--airbench-batch", type=int, default=1024,
                        help="batch of the airbench section (its recipe's)")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--markdown", help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    args.sections = (args.sections or ("targets" if args.quick else
                                       "targets,levers,accuracy")).split(",")
    args.batch_size = args.batch_size or (64 if args.quick else 128)
    args.steps = args.steps or (4 if args.quick else 6)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.utilization = ("resnet18",) if args.quick else ("resnet18", "mobilenetv2",
                                                         "efficientnetb0")
    args.lever_backbones = ("resnet18", "mobilenetv2")

    tf.get_logger().setLevel("ERROR")  # AutoGraph and deprecation chatter
    started = time.perf_counter()
    header = (f"tfmargin benchmark {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, "
              f"{machine()}, TensorFlow {tf.__version__}, Keras {keras.__version__}; batch "
              f"{args.batch_size}, {args.steps} steps x {args.rounds} rounds")
    print(header, flush=True)
    print(f"{'section':<12} {'measure':<72} {'value':>9} {'unit':<8} {'target':<8} verdict")
    report = Report()
    with tempfile.TemporaryDirectory() as tmp:
        if args.dataset:
            data = load_dataset(args.dataset, limit_train=args.batch_size * args.steps * 8)
        else:
            data = load_dataset(write_random_folder(os.path.join(tmp, "data")))
        tfds_data = load_mock_tfds(args.batch_size * args.steps * 2) \
            if "targets" in args.sections else None
        if "targets" in args.sections:
            bench_targets(report, data, tfds_data, args)
        if "levers" in args.sections:
            bench_levers(report, data, args)
        if "airbench" in args.sections:
            bench_airbench(report, airbench_data(data, args, tmp), args)
        if "bf16" in args.sections:
            bench_bf16_layers(report, args)
        if "accuracy" in args.sections and args.dataset:
            bench_accuracy(report, args, os.path.join(tmp, "runs"))
    seconds = time.perf_counter() - started
    print(f"finished in {seconds:.0f} s", flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{header}\n\n`python {' '.join(sys.argv)}` ({seconds:.0f} s)\n\n"
                    + report.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "argv": sys.argv, "seconds": seconds,
                       "tensorflow": tf.__version__, "keras": keras.__version__,
                       "rows": report.rows}, f, indent=2)
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
