"""Training speed, measured side by side: ratios with targets, FLOP/s against the measured peak.

    python benchmarks/bench.py --quick                 # the targets, under 10 minutes (2 cores)
    python benchmarks/bench.py --sections peer --json benchmarks/peer.json   # against PyTorch
    python benchmarks/bench.py --dataset ../shared/datasets/cifar10-jpeg   # + accuracy check
    python benchmarks/bench.py --sections airbench --full-run results/runs/<run>  # vs bound
    python benchmarks/bench.py --sections profile --dataset ../shared/datasets/cifar10-jpeg
    python benchmarks/bench.py --sections primitives   # oneDNN's kernels, Keras vs PyTorch

Each ratio compares two set-ups timed in alternating blocks of training steps in this
one process (``timing.paired``); the reported ratio is the median over rounds of the
paired ratios, so a machine that speeds up or slows down hits both sides. Images/s are
counted between the end of a block's first step and its last, so tracing, iterator
start-up and shuffle-buffer filling are not in them. Training data is a generated image
folder unless ``--dataset`` names one.
"""

import argparse
import collections
import contextlib
import datetime
import importlib.util
import json
import os
import re
import statistics
import sys
import tempfile
from functools import cache, partial
from unittest import mock

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfmargin.quiet import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import keras  # noqa: E402
from setups import (  # noqa: E402
    RunSetup,
    airbench_data,
    airbench_setup,
    write_random_folder,
)
from timing import (  # noqa: E402
    conv_peak,
    images_per_second,
    matmul_peak,
    paired,
    steps_per_second,
    tensorflow_op_times,
    torch_op_times,
    training_flops_per_image,
)

from tfmargin.activations import FusedGELU  # noqa: E402
from tfmargin.backbones import build_backbone  # noqa: E402
from tfmargin.data import load_dataset  # noqa: E402
from tfmargin.names import BATCHNORMS, GELU_BACKBONES, GELUS  # noqa: E402
from tfmargin.runner import provenance  # noqa: E402
from tfmargin.runner.config import RunConfig  # noqa: E402
from tfmargin.runner.train import (  # noqa: E402
    train,
)


def pipeline_rate(batches, batch_size, steps=100):
    """Images/s of iterating a pipeline with no model behind it."""
    iterator = iter(batches)
    for _ in range(5):
        next(iterator)
    start = tf.timestamp()
    for _ in range(steps):
        next(iterator)
    return steps * batch_size / float(tf.timestamp() - start)


def load_mock_tfds(num_examples):
    """CIFAR-10 through TFDS's reading path, with TFDS's own random examples (offline)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples), \
            mock.patch("tfmargin.data._check_reachable"):
        return load_dataset("cifar10")


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


def gflop(flops):
    return "?" if flops is None else f"{flops / 1e9:.3f}"


def bench_targets(report, data, tfds_data, args):
    steps, rounds, batch = args.steps, args.rounds, args.batch_size
    backbone = args.backbones[0]

    # Head overhead: same backbone, batches and step; ArcMarginLayer vs Dense.
    arc = RunSetup(data, steps, backbone=backbone, loss="arcface", batch_size=batch)
    dense = RunSetup(data, steps, backbone=backbone, loss="softmax", batch_size=batch)
    arc_memory, dense_memory = arc.cached_batches(steps), dense.cached_batches(steps)
    head = paired(partial(dense.rate, dense_memory), partial(arc.rate, arc_memory), rounds)
    report.add("head", f"{backbone} step time ArcMarginLayer / Dense", head["ratio"], "x",
               "<= 1.02", head["ratio"] <= 1.02,
               f"Dense {head['a']:.1f} img/s, ArcFace {head['b']:.1f} img/s, batch {batch}")

    # Input pipeline: the real pipeline (decode cache, shuffle, augmentation) vs the same
    # batches replayed from memory.
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

    # Utilisation against the machine's matmul peak, measured now.
    peak = matmul_peak()
    report.add("machine", "fp32 matmul peak (tf.matmul 2048^2)", peak, "GFLOP/s")
    for name in args.backbones:
        setup = arc if name == backbone else RunSetup(data, steps, backbone=name,
                                                      loss="arcface", batch_size=batch)
        rate = head["b"] if name == backbone else statistics.median(
            setup.rate(setup.cached_batches(steps)) for _ in range(rounds))
        flops = training_flops_per_image(setup.model)
        fraction = None if flops is None else flops * rate / 1e9 / peak
        target = name == "resnet18"
        report.add("utilization", f"{name} training FLOP/s / matmul peak",
                   float("nan") if fraction is None else 100 * fraction, "%",
                   ">= 50" if target else None,
                   None if not target or fraction is None else fraction >= 0.5,
                   f"{gflop(flops)} GFLOP/image x {rate:.1f} img/s")

    # Against plain Keras scripts, same batch and images.
    ours = RunSetup(data, steps, backbone=args.plain_backbone, loss="arcface",
                    batch_size=batch)
    images, labels = as_arrays(data.train, steps * batch)
    our_flops = training_flops_per_image(ours.model)
    stock = [("stock keras.applications", stock_mobilenetv2())] \
        if args.plain_backbone == "mobilenetv2" else []
    for label, backbone_model in (("same adapted network",
                                   build_backbone(args.plain_backbone, (32, 32, 3))), *stock):
        plain = plain_keras_model(backbone_model, data.num_classes)
        result = paired(ours.rate, partial(plain_rate, plain, images, labels, batch), rounds)
        plain_flops = training_flops_per_image(plain)
        report.add("vs plain", f"{args.plain_backbone} run.py training / plain Keras ({label})",
                   result["ratio"], "x", ">= 1.0", result["ratio"] >= 1.0,
                   f"{result['a']:.1f} vs {result['b']:.1f} img/s; GFLOP/image "
                   f"{gflop(our_flops)} vs {gflop(plain_flops)}")


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
        base = RunSetup(data, steps, backbone=backbone, loss="arcface", batch_size=batch,
                        mixed_precision=False)
        base_memory = base.cached_batches(steps)
        for name, change in levers.items():
            setup = RunSetup(data, steps, backbone=backbone, loss="arcface",
                             **{"batch_size": batch, "mixed_precision": False, **change})
            memory = setup.cached_batches(steps)
            result = paired(partial(setup.rate, memory), partial(base.rate, base_memory), rounds)
            report.add("lever", f"{backbone}: {name} / float32 default", result["ratio"], "x",
                       note=f"{result['a']:.1f} vs {result['b']:.1f} img/s (in-memory batches)")


def gelu_in_float32(x):
    """GELU computed in float32 whatever the input's dtype (erf in bfloat16 is slow)."""
    return keras.ops.cast(keras.activations.gelu(keras.ops.cast(x, "float32")), x.dtype)


