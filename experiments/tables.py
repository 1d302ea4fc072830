"""Markdown tables of recorded runs (the ledger ``results/runs/*/{config,metrics}.json``).
They know this repository's studies, so they live beside ``report.py``, not in the library.
"""

import dataclasses
import glob
import json
import os

import numpy as np

from tfmargin.runner.config import NOT_IDENTITY, RunConfig, dataset_label
from tfmargin.runner.provenance import timed_on_shared_machine

BACKBONE_COLUMNS = ("resnet18", "efficientnetb0", "mobilenetv2")
# Every setting of a run's identity (what its hash covers).
IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig)
                        if f.name not in NOT_IDENTITY)
# The kernel settings of a network (``--gelu``, ``--batchnorm``), named for tables.
KERNEL_SETTINGS = {"gelu": "GELU", "batchnorm": "BatchNorm"}
# A head is compared at its own learning rate (recipes.HEAD_DEFAULTS): part of its arm.
HEAD_FIELDS = ("loss", "scale", "margin", "fallback", "sub_centers", "ce_weight",
               "label_smoothing", "learning_rate")
SEED_METRICS = (("top1", "top-1"), ("tta.top1", "top-1 TTA"), ("mAP", "mAP"),
                ("precision_at_1", "P@1"), ("map_at_r", "MAP@R"))


def complete(record):
    """A run's ``config.json`` with the settings it predates (``RunConfig.from_record``)."""
    return RunConfig.from_record(record).resolved().record() | record


def load_runs(runs_dir):
    """Finished runs (those with metrics.json), sorted by name."""
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "metrics.json"))):
        run_dir = os.path.dirname(path)
        with open(path) as f:
            metrics = json.load(f)
        with open(os.path.join(run_dir, "config.json")) as f:
            config = complete(json.load(f))
        stamp = metrics["finished_at"]  # 2026-12-01T22:24:19Z
        runs.append({"name": os.path.basename(run_dir), "config": config, "metrics": metrics,
                     "finished": f"{stamp[:10]} {stamp[11:16]} UTC"})
    return runs


def at_recipe_kernels(run):
    """Whether a run was built with the GELU and BatchNorm its recipe builds today."""
    c = run["config"]
    recipe = RunConfig.for_recipe(c["recipe"], backbone=c["backbone"]).resolved()
    return (c["gelu"], c["batchnorm"]) == (recipe.gelu, recipe.batchnorm)


def markdown(header, rows):
    """A Markdown table of ``rows`` (lists of cells) under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, row)) + " |" for row in rows]) + "\n"


def percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def mean_sd(values, scale=100):
    """``93.28 ± 0.24``: mean and sample s.d. of ``values`` times ``scale`` (100: fractions in
    percent; 1: as they are), ``-`` if one is None."""
    if None in values:
        return "-"
    values = scale * np.asarray(values, float)
    return f"{values.mean():.2f}" + (f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else "")


def metric_value(run, key):
    """A run's metric by dotted path (``tta.top1``, ``open_set.knn.auroc``), or None."""
    value = run["metrics"]
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def setting_key(config, leave_out=("seed",)):
    """A run's identity without ``leave_out``: runs with equal keys differ only there."""
    return tuple((key, json.dumps(config[key], sort_keys=True))
                 for key in IDENTITY_FIELDS if key not in leave_out)


def recipe_defaults(config):
    """The identity of ``run.py`` at the run's recipe and head with nothing else given."""
    return RunConfig.for_recipe(config["recipe"], loss=config["loss"]).resolved().record()


def command(config):
    """The run.py command of a run: its settings that differ from run.py's defaults, and
    its precision (auto depends on the machine)."""
    defaults = recipe_defaults(config)
    parts = ["python experiments/run.py", *([f"--recipe {config['recipe']}"]
                                            if config["recipe"] != "standard" else []),
             f"--backbone {config['backbone']}", f"--loss {config['loss']}",
             f"--dataset {config['dataset']}"]
    for key in IDENTITY_FIELDS:
        value = config[key]
        if key in ("backbone", "loss", "dataset", "recipe", "mixed_precision") or \
                value == defaults[key]:
            continue
        flag = f"--{key.replace('_', '-')}"
        value = " ".join(map(str, value)) if isinstance(value, list) else value
        parts.append(flag if isinstance(value, bool) else f"{flag} {value}")
    parts.append("--mixed-precision" if config["mixed_precision"] else "--no-mixed-precision")
    return " ".join(parts)


# A recipe's settings that a run may change (the seed is not one: it repeats a setting).
RECIPE_SETTINGS = ("optimizer", "learning_rate", "weight_decay")


def recipe_label(config, keys=RECIPE_SETTINGS):
    """The recipe settings that differ from the recipe's defaults for the head (``lr=0.1``)."""
    defaults = recipe_defaults(config)
    names = {"learning_rate": "lr", "weight_decay": "wd"}
    return " ".join(str(config[key]) if key == "optimizer" else
                    f"{names.get(key, key)}={config[key]}" for key in keys
                    if config[key] != defaults[key])


