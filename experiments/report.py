"""Regenerate docs/results.md and the README's results blocks from the ledger.

    python experiments/report.py --collect runs     # copy finished runs into results/runs
    python experiments/report.py                    # docs/results.md, README blocks, figures
    python experiments/report.py --check            # do the committed documents match?

The ledger, ``results/runs/<run>/``, holds each reported run's small files (docs/training.md);
the prose of docs/results.md is ``results_template.md``, each ``{{block}}`` in it and each
README block between ``results:`` markers written here from the ledger.
"""

import argparse
import os
import re

import head_recipes
import readme_blocks
import served_scores
from ledger import LEDGER, ROOT, collect
from margin_sweep import margin_curves, sweep_table, sweep_verdict
from selection import selection
from sweep import PAPER_HEAD
from tables import (
    BACKBONE_COLUMNS,
    KERNEL_SETTINGS,
    at_recipe_kernels,
    command,
    load_runs,
    paper_table,
    runs_table,
    seed_table,
    setting_key,
    setting_name,
)

from tfmargin.metrics import PREDICTIONS_FILE
from tfmargin.runner.config import RunConfig, dataset_label
from tfmargin.runner.recipes import MARGIN_HEAD_LEARNING_RATE

README_BLOCKS = ("headline", "main-command", "open-set", "paper")
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results_template.md")
# The paper's "mAP" (percent), cross-entropy / angular margin (ArcFace formula, s=1, m=0.1).
PAPER = {"cifar10": {"resnet18": (65.2, 65.4), "efficientnetb0": (84.66, 85.2),
                     "mobilenetv2": (59.01, 58.88)},
         "cifar100": {"resnet18": (60.16, 59.8), "efficientnetb0": (62.2, 63.01),
                      "mobilenetv2": (58.94, 59.05)}}
OPEN_SET_COLUMNS = (*((f"open_set.{key}.auroc", f"AUROC {name}") for key, name in (
    ("max_logit", "max logit"), ("msp", "MSP"), ("energy", "energy"), ("feature_norm", "norm"),
    ("knn", "kNN"))), ("open_set.max_logit.oscr", "OSCR"),
    ("open_set.closed_set_top1", "closed-set top-1"), ("calibration.before.ece", "ECE"),
    ("calibration.after.ece", "ECE after"), ("reject.unknown_rejected", "unknowns rejected"),
    ("reject.test_rejected", "known rejected"))


def is_converged(run):
    return run["config"]["recipe"] == "airbench" and not ("val" in run["metrics"] or run[
        "config"]["classes"])


def is_main_command(run):
    """Whether a run is the main command as typed (with ``--dataset``, ``--seed``) at the
    defaults."""
    config = run["config"]
    typed = (f"python experiments/run.py --backbone mobilenetv2 --loss {config['loss']} "
             f"--dataset {config['dataset']}" + (f" --seed {config['seed']}" * bool(
                 config["seed"])))
    return config["loss"] in ("arcface", "softmax") and command(config) in (
        typed + " --no-mixed-precision", typed + " --mixed-precision")


def is_selection(run):
    return "val" in run["metrics"] and not is_main_command(run) and not run["config"]["classes"]


def is_table1(run):
    """A run of Table 1: a paper's backbone at the main command's settings (any seed), with
    softmax, the paper's head (s=1, m=0.1, fallback none) or today's ArcFace."""
    config, head = run["config"], ("seed", "scale", "margin", "fallback")
    main = RunConfig(backbone=config["backbone"], loss=config["loss"], dataset=config["dataset"],
                     mixed_precision=config["mixed_precision"]).resolved()
    return (config["backbone"] in BACKBONE_COLUMNS and config["loss"] in ("softmax", "arcface")
            and setting_key(config, head) == setting_key(main.record(), head)
            and (config["loss"] == "softmax" or tuple(config[k] for k in head[1:]) in (
                tuple(PAPER_HEAD[k] for k in head[1:]), (main.scale, main.margin, "monotonic"))))


def varied(runs, key):
    """The runs of the settings run at more than one value of ``key``, otherwise alike."""
    values = {}
    for run in runs:
        values.setdefault(setting_key(run["config"], ("seed", key)), set()).add(
            run["config"][key])
    return [r for r in runs if len(values[setting_key(r["config"], ("seed", key))]) > 1]


def kernels(runs):
    """Each fused kernel against Keras's, paired by seed, where both were run."""
    return "\n".join(seed_table(varied(runs, key), baseline=f"Keras {name}", arm_title=name,
                                arm=lambda config, key=key: setting_name(config, key),
                                arm_fields=(key,))
                     for key, name in KERNEL_SETTINGS.items() if varied(runs, key)
                     ) or "No run with a fused kernel has its Keras twin yet.\n"


def learning_rates(runs):
    """Every setting run at several learning rates, on validation, paired by seed."""
    compared = varied([r for r in runs if "val" in r["metrics"]], "learning_rate")
    return compared and seed_table(
        compared, columns=(("val.top1", "val top-1"), ("val.mAP", "val mAP"),
                           ("val.map_at_r", "val MAP@R")), arm_title="learning rate",
        baseline=f"lr {MARGIN_HEAD_LEARNING_RATE:g}", arm_fields=("learning_rate",),
        arm=lambda config: f"lr {config['learning_rate']:g}")