@tf.function(jit_compile=True)
def _norm_forward(x, beta, epsilon):
    x32 = tf.cast(x, tf.float32)
    mean = tf.reduce_mean(x32, axis=[0, 1, 2])
    centered = x32 - mean
    variance = tf.reduce_mean(tf.square(centered), axis=[0, 1, 2])
    inverse = tf.math.rsqrt(variance + epsilon)
    return tf.cast(centered * inverse + beta, x.dtype), mean, variance, inverse


@tf.function(jit_compile=True)
def _norm_backward(x, mean, inverse, dy):
    x32, dy32 = tf.cast(x, tf.float32), tf.cast(dy, tf.float32)
    normalized = (x32 - mean) * inverse
    mean_dy = tf.reduce_mean(dy32, axis=[0, 1, 2])
    mean_dy_normalized = tf.reduce_mean(dy32 * normalized, axis=[0, 1, 2])
    dx = inverse * (dy32 - mean_dy - normalized * mean_dy_normalized)
    return tf.cast(dx, x.dtype), tf.reduce_sum(dy32, axis=[0, 1, 2])


class XlaBatchNormalization(keras.layers.BatchNormalization):
    """Training-mode BatchNorm without scale (airbench's) as one XLA-compiled loop each way,
    float32 inside, the same statistics and epsilon as Keras's layer (biased variance in the
    moving average): the forward (x - mean) / sqrt(var + eps) + beta, the backward
    inv * (dy - mean(dy) - x_hat * mean(dy * x_hat)) and sum(dy). A benchmark variant."""

    def call(self, inputs, training=None, mask=None):
        if not training or mask is not None or self.scale:
            return super().call(inputs, training=training, mask=mask)
        stats = {}

        @tf.custom_gradient
        def normalize(x, beta):
            y, mean, variance, inverse = _norm_forward(x, beta, self.epsilon)
            stats.update(mean=mean, variance=variance)
            return y, lambda dy: _norm_backward(x, mean, inverse, dy)

        outputs = normalize(inputs, tf.cast(self.beta, tf.float32))
        self.moving_mean.assign(self.moving_mean * self.momentum
                                + stats["mean"] * (1 - self.momentum))
        self.moving_variance.assign(self.moving_variance * self.momentum
                                    + stats["variance"] * (1 - self.momentum))
        return outputs


@cache
def machine_peak(report, dtype):
    """The day's practical peak of ``dtype``: the better of chained 2048^2 ``tf.matmul`` and
    airbench's widest convolution (``timing.conv_peak``), each reported; GFLOP/s. Measured
    once per report: the full-run row uses the peak the airbench section measured."""
    name = "fp32" if dtype == tf.float32 else "bfloat16"
    matmul, conv = matmul_peak(dtype=dtype), conv_peak(dtype)
    report.add("airbench", f"{name} matmul peak (tf.matmul 2048^2)", matmul, "GFLOP/s")
    report.add("airbench", f"{name} conv peak (3x3 64->256 at 15x15, batch 256, forward)",
               conv, "GFLOP/s")
    return max(matmul, conv)


