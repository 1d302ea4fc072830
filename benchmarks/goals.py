"""The speed goals and their latest verdict on each CPU type, from the committed benchmark
outputs (docs/benchmarks/*.json), written into docs/performance.md between its ``goals``
markers.

    python benchmarks/goals.py            # rewrite the table
    python benchmarks/goals.py --check    # exit 1 if docs/performance.md's table is stale
"""

import argparse
import glob
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUTS = os.path.join(ROOT, "docs", "benchmarks")
DOCUMENT = os.path.join(ROOT, "docs", "performance.md")
START, END = "<!-- goals -->\n", "<!-- /goals -->"
# (goal in words, its target, the rows that measure it: a pattern of the row's name). A row
# measured at the recipe's kernels names them (``--gelu fused --batchnorm fused``); rows from
# before the names were printed measured the defaults of their day.
GOALS = (
    ("airbench94 float32 step: Keras / PyTorch", ">= 1.0",
     r"^airbench94 float32(, --gelu fused --batchnorm fused)?: Keras"),
    ("airbench94 bfloat16 step: Keras / PyTorch", ">= 1.2",
     r"^airbench94 bfloat16(, --gelu fused --batchnorm fused)?: Keras"),
    ("main command's MobileNetV2 step: Keras / PyTorch", ">= 1.0",
     r"^mobilenetv2 float32(, --batchnorm fused)?: Keras"),
    ("airbench94 training FLOP/s / float32 peak, %", ">= 80",
     r"^airbench94 recipe training FLOP/s"),
    ("airbench94 image pipeline / in-memory batches", ">= 0.95", r"^airbench94 image pipeline"),
    ("full airbench run / its FLOP-bound time", "<= 2", r"^full airbench run"),
    ("ArcMarginLayer step / Dense step", "<= 1.02", r"step time ArcMarginLayer / Dense"),
    ("ResNet18 training FLOP/s / matmul peak, %", ">= 50", r"^resnet18 training FLOP/s"),
    ("run.py training / a plain Keras script", ">= 1.0",
     r"run\.py training / plain Keras \(same adapted network\)"),
)


def cpu_type(machine):
    """``Intel Xeon, AMX``, ``AMD EPYC, AVX-512 BF16`` or ``AMD EPYC, no bfloat16``: the
    model and the bfloat16 instructions, which decide a CPU's bfloat16 speed (two EPYC
    generations share the model name; only the newer has AVX-512 BF16)."""
    model = re.sub(r"\(R\)|Processor", "", machine.get("model", "?")).split()
    flags = machine.get("flags", [])
    bfloat16 = ("AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags
                else "no bfloat16")
    return f"{' '.join(model[:2])}, {bfloat16}"


def latest_verdicts(outputs=OUTPUTS):
    """``{(goal, CPU type): (row, file)}``: the newest output's row of each goal per CPU
    type (outputs are named by date, so their names sort by age)."""
    found = {}
    for path in sorted(glob.glob(os.path.join(outputs, "*.json"))):
        with open(path) as f:
            output = json.load(f)
        for goal, _, pattern in GOALS:
            for row in output["rows"]:
                if row["target"] and re.search(pattern, row["name"]):
                    found[goal, cpu_type(output["machine"])] = row, os.path.basename(path)
    return found


def table(outputs=OUTPUTS):
    verdicts = latest_verdicts(outputs)
    cpus = sorted({cpu for _, cpu in verdicts})
    lines = ["| goal | target | " + " | ".join(cpus) + " |", "|" + "---|" * (len(cpus) + 2)]
    for goal, target, _ in GOALS:
        cells = []
        for cpu in cpus:
            if (goal, cpu) not in verdicts:
                cells.append("not measured")
                continue
            row, name = verdicts[goal, cpu]
            cells.append(f"{'met' if row['passed'] else '**missed**'}: {row['value']:.3f} "
                         f"([{name[:10]}](benchmarks/{name[:-5]}.md))")
        lines.append(f"| {goal} | {target} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the table is not the outputs'")
    args = parser.parse_args(argv)
    with open(DOCUMENT) as f:
        text = f.read()
    head, rest = text.split(START, 1)
    new = head + START + table() + END + rest.split(END, 1)[1]
    if args.check:
        if new != text:
            parser.exit(1, "goals.py: docs/performance.md's goals table is stale; run python "
                           "benchmarks/goals.py\n")
        print("docs/performance.md's goals table is the benchmark outputs'")
        return
    with open(DOCUMENT, "w") as f:
        f.write(new)
    print("wrote docs/performance.md's goals table")


if __name__ == "__main__":
    main()
