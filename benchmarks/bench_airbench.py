"""The airbench recipe's speed: FLOP/s against the day's peaks, a recorded full run against
its FLOP bound, its levers in either precision, and each layer kind in bfloat16 against
float32; with the benchmark's XLA-fused BatchNorm variant."""

import json
import os
from functools import cache, partial

import keras
import tensorflow as tf
from setups import airbench_setup
from timing import (
    conv_peak,
    gflop,
    matmul_peak,
    paired,
    steps_per_second,
    training_flops_per_image,
)

from tfmargin.activations import FusedGELU
from tfmargin.names import BATCHNORMS, GELUS
from tfmargin.runner.config import RunConfig


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


def the_other(choices, value):
    """The choice of a two-way setting (``--gelu``, ``--batchnorm``) that is not ``value``."""
    return next(choice for choice in choices if choice != value)


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