def smoothing_label(config):
    """`` LS 0.0`` when the run's label smoothing is not its recipe's for its head."""
    recipe = RunConfig.for_recipe(config["recipe"], loss=config["loss"])
    value = config["label_smoothing"]
    return "" if value == recipe.label_smoothing else f" LS {value}"


def head_name(config):
    """``softmax``, ``arcface s=16 m=0.5 monotonic``, with `` LS 0.0`` if not the recipe's."""
    if config["loss"] == "softmax":
        return "softmax" + smoothing_label(config)
    label = f"{config['loss']} s={config['head_scale']:.3g} m={config['margin']}"
    label += f" {config['fallback']}" if config["loss"] in ("arcface", "combined") else ""
    label += f" CE {config['ce_weight']}" if config["ce_weight"] else ""
    return label + smoothing_label(config)


def head_arm(config):
    """A head's arm: ``softmax``, or ``softmax lr=0.05`` at a rate not the head's default."""
    rate = recipe_label(config, keys=("learning_rate",))
    return f"{head_name(config)} {rate}" if rate else head_name(config)


def setting_name(config, key):
    """``Keras GELU``, ``fused BatchNorm``: the kernel a run's network was built with."""
    value = config[key]
    return f"{'Keras' if value == 'keras' else value} {KERNEL_SETTINGS[key]}"


def setting_label(config, leave_out=()):
    """What a group of runs shares: data, backbone, recipe, budget, precision, and each
    kernel setting not Keras's (but those in ``leave_out``)."""
    precision = "mixed" if config["mixed_precision"] else "float32"
    return (f"{dataset_label(config['dataset'])} {config['backbone']} {config['recipe']} "
            f"{config['train_size']}x{config['epochs']} {precision}") + "".join(
        f", {setting_name(config, key)}" for key in KERNEL_SETTINGS
        if config[key] != "keras" and key not in leave_out)


def validation_rank(run):
    """What a choice maximises: validation top-1, ties broken by validation mAP."""
    return run["metrics"]["val"]["top1"], run["metrics"]["val"]["mAP"]


def best_on_validation(runs):
    """``{loss: [run]}``: the runs of each head type's best setting (mean ``validation_rank``)."""
    settings = {}
    for run in runs:
        settings.setdefault(setting_key(run["config"]), []).append(run)
    best = {}
    for group in settings.values():
        rank = tuple(np.mean([validation_rank(run) for run in group], axis=0))
        loss = group[0]["config"]["loss"]
        if loss not in best or rank > best[loss][0]:
            best[loss] = (rank, sorted(group, key=lambda run: run["config"]["seed"]))
    return {loss: group for loss, (_, group) in best.items()}


def seed_arms(runs, pair_by="seed", arm=head_arm, arm_fields=HEAD_FIELDS):
    """``{((label, key), arm(config)): {pair: run}}``: runs differing only by ``pair_by``
    (``seed``, or ``classes``: the open-set splits) are one arm, compared with the arms whose
    setting (``key``) differs only in ``arm_fields``."""
    arms = {}
    for run in runs:
        config = run["config"]
        # The seed labels nothing; an arm's own setting is in its name.
        recipe = recipe_label(config, keys=[key for key in RECIPE_SETTINGS
                                            if key not in arm_fields])
        # Arms that are not heads compare one head's runs: the setting names it.
        head = "" if "loss" in arm_fields else f", {head_name(config)}"
        setting = (setting_label(config, leave_out=arm_fields) + head
                   + (f", {recipe}" if recipe else ""),
                   setting_key(config, (pair_by, *arm_fields)))
        pair = config[pair_by] if pair_by == "seed" else (config[pair_by], config["seed"])
        arms.setdefault((setting, arm(config)), {})[pair] = run
    return arms