def bench_full_run(report, data, args, run_dir):
    """A recorded full airbench run (``--full-run``): its fit time against the time its
    FLOPs take at the day's peak of its precision (goal: within 2x), the FLOPs counted on
    the recipe's network as the run built it."""
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "metrics.json")) as f:
        metrics = json.load(f)
    bfloat16 = bool(config["mixed_precision"])
    peak = machine_peak(report, tf.bfloat16 if bfloat16 else tf.float32)
    setup = airbench_setup(data, args, 1, mixed_precision=bfloat16,
                           gelu=config.get("gelu", "keras"),
                           batchnorm=config.get("batchnorm", "keras"))
    flops = training_flops_per_image(setup.model)
    if flops is None:
        report.add("full run", "full airbench run / FLOP bound", float("nan"),
                   note="skipped: this TensorFlow cannot count FLOPs")
        return
    images = config["train_size"] * metrics["epochs"]
    bound = flops * images / 1e9 / peak
    wall = metrics["wall_seconds"]
    tta = metrics.get("tta", {}).get("top1")
    machine = config.get("machine", {})
    report.add("full run", f"full airbench run ({'bfloat16' if bfloat16 else 'float32'}) / "
               "FLOP-bound time at the day's peak", wall / bound, "x", "<= 2", wall / bound <= 2,
               f"{wall:.0f} s fit vs {bound:.0f} s bound ({gflop(flops)} GFLOP/image x "
               f"{images} images at {peak:.1f} GFLOP/s); test top-1 {100 * metrics['top1']:.2f}"
               f" %, with TTA {100 * tta:.2f} %; run {os.path.basename(run_dir)} on "
               f"{machine.get('model')} family {machine.get('family')}")


