"""Each study behind the documents' figures: the sweeps that make it, and what it still lacks.

    python experiments/studies.py --dataset DATA       # every study: runs recorded, to train
    python experiments/studies.py --dataset DATA --far-ood data/fashion-mnist \
        --run selection open-set                        # train what those two lack, in order

A study is a list of ``sweep.py`` commands. A run already in the ledger (results/runs) is not
trained again, so a study goes on where the last machine left it. The hours are the median
wall time of the ledger's runs of the same budget and precision on this CPU (family/model);
where the ledger has none, a standard-recipe run's training time from this CPU's budget
benchmark (marked ``~``); else ``?``. The same hours for every other CPU type the ledger or
the benchmarks know sit beside them, so a study goes to the machine that runs it cheapest.
The airbench studies train in bfloat16 mixed precision, as their recorded runs did (a run's
name holds its precision, so float32 runs would pair only with each other); on a CPU
without bfloat16 instructions, where bfloat16 runs several times slower than float32,
``--run`` leaves them out and says so.
"""

import argparse
import glob
import json
import os
import statistics

import head_recipes
import sweep
from ledger import LEDGER, ROOT, dataset_path_mismatch
from tables import load_runs

BENCHMARKS = os.path.join(ROOT, "docs", "benchmarks")
# The budget benchmark's row of one main-command run's training (after "<backbone>: ").
BUDGET_MEASURE = "one main-command run's training, 45,000 x 5 epochs"

# Every head at each label smoothing (sweep.py --heads), at the scale and margin the
# selection starts from (docs/recipe.md), whatever the heads' defaults become.
SMOOTHED_HEADS = ",".join(f"{head}:ls={ls}" for head in ("softmax", "arcface:s=8:m=0.1",
                                                          "cosface:s=8:m=0.1", "normface:s=8")
                          for ls in head_recipes.SMOOTHINGS)
AIRBENCH = ["--recipe", "airbench", "--mixed-precision"]
PAIRED_SEEDS = "0,1,2,3,4"  # the converged studies' paired seeds
VALIDATION = ["--val-split", "0.1"]


def selection_commands(ledger):
    """The sweeps of the runs the per-head selection waits on now (head_recipes.py): each
    step's runs follow from the last step's results."""
    chosen = head_recipes.choices(head_recipes.candidates(load_runs(ledger)))
    return head_recipes.sweep_commands({loss: needed for loss, (_, needed) in chosen.items()
                                        if needed})


def chosen_pairs_commands(ledger):
    """The paired study at each head's chosen settings (5 seeds, all 50,000 images), once the
    selection has chosen for every head; a run whose settings did not change is the
    converged pairs' own and is not trained again."""
    chosen = head_recipes.choices(head_recipes.candidates(load_runs(ledger)))
    if any(choice is None for choice, _ in chosen.values()):
        return []
    return head_recipes.sweep_commands(
        {loss: [(choice, PAIRED_SEEDS)] for loss, (choice, _) in chosen.items()},
        val_split="0")


# name: (what it is and which document shows it, its sweeps in order, or a function of the
# ledger giving them). Listed in the order a machine should run them: the choices first, the
# studies that use them after.
STUDIES = {
    "reject-dev-standard": (
        "the main command's served reject score, chosen on validation (results.md)",
        [["reject-dev", "--backbones", "mobilenetv2", *VALIDATION,
          "--heads", "arcface,softmax", "--seeds", "0,1"]]),
    "selection": (
        "each head's airbench settings on validation, the runs its rule's next step needs "
        "(experiments/head_recipes.py; results.md, how each setting was chosen)",
        selection_commands),
    "smoothing-open-set": (
        "the same settings on open-set split 0: AUROC on validation (the selection table)",
        [["open-set", *AIRBENCH, *VALIDATION, "--splits", "0", "--seeds", "1",
          "--heads", SMOOTHED_HEADS]]),
    "open-set": (
        "the served reject score on the 4 distinct splits (README, open-set block)",
        [["open-set", *AIRBENCH, *VALIDATION, "--heads", "softmax,arcface", "--seeds", "1,2"],
         ["open-set", *AIRBENCH, *VALIDATION, "--heads", "cosface,normface", "--seeds", "1"]]),
    "table1": (
        "the paper's Table 1 at the main command's budget (results.md, the paper's tables)",
        [["table1", "--backbones", backbone, *VALIDATION, "--seeds", "0,1"]
         # EfficientNetB0 first: it trains in float32 on every CPU (names.BFLOAT16_FASTER_ON_CPU).
         for backbone in ("efficientnetb0", "resnet18", "mobilenetv2")]),
    "figure2-airbench": (
        "the paper's Figure 2 at convergence, s = 8, airbench's label smoothing 0.2 whatever "
        "ArcFace's default becomes (docs/figure2.png)",
        [["figure2", *AIRBENCH, *VALIDATION, "--scales", "8", "--label-smoothing", "0.2"]]),
    "figure2-short": (
        "the paper's Figure 2 on MobileNetV2, 5,000 images x 2 epochs (docs/figure2.png)",
        [["figure2", "--backbones", "mobilenetv2", "--limit-train", "5000", "--epochs", "2",
          *VALIDATION]]),
    "converged-pairs": (
        "softmax, ArcFace and NormFace on all 50,000 images, 5 seeds, every head at airbench's "
        "settings as tuned for softmax (README headline)",
        [["heads", *AIRBENCH, "--val-split", "0", "--seeds", PAIRED_SEEDS,
          "--heads", "softmax:ls=0.2,arcface:s=8:m=0.1:ls=0.2,normface:s=8:ls=0.2"]]),
    "chosen-pairs": (
        "every head at its chosen settings on all 50,000 images, 5 seeds, paired (README "
        "headline); planned once the selection has chosen for every head",
        chosen_pairs_commands),
}
# The sweeps that score images of no CIFAR class take --far-ood when it is given.
FAR_OOD_GRIDS = ("open-set",)


