"""oneDNN's own timing of each primitive in a bfloat16 airbench94 step, Keras and PyTorch.

TensorFlow and PyTorch both run their CPU convolutions through oneDNN. With
``ONEDNN_VERBOSE=1`` oneDNN prints one line per primitive it executes: the implementation
it chose, the memory formats, the problem (e.g. ``mb1024_ic256oc256_ih7oh7kh3...``) and
the milliseconds it took. Comparing those lines says whether the two frameworks run the
same kernels, and which kernel is slower in which framework.

The verbose mode is read when the process starts, so each framework's step runs in a
child process of its own (``bench.py --sections primitives`` starts them):

    ONEDNN_VERBOSE=1 python benchmarks/onednn.py keras --batch 1024 --steps 2

The child traces and warms the step, prints ``MARKER``, runs ``--steps`` steps, and prints
their wall time per step; only the lines after the marker are counted. Keras's child runs
one step more and prints the marker at the end of the first, since ``bench.py`` counts a
rate from the end of a fit's first step: the wall time and the primitives cover the same
steps. PyTorch's child trains on random
images (a convolution's time does not depend on the pixel values) and imports neither
TensorFlow nor this project, so it can run under another Python with another PyTorch build
(``bench.py --peer-python``), one that bundles another oneDNN. TensorFlow's child
runs one op at a time (``TF_NUM_INTEROP_THREADS=1``): two ops at once would each be timed
while sharing the two threads, so a primitive's time would not be its own.
"""

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

MARKER = "== timed steps =="
WALL = "wall ms per step:"


def primitive_times(text, steps):
    """``{(kind, propagation, problem): {"ms": per step, "count": per step, "impls": set}}``
    from oneDNN verbose ``text``, counting the ``exec`` lines after ``MARKER`` (the v1
    format: ``onednn_verbose,v1,primitive,exec,cpu,<kind>,<implementation>,<propagation>,
    <memory formats>,<attributes>,<auxiliary>,<problem>,<ms>``; the older format has no
    ``v1,primitive``). ``impls`` holds (implementation, memory formats) pairs."""
    _, _, timed = text.partition(MARKER)
    times = collections.defaultdict(lambda: {"ms": 0.0, "count": 0.0, "impls": set()})
    for line in timed.splitlines():
        fields = line.split(",")
        if not fields[0].endswith("_verbose") or "exec" not in fields[:4]:
            continue
        at = fields.index("exec")
        kind, impl, propagation, formats = fields[at + 2:at + 6]
        entry = times[(kind, propagation, fields[-2])]
        entry["ms"] += float(fields[-1]) / steps
        entry["count"] += 1 / steps
        entry["impls"].add((impl, formats))
    return dict(times)


def build(text):
    """``oneDNN v3.7.3, threadpool runtime, 2 threads`` from the verbose header lines (the
    version a framework bundles and how it runs oneDNN's threads), or None without them."""
    version = re.search(r"_verbose,(?:v1,)?info,oneDNN (v[\w.]+)", text)
    runtime = re.search(r"_verbose,(?:v1,)?info,cpu,runtime:(\w+),nthr:(\d+)", text)
    if not (version and runtime):
        return None
    return f"oneDNN {version[1]}, {runtime[1]} runtime, {runtime[2]} threads"


def wall_ms(text):
    """The child's wall time per timed step, or None where it printed none."""
    for line in text.splitlines():
        if line.startswith(WALL):
            return float(line[len(WALL):])
    return None


def run_child(framework, batch, steps, dataset=None, python=None):
    """Run this file for ``framework`` under ``ONEDNN_VERBOSE=1``, with ``python`` (default:
    this interpreter): the finished process (its ``stdout`` holds the verbose lines)."""
    command = [python or sys.executable, os.path.abspath(__file__), framework, "--batch",
               str(batch),
               "--steps", str(steps)] + (["--dataset", dataset] if dataset else [])
    env = {**os.environ, "ONEDNN_VERBOSE": "1", "TF_NUM_INTEROP_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, env=env)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("framework", choices=("keras", "pytorch"))
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dataset", help="image folder of Keras's batches (default: "
                                          "generated random JPEGs)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if args.framework == "keras":
        time_keras(args.batch, args.steps, args.dataset)
    else:
        time_pytorch(args.batch, args.steps)


def time_keras(batch, steps, dataset):
    """The Keras port's bfloat16 airbench94 step, as ``bench.py`` times it."""
    import keras
    import setups

    class MarkAfterFirstStep(keras.callbacks.Callback):
        def on_train_batch_end(self, step, logs=None):
            if step == 0:
                print(MARKER, flush=True)

    settings = argparse.Namespace(airbench_batch=batch, steps=steps + 1,
                                  peer_steps=steps + 1, dataset=dataset)
    with tempfile.TemporaryDirectory() as tmp:
        setup = setups.airbench_setup(setups.airbench_data(settings, tmp), settings,
                                      steps + 1, mixed_precision=True)
        memory = setup.cached_batches(steps + 1)
        setup.rate(memory)  # traced and warm
        # From the end of the first step to the end of the last: ``steps`` steps.
        ms = 1000 * batch / setup.rate(memory, callbacks=[MarkAfterFirstStep()])
    print(f"{WALL} {ms:.3f}", flush=True)


def time_pytorch(batch, steps):
    """PyTorch's bfloat16 airbench94 step (``peers.py``) on a random batch."""
    import numpy as np
    import peers

    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, 32, 32, 3)).astype("float32")
    step = peers.training_step("airbench94", images, rng.integers(0, 10, batch), bfloat16=True)
    for _ in range(2):  # warm: oneDNN creates its primitives on first use
        step()
    print(MARKER, flush=True)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    print(f"{WALL} {1000 * (time.perf_counter() - started) / steps:.3f}", flush=True)


if __name__ == "__main__":
    main()