def bench_airbench(report, data, args):
    """The airbench recipe: FLOP/s against the matmul peaks, and its levers, paired."""
    steps, rounds = args.steps, args.rounds
    peak, bf16_peak = (machine_peak(report, dtype) for dtype in (tf.float32, tf.bfloat16))
    base = airbench_setup(data, args, steps)
    base_memory = base.cached_batches(steps)
    flops = training_flops_per_image(base.model)
    pipeline = paired(base.rate, partial(base.rate, base_memory), rounds)
    rate = pipeline["a"]
    fraction = None if flops is None else flops * rate / 1e9 / peak
    report.add("airbench", "airbench94 recipe training FLOP/s / fp32 peak",
               float("nan") if fraction is None else 100 * fraction, "%", ">= 80",
               None if fraction is None else fraction >= 0.8,
               f"{gflop(flops)} GFLOP/image x {rate:.1f} img/s (real pipeline), batch "
               f"{args.airbench_batch}, GELU, fp32")
    report.add("airbench", "airbench94 image pipeline / in-memory batches", pipeline["ratio"],
               "x", ">= 0.95", pipeline["ratio"] >= 0.95,
               f"{pipeline['a']:.1f} vs {pipeline['b']:.1f} img/s (alternating flip, "
               "reflect translate)")
    fp32_levers = {
        "ReLU instead of GELU": dict(activation="relu"),
        "jit_compile (XLA)": dict(jit_compile=True),
        "mixed_bfloat16": dict(mixed_precision=True),
        f"batch {args.airbench_batch // 2}": dict(batch_size=args.airbench_batch // 2),
    }
    recipe = RunConfig.for_recipe("airbench")
    other_gelu, other_batchnorm = the_other(GELUS, recipe.gelu), the_other(BATCHNORMS,
                                                                          recipe.batchnorm)
    bf16_levers = {  # against the recipe (and its GELU) under mixed_bfloat16
        "ReLU instead of GELU": dict(activation="relu"),
        "GELU computed in float32, unfused": dict(activation=gelu_in_float32),
        f"--gelu {other_gelu}": dict(gelu=other_gelu),
        f"--batchnorm {other_batchnorm}": dict(batchnorm=other_batchnorm),
        "BatchNorm fused by XLA": dict(norm=XlaBatchNormalization),
    }
    lever_sets = {"float32": (fp32_levers, lambda: base),
                  "mixed_bfloat16": (bf16_levers, lambda: airbench_setup(
                      data, args, steps, mixed_precision=True))}
    for precision in (p for p in args.airbench_levers if p != "none"):
        levers, make_baseline = lever_sets[precision]
        baseline = make_baseline()
        base_memory = baseline.cached_batches(steps)
        for name, change in levers.items():
            settings = {"mixed_precision": precision != "float32", **change}
            setup = airbench_setup(data, args, steps, **settings)
            memory = setup.cached_batches(steps)
            result = paired(partial(setup.rate, memory), partial(baseline.rate, base_memory),
                            rounds)
            note = f"{result['a']:.1f} vs {result['b']:.1f} img/s (in-memory batches)"
            if flops is not None:
                note += (f"; at the recipe's FLOPs {flops * result['a'] / 1e9 / peak:.0%} of the "
                         f"fp32 peak, {flops * result['a'] / 1e9 / bf16_peak:.0%} of the bf16 "
                         "one")
            report.add("airbench lever", f"airbench94 {precision}: {name} / {precision} recipe",
                       result["ratio"], "x", note=note)


def the_other(choices, value):
    """The choice of a two-way setting (``--gelu``, ``--batchnorm``) that is not ``value``."""
    return next(choice for choice in choices if choice != value)


def peer_step(name, memory, bfloat16):
    """PyTorch's training step of ``name`` on the first of our in-memory batches (integer
    labels, whether ours are one-hot or not)."""
    import peers

    images, labels = next(iter(memory))
    labels = np.argmax(labels, axis=-1) if labels.ndim == 2 else labels
    return peers.training_step(name, images.numpy(), np.asarray(labels), bfloat16)


def bench_peer(report, data, args):
    """Against PyTorch on the same CPU, same network, optimizer step, batch and precision,
    alternating blocks of steps in this process: airbench94 in float32 and bfloat16, and the
    main command's MobileNetV2 + ArcFace in its default precision."""
    try:
        import torch
    except ImportError:
        report.add("peer", "PyTorch baseline", float("nan"), note="skipped: PyTorch is not "
                   "installed (pip install torch, a CPU build: README, Install)")
        return

    torch.manual_seed(0)
    rounds = args.rounds
    main = RunConfig(backbone="mobilenetv2")
    recipe = RunConfig.for_recipe("airbench")
    other_batchnorm = the_other(BATCHNORMS, recipe.batchnorm)
    main_batchnorm = the_other(BATCHNORMS, main.batchnorm)
    # (network, bfloat16, batch, change): each network as its command trains it, then with
    # the other BatchNorm, so the rows the goals are about are measured both ways in one run.
    cases = [("airbench94", False, args.airbench_batch, {}),
             ("airbench94", True, args.airbench_batch, {}),
             ("airbench94", True, args.airbench_batch, dict(batchnorm=other_batchnorm)),
             ("mobilenetv2", main.resolved_mixed_precision(), args.batch_size, {}),
             ("mobilenetv2", main.resolved_mixed_precision(), args.batch_size,
              dict(batchnorm=main_batchnorm))]
    for name, bfloat16, batch, change in cases:
        steps = args.peer_steps
        if name == "airbench94":
            ours = airbench_setup(data, args, steps, mixed_precision=bfloat16, batch_size=batch,
                                  **change)
        else:
            ours = RunSetup(data, steps, backbone="mobilenetv2", loss="arcface", scale=8.0,
                            margin=0.1, batch_size=batch, mixed_precision=bfloat16, **change)
        memory = ours.cached_batches(steps)
        step = peer_step(name, memory, bfloat16)
        result = paired(partial(ours.rate, memory),
                        lambda step=step, batch=batch, steps=steps: batch * steps_per_second(
                            step, steps), rounds)
        precision = "bfloat16" if bfloat16 else "float32"
        target = {("airbench94", True): ">= 1.2", ("airbench94", False): ">= 1.0",
                  ("mobilenetv2", bfloat16): ">= 1.0"}[(name, bfloat16)]
        built = {"gelu": ours.config.gelu} if name in GELU_BACKBONES else {}
        built["batchnorm"] = ours.config.batchnorm
        label = f"{name} {precision}, " + " ".join(f"--{k} {v}" for k, v in built.items())
        report.add("peer", f"{label}: Keras (tfmargin) / PyTorch {torch.__version__}",
                   result["ratio"], "x", target, result["ratio"] >= float(target[3:]),
                   f"{result['a']:.1f} vs {result['b']:.1f} img/s, batch {batch}, in-memory "
                   f"batches, {rounds} rounds of {steps} steps")


PROFILE_TOP = 8  # op types reported per profiled step


def add_op_rows(report, label, times, steps, top=PROFILE_TOP):
    """The ``top`` op types of ``times`` (``{op type: ms}`` over ``steps`` steps), in ms per
    step, each with its share of the step's op time."""
    total = sum(times.values())
    for name, ms in sorted(times.items(), key=lambda item: -item[1])[:top]:
        report.add("profile", f"{label}: {name}", ms / steps, "ms",
                   note=f"{ms / total:.0%} of {total / steps:.0f} ms of op time per step")


def op_owners(model):
    """``op_owner`` for ``model``'s ops, its layer table built once."""
    kinds = {layer.name: type(layer).__name__ for layer in model.backbone.layers}
    return partial(op_owner, kinds=kinds, optimizer=re.sub(r"_\d+$", "", model.optimizer.name))


def op_owner(op_name, kinds, optimizer):
    """What an op of a training step belongs to: ``layer <class>`` of a backbone layer
    (``kinds``: layer name -> class name; graph name scopes repeat layer names with a ``_N``
    suffix), ``optimizer`` (the optimizer's name without that suffix), or the
    rest (input normalisation, head, loss); XLA-compiled functions are not named in the
    trace (the airbench networks' only one is ``FusedGELU``)."""
    if not op_name:
        return "XLA-compiled functions (FusedGELU)"
    for part in op_name.split("/"):
        base = re.sub(r"_\d+$", "", part)
        layer = kinds.get(part) or kinds.get(base)
        if layer:
            return f"layer {layer}"
        if base == optimizer:
            return "optimizer"
    return "the rest (input normalisation, head, loss)"


def profiled_rate(setup, memory, logdir):
    """One timed block of ``setup``'s steps under TensorFlow's profiler: its images/s (None
    where the profile cannot be read) and ``tensorflow_op_times``."""
    rates = []
    times = tensorflow_op_times(lambda: rates.append(setup.rate(memory)), logdir)
    return (rates[0] if rates else None), times


def bench_profile(report, data, args):
    """Where a bfloat16 airbench94 step's time goes: TensorFlow's profiler over a block of
    steps of the recipe and of it with the other BatchNorm, by op type and by the kind of
    layer the op belongs to; then PyTorch's profiler over its step, by op."""
    recipe = RunConfig.for_recipe("airbench")
    other = the_other(BATCHNORMS, recipe.batchnorm)
    steps = args.peer_steps
    for change in ({}, dict(batchnorm=other)):
        setup = airbench_setup(data, args, steps, mixed_precision=True, **change)
        memory = setup.cached_batches(steps)
        setup.rate(memory)  # traced and warm before the profiled block
        with tempfile.TemporaryDirectory() as logdir:
            rate, times = profiled_rate(setup, memory, logdir)
        if times is None:
            report.add("profile", "TensorFlow op times", float("nan"), note="skipped: this "
                       "TensorFlow has no tensorflow.tsl.profiler.protobuf.xplane_pb2")
            return
        label = f"airbench94 bfloat16, --batchnorm {setup.config.batchnorm}"
        by_type, by_layer = collections.Counter(), collections.Counter()
        owner = op_owners(setup.model)
        for (name, kind), ms in times.items():
            by_type[kind] += ms
            by_layer[owner(name)] += ms
        report.add("profile", f"{label}: wall time per step, profiled",
                   1000 * setup.config.batch_size / rate, "ms",
                   note=f"batch {setup.config.batch_size}; op times below are summed over "
                        "threads (two ops at once both count)")
        add_op_rows(report, f"{label}, op", by_type, setup.steps)
        add_op_rows(report, label, by_layer, setup.steps, top=len(by_layer))
    if importlib.util.find_spec("torch") is None:
        return
    step = peer_step("airbench94", memory, bfloat16=True)
    step()

    def block(step=step):
        for _ in range(steps):
            step()

    add_op_rows(report, "PyTorch airbench94 bfloat16, op", torch_op_times(block), steps)


def conv_label(problem):
    """``3x3 256->256 at 7x7`` from a oneDNN convolution problem
    (``mb1024_ic256oc256_ih7oh7kh3sh1...``)."""
    found = re.search(r"ic(\d+)oc(\d+)_ih(\d+)oh\d+kh(\d+)", problem)
    if not found:
        return problem
    ic, oc, size, kernel = found.groups()
    return f"{kernel}x{kernel} {ic}->{oc} at {size}x{size}"


def bench_primitives(report, args):
    """Each framework's bfloat16 airbench94 step under oneDNN's verbose mode, each in a
    child process (``onednn.py``): the convolution primitives' milliseconds per step by
    propagation and by shape, Keras against PyTorch, whether both chose the same
    implementation and memory formats, and what the Keras step would take with PyTorch's
    convolution times (the ratio its other work allows). With ``--peer-python``, PyTorch's
    step again under that Python's PyTorch (another build, another oneDNN), its convolutions
    against Keras's: which of the two builds' differences a gap follows."""
    import onednn

    if importlib.util.find_spec("torch") is None:
        report.add("primitives", "oneDNN primitives", float("nan"), note="skipped: PyTorch is "
                   "not installed (pip install torch, a CPU build: README, Install)")
        return
    children = {"keras": ("keras", None), "pytorch": ("pytorch", None),
                **({"other": ("pytorch", args.peer_python)} if args.peer_python else {})}
    measured = {}
    for name, (framework, python) in children.items():
        done = onednn.run_child(framework, args.airbench_batch, args.peer_steps, args.dataset,
                                python=python)
        if done.returncode:
            raise RuntimeError(f"onednn.py {framework} failed: {done.stderr[-2000:]}")
        times = onednn.primitive_times(done.stdout, args.peer_steps)
        if not times:
            report.add("primitives", "oneDNN primitives", float("nan"), note=f"skipped: "
                       f"{framework} printed no oneDNN verbose lines (oneDNN not in use)")
            return
        measured[name] = times, onednn.wall_ms(done.stdout), onednn.build(done.stdout)
    (ours, our_wall, our_build), (peer, peer_wall, peer_build) = (measured["keras"],
                                                                  measured["pytorch"])

    def conv_ms(times, propagation=None):
        return sum(entry["ms"] for (kind, prop, _), entry in times.items()
                   if kind == "convolution" and propagation in (None, prop))

    if "other" in measured:
        other, other_wall, other_build = measured["other"]
        report.add("primitives", "airbench94 bfloat16 step, wall time: the other PyTorch",
                   other_wall, "ms", note=f"{args.peer_python}; {other_build}")
        for propagation in ("forward_training", "backward_data", "backward_weights", None):
            a, b, c = (conv_ms(t, propagation) for t in (ours, peer, other))
            report.add("primitives", f"convolutions, {propagation or 'all'}: Keras / the other "
                       "PyTorch speed", c / a, "x", note=f"{a:.1f} vs {c:.1f} ms per step "
                       f"(PyTorch {b:.1f})")

    batch = f"batch {args.airbench_batch}, {args.peer_steps} steps"
    report.add("primitives", "airbench94 bfloat16 step, wall time: Keras (one op at a time)",
               our_wall, "ms", note=f"{batch}, under ONEDNN_VERBOSE=1; {our_build}")
    report.add("primitives", "airbench94 bfloat16 step, wall time: PyTorch", peer_wall, "ms",
               note=f"{batch}, under ONEDNN_VERBOSE=1; {peer_build}")
    for propagation in ("forward_training", "backward_data", "backward_weights", None):
        a, b = conv_ms(ours, propagation), conv_ms(peer, propagation)
        report.add("primitives", f"convolutions, {propagation or 'all'}: Keras / PyTorch speed",
                   b / a, "x", note=f"{a:.1f} vs {b:.1f} ms per step")
    problems = sorted({key for key in {**ours, **peer} if key[0] == "convolution"},
                      key=lambda key: (key[1], -(ours.get(key) or peer[key])["ms"]))
    for key in problems:
        a, b = ours.get(key), peer.get(key)
        name = f"{key[1]} {conv_label(key[2])}: Keras / PyTorch speed"
        if a is None or b is None:
            report.add("primitives", name, float("nan"), "x",
                       note=f"run by {'PyTorch' if a is None else 'Keras'} only")
            continue
        same = a["impls"] == b["impls"]
        impls = " ".join(sorted(impl for impl, _ in a["impls"] | b["impls"]))
        report.add("primitives", name, b["ms"] / a["ms"], "x",
                   note=f"{a['ms']:.1f} vs {b['ms']:.1f} ms per step; {impls}; "
                        + ("same implementation and memory formats" if same else
                           "implementations or memory formats differ"))
    rest_ours, rest_peer = our_wall - conv_ms(ours), peer_wall - conv_ms(peer)
    report.add("primitives", "the step's other work (wall time - convolutions): Keras",
               rest_ours, "ms", note=f"PyTorch {rest_peer:.1f} ms")
    bound = peer_wall / (rest_ours + conv_ms(peer))
    report.add("primitives", "Keras / PyTorch step speed with PyTorch's convolution times",
               bound, "x", ">= 1.2", bound >= 1.2,
               note="the bfloat16 goal's bound: Keras's other work plus PyTorch's convolutions")


CONV_SHAPES = {  # airbench94's convolutions: (input channels, output channels, size)
    "conv3x3 24->64 at 31x31": (24, 64, 31),
    "conv3x3 64->256 at 15x15": (64, 256, 15),
    "conv3x3 256->256 at 7x7": (256, 256, 7),
}


def bench_peer_layers(report, args):
    """airbench's convolutions one at a time, forward and backward, Keras against PyTorch in
    bfloat16 (and float32): whether a gap of the whole network is the convolutions'."""
    import torch

    batch = args.airbench_batch // 4
    for name, (c_in, c_out, size) in CONV_SHAPES.items():
        for bfloat16 in (False, True):
            ours = layer_step_rate(lambda c_out=c_out: keras.layers.Conv2D(
                c_out, 3, padding="same", use_bias=False), (batch, size, size, c_in),
                "mixed_bfloat16" if bfloat16 else "float32")
            conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(
                memory_format=torch.channels_last)
            x = torch.randn(batch, c_in, size, size).contiguous(
                memory_format=torch.channels_last).requires_grad_()

            def theirs(conv=conv, x=x, bfloat16=bfloat16):
                def step():
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
                        out = conv(x)
                    out.float().sum().backward()
                return steps_per_second(step, 5)

            result = paired(ours, theirs, args.rounds)
            precision = "bfloat16" if bfloat16 else "float32"
            report.add("peer layer", f"{name} {precision}: Keras / PyTorch, forward+backward",
                       result["ratio"], "x", note=f"{1000 / result['a']:.1f} vs "
                       f"{1000 / result['b']:.1f} ms, batch {batch}")


def bench_peer_elementwise(report, args):
    """airbench's element-wise layers in bfloat16, forward and backward, Keras (as the
    recipe runs them, and GELU fused by XLA) against PyTorch on a bfloat16 tensor."""
    import torch

    batch, channels, size = args.airbench_batch // 4, 64, 15
    tensor = torch.randn(batch, channels, size, size, dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    norm = torch.nn.BatchNorm2d(channels, affine=False, momentum=0.4, eps=1e-12)
    cases = {
        "GELU": (lambda: keras.layers.Activation("gelu"), torch.nn.functional.gelu),
        "GELU fused by XLA": (FusedGELU, torch.nn.functional.gelu),
        "BatchNorm (no scale)": (lambda: keras.layers.BatchNormalization(
            momentum=0.6, epsilon=1e-12, scale=False), lambda x: norm(x.float()).bfloat16()),
        "BatchNorm fused by XLA": (lambda: XlaBatchNormalization(
            momentum=0.6, epsilon=1e-12, scale=False), lambda x: norm(x.float()).bfloat16()),
    }
    for name, (make, function) in cases.items():
        ours = layer_step_rate(make, (batch, size, size, channels), "mixed_bfloat16")

        def theirs(function=function):
            def step():
                function(tensor).float().sum().backward()
            return steps_per_second(step, 5)

        result = paired(ours, theirs, args.rounds)
        report.add("peer layer", f"{name} at {size}x{size}x{channels} bfloat16: Keras / "
                   "PyTorch, forward+backward", result["ratio"], "x",
                   note=f"{1000 / result['a']:.1f} vs {1000 / result['b']:.1f} ms, batch "
                        f"{batch}")


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

    def one():
        for g in step(x):
            g.numpy()

    return lambda: steps_per_second(one, 5)


def bench_bf16_layers(report, args):
    """Each airbench layer kind, fp32 against mixed_bfloat16, paired: which ones bfloat16
    speeds up on this CPU and which it slows down."""
    batch = 128
    layers_at = {
        "conv3x3 24->64 at 31x31": (lambda: keras.layers.Conv2D(64, 3, padding="same",
                                                                use_bias=False),
                                    (batch, 31, 31, 24)),
        "conv3x3 256->256 at 7x7": (lambda: keras.layers.Conv2D(256, 3, padding="same",
                                                                use_bias=False),
                                    (batch, 7, 7, 256)),
        "depthwise 3x3 at 16x16x144": (lambda: keras.layers.DepthwiseConv2D(3, padding="same",
                                                                            use_bias=False),
                                       (batch, 16, 16, 144)),
        "max-pool 2 at 31x31x64": (lambda: keras.layers.MaxPooling2D(2), (batch, 31, 31, 64)),
        "BatchNorm (no scale) at 15x15x64": (lambda: keras.layers.BatchNormalization(
            momentum=0.6, epsilon=1e-12, scale=False), (batch, 15, 15, 64)),
        "BatchNorm fused by XLA at 15x15x64": (lambda: XlaBatchNormalization(
            momentum=0.6, epsilon=1e-12, scale=False), (batch, 15, 15, 64)),
        "GELU at 15x15x64": (lambda: keras.layers.Activation("gelu"), (batch, 15, 15, 64)),
        "GELU fused by XLA at 15x15x64": (FusedGELU, (batch, 15, 15, 64)),
        "ReLU6 at 16x16x144": (lambda: keras.layers.ReLU(6.0), (batch, 16, 16, 144)),
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
    config = RunConfig(backbone=args.plain_backbone, loss="arcface", dataset=args.dataset,
                       epochs=args.accuracy_epochs, limit_train=args.accuracy_train,
                       batch_size=args.batch_size, export="none", projector_samples=0,
                       runs_dir=runs_dir, validation_freq=args.accuracy_epochs)
    ours = train(config)["top1"]
    plain = plain_keras_model(stock_mobilenetv2() if args.plain_backbone == "mobilenetv2"
                              else build_backbone(args.plain_backbone), data.num_classes)
    images, labels = as_arrays(data.train)
    plain.fit(images, labels, batch_size=args.batch_size, epochs=args.accuracy_epochs,
              verbose=0)
    test_images, test_labels = as_arrays(data.test)
    baseline = plain.evaluate(test_images, test_labels, verbose=0, return_dict=True)["accuracy"]
    report.add("vs plain", f"{args.plain_backbone} test top-1: run.py - plain stock Keras",
               100 * (ours - baseline), "points", ">= 0", ours >= baseline,
               f"{100 * ours:.2f}% vs {100 * baseline:.2f}%, {data.train_size} train images x "
               f"{args.accuracy_epochs} epochs, {data.sizes['test']} test images")


def machine():
    """CPU model, cores, bfloat16-relevant flags, memory and GPUs, in words."""
    cpu = provenance.cpu_description()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = tf.config.list_physical_devices("GPU")
    family = f" (family/model {cpu['family']})" if cpu["family"] else ""
    flags = " ".join(cpu["flags"]) or "none"
    return (f"{cpu['model']}{family}, {cpu['cores']} cores (flags: {flags}), {memory:.0f} GiB"
            + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU"))


SECTIONS = ("targets", "levers", "accuracy", "airbench", "bf16", "peer", "profile",
            "primitives")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="only the targets, fewer steps (under 10 minutes on 2 cores)")
    parser.add_argument("--dataset", help="image folder for the timings and the accuracy "
                        "check (default: generated random JPEGs, no accuracy check)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-step batch (default 64 quick, 128 full)")
    parser.add_argument("--steps", type=int, default=None, help="steps per timed block")
    parser.add_argument("--peer-python", help="primitives: also time PyTorch's step under this "
                        "Python, whose PyTorch is another build (another oneDNN version)")
    parser.add_argument("--peer-steps", type=int, default=3,
                        help="steps per timed block of the peer section")
    parser.add_argument("--rounds", type=int, default=None, help="alternations per ratio")
    parser.add_argument("--backbones", default=None,
                        help="comma-separated backbones of the targets' utilisation rows "
                             "(the first also times the head and the pipeline)")
    parser.add_argument("--plain-backbone", default="mobilenetv2",
                        help="backbone of the plain-Keras comparison and accuracy check")
    parser.add_argument("--accuracy-train", type=int, default=5000,
                        help="training images for the accuracy check")
    parser.add_argument("--accuracy-epochs", type=int, default=3,
                        help="epochs for the accuracy check")
    parser.add_argument("--sections", default=None,
                        help=f"comma-separated subset of {','.join(SECTIONS)} (default: targets "
                             "with --quick, else targets,levers,accuracy)")
    parser.add_argument("--airbench-batch", type=int, default=1024,
                        help="batch of the airbench and peer sections (its recipe's)")
    parser.add_argument("--airbench-levers", default="float32,mixed_bfloat16",
                        help="precisions whose levers the airbench section times "
                             "(comma-separated: float32, mixed_bfloat16; or none)")
    parser.add_argument("--full-run", help="a recorded full airbench run (a results/runs/ "
                        "directory): its fit time against the FLOP bound at the day's peak "
                        "(section airbench)")
    parser.add_argument("--json", help="also write the table as JSON here")
    parser.add_argument("--markdown", help="also write the table as Markdown here")
    args = parser.parse_args(argv)
    args.sections = (args.sections or ("targets" if args.quick else
                                       "targets,levers,accuracy")).split(",")
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(SECTIONS)}")
    args.airbench_levers = args.airbench_levers.split(",")
    if set(args.airbench_levers) - {"float32", "mixed_bfloat16", "none"}:
        parser.error("--airbench-levers takes float32 and/or mixed_bfloat16, or none")
    if min(args.steps or 2, args.peer_steps) < 2:
        parser.error("--steps and --peer-steps must be >= 2: a rate is timed from the end of "
                     "a block's first step to its last")
    args.batch_size = args.batch_size or (64 if args.quick else 128)
    args.steps = args.steps or (4 if args.quick else 6)
    args.rounds = args.rounds or (3 if args.quick else 5)
    args.backbones = (args.backbones or ("resnet18" if args.quick else
                                         "resnet18,mobilenetv2,efficientnetb0")).split(",")
    args.lever_backbones = ("resnet18", "mobilenetv2")

    tf.get_logger().setLevel("ERROR")  # AutoGraph and deprecation chatter
    started = tf.timestamp()
    # Ratios survive a busy machine; images/s do not. The primitives section's
    # children are this benchmark's own work.
    share = provenance.MachineShare(own_children=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    header = (f"tfmargin benchmark {now:%Y-%m-%d %H:%M} UTC, "
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
        if "targets" in args.sections:
            bench_targets(report, data, load_mock_tfds(args.batch_size * args.steps * 2), args)
        if "levers" in args.sections:
            bench_levers(report, data, args)
        if {"airbench", "peer", "profile"} & set(args.sections):
            big = airbench_data(args, tmp, data)
            if "airbench" in args.sections:
                bench_airbench(report, big, args)
                if args.full_run:
                    bench_full_run(report, big, args, args.full_run)
            if "peer" in args.sections:
                bench_peer(report, big, args)
                with contextlib.suppress(ImportError):
                    bench_peer_layers(report, args)
                    bench_peer_elementwise(report, args)
            if "profile" in args.sections:
                bench_profile(report, big, args)
        if "primitives" in args.sections:
            bench_primitives(report, args)
        if "bf16" in args.sections:
            bench_bf16_layers(report, args)
        if "accuracy" in args.sections and args.dataset:
            bench_accuracy(report, args, os.path.join(tmp, "runs"))
    seconds = float(tf.timestamp() - started)
    others = share.others()
    load = ("" if others is None else
            f"; other processes used {100 * others:.0f} % of the CPU meanwhile")
    print(f"finished in {seconds:.0f} s{load}", flush=True)
    command = f"python benchmarks/bench.py {' '.join(sys.argv[1:] if argv is None else argv)}"
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(f"{header}\n\n`{command}` ({seconds:.0f} s{load})\n\n" + report.markdown())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "command": command, "seconds": seconds,
                       "cpu_share_of_other_processes": others,
                       "machine": provenance.cpu_description(),
                       "code": provenance.code_version(), "versions": provenance.library_versions(),
                       "rows": report.rows}, f, indent=2)
    return report


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