def sweep_argv(command, args):
    """A study's sweep command with this invocation's data, ledger and runs folder."""
    argv = [*command, "--dataset", args.dataset, "--ledger", args.ledger,
            "--runs-dir", args.runs_dir]
    if args.far_ood and command[0] in FAR_OOD_GRIDS:
        argv += ["--far-ood", args.far_ood]
    return argv


def budget_key(*, backbone, recipe, epochs, limit_train, val_split, mixed, classes):
    """What sets a run's wall time, besides the head: the key the hour estimate groups by."""
    return (backbone, recipe, epochs, limit_train, val_split, bool(mixed),
            len([c for c in classes.split(",") if c]))


def hours_per_run(runs, family):
    """Median hours of the ledger's ``runs`` per budget key, on the CPU ``family`` only."""
    walls = {}
    for run in runs:
        c = run["config"]
        if c.get("machine", {}).get("family") != family or "wall_seconds" not in run["metrics"]:
            continue
        key = budget_key(backbone=c["backbone"], recipe=c["recipe"], epochs=c["epochs"],
                         limit_train=c["limit_train"], val_split=c["val_split"],
                         mixed=c["mixed_precision"], classes=c["classes"])
        walls.setdefault(key, []).append(run["metrics"]["wall_seconds"] / 3600)
    return {key: statistics.median(hours) for key, hours in walls.items()}


def benchmark_hours(family, folder=BENCHMARKS):
    """``{backbone: hours}`` of one main-command run's training (45,000 images x 5 epochs,
    the standard recipe) on the CPU ``family``, from its newest committed ``budget``
    benchmark (benchmarks/bench_targets.py writes the rows)."""
    hours = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.json")), reverse=True):
        with open(path) as f:
            output = json.load(f)
        if output.get("machine", {}).get("family") != family:
            continue
        for row in output["rows"]:
            backbone, _, measure = row["name"].partition(": ")
            if row["section"] == "budget" and measure == BUDGET_MEASURE:
                hours.setdefault(backbone, row["value"])
    return hours


def estimate(config, hours, benchmark):
    """``(hours, from the benchmark)`` of one run on this CPU: the ledger's median for its
    budget, else for a standard-recipe run of the main command's budget the benchmark's
    training time scaled by its share of the classes, else ``(None, False)``."""
    classes = config.class_list()
    known = hours.get(budget_key(
        backbone=config.backbone, recipe=config.recipe, epochs=config.epochs,
        limit_train=config.limit_train, val_split=config.val_split,
        mixed=config.resolved_mixed_precision(), classes=config.classes))
    if known is not None:
        return known, False
    if ((config.recipe, config.epochs, config.limit_train, config.val_split)
            == ("standard", 5, 0, 0.1) and config.backbone in benchmark):
        return benchmark[config.backbone] * (len(classes) if classes else 10) / 10, True
    return None, False


def study_commands(name, ledger):
    """A study's sweep commands (for the selection, those of its next step)."""
    commands = STUDIES[name][1]
    return commands(ledger) if callable(commands) else commands


def study_plan(name, args):
    """``[(sweep argv, [(state, RunConfig), ...]), ...]`` of one study."""
    parser = sweep.build_parser()
    plan = []
    for command in study_commands(name, args.ledger):
        sweep_args = parser.parse_args(sweep_argv(command, args))
        plan.append((sweep_argv(command, args),
                     [(sweep.run_state(config, args.ledger), config)
                      for config in sweep.planned_runs(sweep_args, parser)]))
    return plan


def cpu_families(runs, folder=BENCHMARKS):
    """``{family: model name}`` of every CPU type a ledger run or a committed benchmark ran
    on."""
    machines = [run["config"].get("machine", {}) for run in runs]
    for path in glob.glob(os.path.join(folder, "*.json")):
        with open(path) as f:
            machines.append(json.load(f).get("machine", {}))
    families = {}
    for machine in machines:
        if machine.get("family"):
            families.setdefault(machine["family"], machine.get("model", "?"))
    return families


