"""Where a bfloat16 airbench94 step's time goes: TensorFlow's and PyTorch's profilers by op
and by layer kind, and oneDNN's own timing of each primitive in either framework."""

import collections
import importlib.util
import re
import tempfile
from functools import partial

from bench_airbench import the_other
from bench_peer import peer_step
from setups import airbench_setup
from timing import tensorflow_op_times, torch_op_times

from tfmargin.names import BATCHNORMS
from tfmargin.runner.config import RunConfig

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