def against(pairs, base, key, confidence=0.95):
    """``(text, interval, n)``: ``pairs``' mean difference from ``base`` in ``key`` over
    their ``n`` common pairs, in points, ``+m (+low, +high)`` with a two-sided t interval."""
    from scipy import stats

    common = sorted(set(pairs) & set(base))
    a, b = ([metric_value(arm[k], key) for k in common] for arm in (pairs, base))
    if not common or None in a + b:
        return "-", None, len(common)
    diff = 100 * (np.asarray(a, float) - np.asarray(b, float))
    mean, interval = diff.mean(), None
    if len(diff) > 1:
        half = stats.t.ppf(0.5 + confidence / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(
            len(diff))
        interval = (mean - half, mean + half)
    return (f"{mean:+.2f}" + (f" ({interval[0]:+.2f}, {interval[1]:+.2f})" if interval else ""),
            interval, len(common))


def mean_wall_minutes(runs):
    """The mean fit time of the runs that ran uninterrupted on an otherwise idle machine."""
    walls = [r["metrics"]["wall_seconds"] / 60 for r in runs
             if not r["metrics"].get("resumed_at_epoch")
             and not timed_on_shared_machine(r["metrics"])]
    return f"{np.mean(walls):.1f}" if walls else "-"


def seed_table(runs, columns=SEED_METRICS, baseline="softmax", pair_by="seed",
               pairs_name="seeds", arm=head_arm, arm_fields=HEAD_FIELDS, arm_title="head"):
    """Per setting (``seed_arms``): each arm's mean ± s.d. of each metric over its pairs, then
    its paired difference from ``baseline`` with a 95 % interval and a verdict on the first."""
    arms = seed_arms(runs, pair_by, arm, arm_fields)
    parts = []
    for setting in sorted({setting for setting, _ in arms}):
        group = {head: pairs for (s, head), pairs in arms.items() if s == setting}
        base = group.get(baseline, {})
        rows, diffs = [], []
        for head, pairs in sorted(group.items(), key=lambda item: (item[0] != baseline,
                                                                    item[0])):
            names = ", ".join(map(str, sorted(pairs))) if pair_by == "seed" else len(pairs)
            rows.append([head, names, *(mean_sd([metric_value(r, key) for r in pairs.values()])
                                        for key, _ in columns),
                         mean_wall_minutes(pairs.values())])
            cells = [against(pairs, base, key) for key, _ in columns]
            if head != baseline and cells[0][2]:
                low, high = cells[0][1] or (0, 0)
                diffs.append([head, cells[0][2], *(text for text, _, _ in cells),
                              "-" if cells[0][0] == "-" else f"one {pairs_name[:-1]}: an "
                              "anecdote" if cells[0][1] is None else "helps" if low > 0 else
                              "hurts" if high < 0 else "within noise"])
        text = f"*{setting[0]}*\n\n" + markdown(
            [arm_title, pairs_name, *(name for _, name in columns), "wall (min)"], rows)
        if diffs:
            text += "\n" + markdown([f"{arm_title} − {baseline}", f"common {pairs_name}",
                                     *(f"{name} Δ (95 % CI)" for _, name in columns),
                                     f"verdict ({columns[0][1]})"], diffs)
        elif len(group) > 1:
            text += f"\nNo {arm_title} shares {pairs_name} with {baseline} here.\n"
        parts.append(text)
    return "\n".join(parts)


def wall_cell(metrics):
    """The fit's wall seconds, with the epochs they cover for a resumed run and the share
    others used of a shared machine."""
    wall = f"{metrics['wall_seconds']:.0f}"
    if metrics.get("resumed_at_epoch"):
        wall += f" (epochs {metrics['resumed_at_epoch'] + 1}–{metrics['epochs']})"
    if timed_on_shared_machine(metrics):
        wall += f" (others {100 * metrics['cpu_share_of_other_processes']:.0f} % of the CPU)"
    return wall


def runs_table(runs):
    """Every run: its head, budget, validation and test metrics, calibration and speed."""
    rows = []
    for run in runs:
        c, m, cal = run["config"], run["metrics"], run["metrics"].get("calibration", {})
        t = cal.get("temperature")
        rows.append([run["name"], c["backbone"], head_name(c), c["seed"], c["train_size"],
                     m["epochs"], *(percent(metric_value(run, key)) for key in (
                         "val.top1", "top1", "tta.top1" if metric_value(run, "tta.served")
                         else "top1", "mAP", "map_at_r", "calibration.before.ece",
                         "calibration.after.ece")),
                     "-" if t is None else f"{t:.3f}", f"{m['train_images_per_second']:.1f}",
                     wall_cell(m), run["finished"]])
    return markdown(["run", "backbone", "head", "seed", "train images", "epochs", "val top-1",
                     "test top-1", "top-1 served", "test mAP", "test MAP@R", "ECE", "ECE after",
                     "temperature", "train img/s", "wall (s)", "finished"], rows)


def paper_table(runs, paper=None, metric="mAP"):
    """Paper layout, a row per head and a column per backbone: ``paper``'s values
    (``{backbone: (cross-entropy, angular margin)}``, percent), then per cell our mean ± s.d.
    over seeds and a margin head's paired difference (by seed) from our softmax."""
    cells = {}
    for run in runs:
        config = run["config"]
        pairs = cells.setdefault(head_arm(config), {}).setdefault(config["backbone"], {})
        if config["seed"] in pairs:
            raise ValueError(f"two runs for one cell of the paper table: {run['name']}")
        pairs[config["seed"]] = run
    rows = [[f"paper: {name}", *(paper[b][i] for b in BACKBONE_COLUMNS)] for i, name in
            enumerate(("cross-entropy", "angular margin (s=1, m=0.1)"))] if paper else []
    softmax = cells.get("softmax", {})
    for head, by_backbone in sorted(cells.items(), key=lambda item: (item[0] != "softmax",
                                                                      item[0])):
        row = [f"ours: {head}"]
        for backbone in BACKBONE_COLUMNS:
            pairs = by_backbone.get(backbone)
            if not pairs:
                row.append("not run")
                continue
            text = (f"{mean_sd([r['metrics'][metric] for r in pairs.values()])} "
                    f"({len(pairs)} seed{'s' * (len(pairs) > 1)})")
            delta = against(pairs, softmax.get(backbone, {}), metric)[0]
            row.append(text + (f", Δ {delta}" if head != "softmax" and delta != "-" else ""))
        rows.append(row)
    return markdown(["head", *BACKBONE_COLUMNS], rows)