def hours_to_train(todo, hours, benchmark):
    """The hours ``todo`` (RunConfigs) would take on one CPU type, as the table prints them:
    ``~`` where some come from the budget benchmark, ``?`` where any is unknown."""
    estimates = [estimate(config, hours, benchmark) for config in todo]
    if any(h is None for h, _ in estimates):
        return "?"
    return "~" * any(b for _, b in estimates) + f"{sum(h for h, _ in estimates):.1f}"


def status_table(plans, cpus, selection_runs):
    """One row per study: runs, recorded, to train, the hours to train on each CPU type
    (``cpus``: ``{column title: (hours_per_run, benchmark_hours)}``, this CPU's first; ``~``:
    some from the budget benchmark, training only) (the selection: its recorded candidates,
    ``selection_runs``, and its next step)."""
    rows = [("study", "runs", "recorded", "to train", *cpus, "what")]
    for name, plan in plans.items():
        runs = [run for _, planned in plan for run in planned]
        todo = [config for state, config in runs if state != "recorded"]
        if name == "selection":
            runs += [("recorded", None)] * selection_runs
        elif not plan and callable(STUDIES[name][1]):  # planned once another study chose
            rows.append((name, "?", "0", "?", *("?" for _ in cpus), STUDIES[name][0]))
            continue
        rows.append((name, str(len(runs)), str(len(runs) - len(todo)), str(len(todo)),
                     *(hours_to_train(todo, *cpu) for cpu in cpus.values()),
                     STUDIES[name][0]))
    columns = len(rows[0]) - 1
    widths = [max(len(row[i]) for row in rows) for i in range(columns)]
    return "\n".join("  ".join(row[i].ljust(widths[i]) for i in range(columns)) + "  "
                     + row[-1] for row in rows)


def run_study(name, args):
    """Train what a study lacks, sweep by sweep; a study whose commands follow from its
    results (the selection) is asked again until it needs nothing or asks for the same
    runs twice (runs that diverge are never recorded)."""
    from tfmargin.runner import provenance

    done = []
    while True:
        commands = study_commands(name, args.ledger)
        if not commands or commands in done:
            return
        done.append(commands)
        for command in commands:
            if "--mixed-precision" in command and not (
                    provenance.has_bfloat16_instructions() or provenance.has_gpu()):
                print(f"== study {name}: left out, it trains in bfloat16 and this CPU has no "
                      "bfloat16 instructions; run it on one with AVX-512 BF16 or AMX",
                      flush=True)
                return
            argv = sweep_argv(command, args)
            print(f"== study {name}: python experiments/sweep.py {' '.join(argv)}", flush=True)
            try:
                sweep.main(argv)
            except SystemExit as error:  # 3: some runs diverged (Figure 2 expects it)
                if error.code != 3:
                    raise
        if not callable(STUDIES[name][1]):
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True,
                        help="the CIFAR-10 image folder (train/ and test/ of class folders)")
    parser.add_argument("--far-ood", help="a folder of images of no CIFAR class, for the "
                        "open-set sweeps (python experiments/make_fashion_mnist.py FOLDER)")
    parser.add_argument("--ledger", default=LEDGER, help="the results ledger")
    parser.add_argument("--runs-dir", default="runs", help="where runs train")
    parser.add_argument("--run", nargs="+", choices=STUDIES, metavar="STUDY",
                        help="train what these studies lack, in the order given")
    args = parser.parse_args(argv)
    mismatch = dataset_path_mismatch(args.dataset, args.ledger)
    if mismatch:
        parser.exit(2, f"studies.py: error: {mismatch}\n")

    from tfmargin.quiet import import_tensorflow
    from tfmargin.runner.provenance import cpu_description

    import_tensorflow()
    if args.run:
        for name in args.run:
            run_study(name, args)
        return
    plans = {name: study_plan(name, args) for name in STUDIES}
    cpu = cpu_description()
    print(f"on {cpu['model']} (family/model {cpu['family']}), ledger {args.ledger}\n")
    runs = load_runs(args.ledger)
    selection_runs = sum(len(seeds) for found in head_recipes.candidates(runs).values()
                         for seeds in found.values())
    others = {family: model for family, model in cpu_families(runs).items()
              if family != cpu["family"]}
    columns = {"hours here": cpu["family"], **{f"hours {family}": family
                                                for family in sorted(others)}}
    cpus = {title: (hours_per_run(runs, family), benchmark_hours(family))
            for title, family in columns.items()}
    print(status_table(plans, cpus, selection_runs))
    print("\n~: partly the budget benchmark's training time for that CPU "
          "(docs/benchmarks/), without evaluation; ?: no run of that budget on it, or a "
          "study planned once the selection has chosen"
          + "".join(f"\n{family}: {model}" for family, model in sorted(others.items())))


if __name__ == "__main__":
    main()
