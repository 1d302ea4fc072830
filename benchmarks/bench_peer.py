"""Against PyTorch on the same CPU: whole training steps (airbench94 and the main command's
MobileNetV2) and airbench's layers one at a time."""

from functools import partial

import keras
import numpy as np
from bench_airbench import XlaBatchNormalization, layer_step_rate, the_other
from setups import RunSetup, airbench_setup
from timing import paired, steps_per_second

from tfmargin.activations import FusedGELU
from tfmargin.names import BATCHNORMS, GELU_BACKBONES
from tfmargin.runner.config import RunConfig


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
