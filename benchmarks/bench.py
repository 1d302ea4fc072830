"""Training speed, measured side by side: ratios with targets, FLOP/s against the measured peak.

    python benchmarks/bench.py --quick                 # the targets, under 10 minutes (2 cores)
    python benchmarks/bench.py --sections peer --json benchmarks/peer.json   # against PyTorch
    python benchmarks/bench.py --dataset ../shared/datasets/cifar10-jpeg   # + accuracy check
    python benchmarks/bench.py --sections airbench --full-run results/runs/<run>  # vs bound
    python benchmarks/bench.py --sections profile --dataset ../shared/datasets/cifar10-jpeg
    python benchmarks/bench.py --sections primitives   # oneDNN's kernels, Keras vs PyTorch
    python benchmarks/bench.py --sections allocator --backbones mobilenetv2   # per process

Each ratio compares two set-ups timed in alternating blocks of training steps in this
one process (``timing.paired``); the reported ratio is the median over rounds of the
paired ratios, so a machine that speeds up or slows down hits both sides. Images/s are
counted between the end of a block's first step and its last, so tracing, iterator
start-up and shuffle-buffer filling are not in them. Training data is a generated image
folder unless ``--dataset`` names one.
"""

import argparse
import contextlib
import datetime
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tfmargin.quiet import import_tensorflow  # noqa: E402

tf = import_tensorflow()
import keras  # noqa: E402
from allocator import bench_allocator  # noqa: E402
from bench_airbench import bench_airbench, bench_bf16_layers, bench_full_run  # noqa: E402
from bench_peer import bench_peer, bench_peer_elementwise, bench_peer_layers  # noqa: E402
from bench_profile import bench_primitives, bench_profile  # noqa: E402
from bench_targets import (  # noqa: E402
    bench_accuracy,
    bench_budget,
    bench_levers,
    bench_targets,
    load_mock_tfds,
)
from setups import airbench_data, write_random_folder  # noqa: E402

from tfmargin.data import load_dataset  # noqa: E402
from tfmargin.runner import provenance  # noqa: E402


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



def machine():
    """CPU model, cores, bfloat16-relevant flags, memory and GPUs, in words."""
    cpu = provenance.cpu_description()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpus = tf.config.list_physical_devices("GPU")
    family = f" (family/model {cpu['family']})" if cpu["family"] else ""
    flags = " ".join(cpu["flags"]) or "none"
    return (f"{cpu['model']}{family}, {cpu['cores']} cores (flags: {flags}), {memory:.0f} GiB"
            + (f", {len(gpus)} GPU(s)" if gpus else ", no GPU"))



SECTIONS = ("targets", "levers", "budget", "allocator", "accuracy", "airbench", "bf16", "peer",
            "profile", "primitives")



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
        if "budget" in args.sections:
            bench_budget(report, data, args)
        if "allocator" in args.sections:
            bench_allocator(report, args)
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
