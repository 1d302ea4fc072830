"""Where a CPU training step's tensors get their memory: the allocator, timed per process.

On a CPU TensorFlow takes each step's tensors from the C library's ``malloc``; a tensor of
tens of megabytes (MobileNetV2's activations at batch 128) is above glibc's largest
``mmap`` threshold, so it is mapped and unmapped every step and every page of it faults in
again, zero-filled: time the kernel spends, not the step. Two switches keep that memory:
TensorFlow's own best-fit allocator on the CPU (``TF_CPU_ALLOCATOR_USE_BFC=true``, which
reuses what it once took) and glibc's transparent huge pages for ``malloc`` (a 2 MiB page
per fault instead of 4 KiB; ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``). Both are read when
the process starts, so each set-up is timed in a child process of its own, the set-ups in
alternating rounds (``bench.py --sections allocator`` starts them):

    python benchmarks/allocator.py mobilenetv2 --batch 128 --steps 3 --blocks 3

The child prints its images/s (the median of ``--blocks`` timed blocks of the real
step on in-memory batches) and the minor page faults per step (the timed fits' own,
start-up's excluded).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile

# Set-up name -> the environment a child starts with (beside the parent's).
ALLOCATORS = {
    "default": {},
    "TensorFlow BFC": {"TF_CPU_ALLOCATOR_USE_BFC": "true"},
    "glibc huge pages": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}
RESULT = "ALLOCATOR_RESULT "


def transparent_huge_pages(path="/sys/kernel/mm/transparent_hugepage/enabled"):
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or
    ``None`` where it cannot be read: under ``always`` every large mapping already gets
    huge pages and the glibc switch changes little."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.index("[") + 1:text.index("]")] if "[" in text else None


def child_rate(backbone, batch, steps, blocks, environment):
    """Start a child under ``environment``; its ``{"rate": images/s, "faults": per step}``."""
    command = [sys.executable, os.path.abspath(__file__), backbone, "--batch", str(batch),
               "--steps", str(steps), "--blocks", str(blocks)]
    done = subprocess.run(command, env={**os.environ, **environment}, capture_output=True,
                          text=True, timeout=1800, check=False)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    raise RuntimeError(f"allocator child failed ({done.returncode}): {done.stderr[-2000:]}")


def measure(backbone, batch, steps, blocks, rounds):
    """Each set-up of ``ALLOCATORS`` timed in ``rounds`` alternating rounds of children:
    ``{name: {"ratio": median paired ratio to the default, "rate": median images/s,
    "faults": median faults per step}}``."""
    results = {name: [] for name in ALLOCATORS}
    for _ in range(rounds):
        for name, environment in ALLOCATORS.items():
            results[name].append(child_rate(backbone, batch, steps, blocks, environment))
    default = results["default"]
    return {name: {"ratio": statistics.median(r["rate"] / d["rate"]
                                              for r, d in zip(runs, default, strict=True)),
                   "rate": statistics.median(r["rate"] for r in runs),
                   "faults": statistics.median(r["faults"] for r in runs)}
            for name, runs in results.items()}


def bench_allocator(report, args):
    """``bench.py --sections allocator``: each set-up's step against the default's, for
    each of ``args.backbones`` at float32 (the precision of every backbone on a CPU without
    bfloat16 instructions), with the kernel's huge page mode that day."""
    mode = transparent_huge_pages() or "unreadable"
    for backbone in args.backbones:
        results = measure(backbone, args.batch_size, args.steps, blocks=3, rounds=args.rounds)
        base = results["default"]
        for name, result in results.items():
            if name == "default":
                continue
            report.add("allocator", f"{backbone} float32 step: {name} / default",
                       result["ratio"], "x",
                       note=f"{result['rate']:.1f} vs {base['rate']:.1f} img/s; minor page "
                            f"faults per step {result['faults']:.0f} vs {base['faults']:.0f}; "
                            f"batch {args.batch_size}, kernel huge pages: {mode}")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("backbone")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=3, help="timed blocks (median)")
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tfmargin.quiet import import_tensorflow

    import_tensorflow()  # before the set-ups import Keras, so its start-up is quiet
    from setups import RunSetup, write_random_folder

    from tfmargin.data import load_dataset
    with tempfile.TemporaryDirectory() as tmp:
        data = load_dataset(write_random_folder(os.path.join(tmp, "data")))
        setup = RunSetup(data, args.steps, backbone=args.backbone, loss="arcface",
                         batch_size=args.batch, mixed_precision=False)
        batches = setup.cached_batches(args.steps)
        setup.rate(batches)  # traced and warmed: its faults are start-up's
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        rates = [setup.rate(batches) for _ in range(args.blocks)]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    result = {"rate": statistics.median(rates), "faults": faults / (args.blocks * args.steps)}
    print(RESULT + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