def paper(runs, ledger, docs_dir, plots):
    """Table 1 (mAP with the paper's, top-1) at the main command's budget, Figure 2 with its
    table, Table 2."""
    table1 = [r for r in runs if is_table1(r)]
    figure = ""
    if margin_curves(runs):  # decided without matplotlib: --check draws nothing
        if plots is not None:
            plots.plot_margin_sweep(runs, ledger, os.path.join(docs_dir, "figure2.png"))
        figure = "![mAP and top-1 against m](figure2.png)\n\n" + sweep_table(runs, ledger)
    return {"paper": readme_blocks.paper(table1, runs),
            "table1_map": paper_table(table1, PAPER["cifar10"]),
            "table1_top1": paper_table(table1, metric="top1"),
            "figure2": figure or "No margin sweep is recorded yet.\n",
            "figure2_verdict": sweep_verdict(runs, ledger),
            "table2": paper_table([], PAPER["cifar100"])}


def converged_studies(converged, choices):
    """``{study: runs}`` of the converged runs (``readme_blocks.CONVERGED_STUDIES``): each
    head at airbench's own settings, and each at its choice on validation (``choices``:
    ``head_recipes.choices``; empty until every head has one)."""
    chosen = {loss: choice for loss, (choice, _) in choices.items()}
    if None in chosen.values():
        chosen = {}
    studies = {"as tuned for softmax": [], "chosen": []}
    for run in converged:
        loss, settings = run["config"]["loss"], head_recipes.settings(run["config"])
        if loss in head_recipes.START and settings == head_recipes.airbench_settings(loss):
            studies["as tuned for softmax"].append(run)
        if chosen.get(loss) == settings:
            studies["chosen"].append(run)
    return studies


def commands(runs, ledger):
    """Each run's command, marked where the run kept its per-image outputs."""
    return "".join(
        f"- `{run['name']}`: `{command(run['config'])}`"
        + (" (per-image outputs)" if os.path.exists(
            os.path.join(ledger, run["name"], PREDICTIONS_FILE)) else "") + "\n"
        for run in runs)


def results_blocks(runs, ledger, docs_dir, plots):
    """``{name: Markdown}``: every block of docs/results.md's template and the README."""
    converged = [r for r in runs if is_converged(r)]
    main = [r for r in runs if is_main_command(r)]
    open_set = [r for r in runs if r["config"]["classes"]
                and not served_scores.is_development(r["config"])]
    choices = head_recipes.choices(head_recipes.candidates(runs))
    studies = converged_studies([r for r in converged if at_recipe_kernels(r)], choices)
    # The headline is the study at each head's chosen settings once it pairs, else the
    # study at airbench's own; results.md shows the other beside it.
    study = "chosen" if readme_blocks.is_paired(studies["chosen"]) else "as tuned for softmax"
    return {
        "headline": readme_blocks.headline(studies[study], study),
        "beside_headline": readme_blocks.beside_headline(studies, study, waiting=sum(
            choice is None for choice, _ in choices.values())),
        "converged": seed_table(converged),
        "kernels": kernels(converged),
        "main_command": readme_blocks.main_command(main, studies[study], study),
        "learning_rates": learning_rates(runs) or "No setting has runs at two rates yet.\n",
        "open_set": readme_blocks.open_set(open_set),
        "far_away": readme_blocks.far_away(runs),
        "served_scores": served_scores.table(runs),
        "open_set_table": seed_table(open_set, columns=OPEN_SET_COLUMNS, pair_by="classes",
                                     pairs_name="splits"),
        "head_recipes": head_recipes.table(runs),
        "selection": selection([r for r in runs if is_selection(r)], main, open_set, ledger),
        **paper(runs, ledger, docs_dir, plots),
        "fingerprints": "; ".join(sorted({
            f"`{dataset_label(r['config']['dataset'])}` "
            f"`{r['config'].get('data_fingerprint', '?')[:16]}`" for r in runs})),
        "runs": runs_table(runs),
        "commands": commands(runs, ledger),
    }


def readme_with_blocks(readme, blocks):
    """The README with each ``<!-- results:NAME -->`` ... ``<!-- /results:NAME -->`` block
    rewritten: NAME is one of ``README_BLOCKS``, its text ``blocks``' (``results_blocks``)."""
    for name in README_BLOCKS:
        start, end = f"<!-- results:{name} -->\n", f"<!-- /results:{name} -->"
        if start not in readme or end not in readme:
            raise ValueError(f"README.md has no {start.strip()} ... {end} block")
        head, rest = readme.split(start, 1)
        readme = head + start + blocks[name.replace("-", "_")] + end + rest.split(end, 1)[1]
    return readme


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--collect", metavar="RUNS_DIR",
                        help="first copy the finished runs of RUNS_DIR into the ledger")
    parser.add_argument("--ledger", default=LEDGER, help="the run records to report")
    parser.add_argument("--output", default=os.path.join(ROOT, "docs", "results.md"))
    parser.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    parser.add_argument("--no-plots", action="store_true",
                        help="write the Markdown only (no matplotlib)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if the documents are not the report")
    args = parser.parse_args(argv)
    if args.collect:
        print(f"collected {len(collect(args.collect, args.ledger))} runs into {args.ledger}")
    runs, plots = load_runs(args.ledger), None
    if not (args.no_plots or args.check):
        import plots
    docs_dir = os.path.dirname(args.output) or "."
    blocks = results_blocks(runs, args.ledger, docs_dir, plots)
    with open(TEMPLATE) as template, open(args.readme) as readme:
        documents = {args.output: re.sub(r"\{\{(\w+)\}\}", lambda m: blocks[m.group(1)],
                                         template.read()),
                     args.readme: readme_with_blocks(readme.read(), blocks)}
    for path, text in documents.items():
        if args.check:
            with open(path) as f:
                if f.read() != text:
                    parser.exit(1, f"report.py: {path} differs from the report of "
                                   f"{args.ledger}; run python experiments/report.py\n")
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    print(f"{args.output} and {args.readme} {'are' if args.check else 'written as'} the report "
          f"of {len(runs)} runs")


if __name__ == "__main__":
    main()
