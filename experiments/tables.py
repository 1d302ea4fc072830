"""Markdown tables of recorded runs (the ledger ``results/runs/*/{config,metrics}.json``).

They know this repository's studies (the paper's backbones and numbers, the open-set
protocol, the sweep grammar), so they live beside ``report.py``, not in the library.
NumPy and SciPy only: the report's check runs without TensorFlow.
"""

import dataclasses
import glob
import json
import os

import numpy as np

from tfmargin.names import BATCHNORM_BACKBONES
from tfmargin.runner.config import NOT_IDENTITY, RunConfig, dataset_label
from tfmargin.runner.provenance import timed_on_shared_machine

BACKBONE_COLUMNS = ("resnet18", "efficientnetb0", "mobilenetv2")
# Every setting of a run's identity (what its hash covers).
IDENTITY_FIELDS = tuple(f.name for f in dataclasses.fields(RunConfig)
                        if f.name not in NOT_IDENTITY)


def complete(record):
    """A run's ``config.json`` with every setting, those the run predates at the value they
    had (``RunConfig.from_record``): one complete record for every table."""
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
        finished = f"{stamp[:10]} {stamp[11:16]} UTC"
        runs.append({"name": os.path.basename(run_dir), "config": config, "metrics": metrics,
                     "finished": finished})
    return runs


def setting_key(config, leave_out=("seed",)):
    """A run's identity without ``leave_out``: runs with equal keys differ only there."""
    return tuple((key, json.dumps(config[key], sort_keys=True))
                 for key in IDENTITY_FIELDS if key not in leave_out)


def command(config):
    """The run.py command line that reproduces a run: every setting of its identity that
    differs from run.py's defaults, and its precision always (the default, auto, depends on
    the machine)."""
    recipe = config["recipe"]
    # Every identity setting, so a run with --tta 2 under the standard recipe shows it.
    record = RunConfig.for_recipe(recipe, loss=config["loss"]).resolved().record()
    defaults = {key: record[key] for key in IDENTITY_FIELDS}
    parts = ["python experiments/run.py", *([f"--recipe {recipe}"] if recipe != "standard"
                                            else []),
             f"--backbone {config['backbone']}", f"--loss {config['loss']}",
             f"--dataset {config['dataset']}"]
    for key, default in defaults.items():
        value = config[key]
        if key in ("backbone", "loss", "dataset", "recipe", "mixed_precision") or \
                value == default:
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, list):
            value = " ".join(map(str, value))
        parts.append(flag if isinstance(value, bool) else f"{flag} {value}")
    parts.append("--mixed-precision" if config.get("mixed_precision") else
                 "--no-mixed-precision")
    return " ".join(parts)


def _percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def _wall_cell(metrics):
    """The fit's wall seconds; for a resumed run, which epochs they cover; for one timed on
    a shared machine, how much of it others used."""
    resumed_at = metrics.get("resumed_at_epoch", 0)
    wall = f"{metrics['wall_seconds']:.0f}"
    if resumed_at:
        wall += f" (epochs {resumed_at + 1}–{metrics['epochs']})"
    if timed_on_shared_machine(metrics):
        wall += f" (others {100 * metrics['cpu_share_of_other_processes']:.0f} % of the CPU)"
    return wall


def runs_table(runs):
    header = ("| run | backbone | loss | s | m | fallback | CE weight | seed | train images "
              "| epochs | val top-1 | test top-1 | test mAP | test P@1 | test MAP@R "
              "| train acc. (last epoch) | train img/s | wall (s) | finished |\n"
              "|" + "---|" * 19 + "\n")
    rows = []
    for run in runs:
        c, m = run["config"], run["metrics"]
        head = ("-", "-", "-", "-") if c["loss"] == "softmax" else (
            f"{c['head_scale']:.3g}", c["margin"], c["fallback"], c["ce_weight"])
        cells = [run["name"], c["backbone"], c["loss"], *head, c["seed"], c["train_size"],
                 m["epochs"], *(_percent(v) for v in (
                     m["val"]["top1"] if "val" in m else None, m["top1"], m["mAP"],
                     m["precision_at_1"], m["map_at_r"],
                     m.get("train_accuracy_last_epoch"))),
                 f"{m['train_images_per_second']:.1f}", _wall_cell(m),
                 run["finished"]]
        rows.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return header + "\n".join(rows) + "\n"


RECIPE_KEYS = ("optimizer", "learning_rate", "weight_decay", "seed")


def recipe_label(config, keys=RECIPE_KEYS):
    """The recipe settings that differ from the run's recipe's defaults for its head, e.g.
    ``adamw lr=0.002``."""
    defaults = RunConfig.for_recipe(config.get("recipe", "standard"),
                                    loss=config["loss"]).identity()
    names = {"learning_rate": "lr", "weight_decay": "wd"}
    return " ".join(str(config[key]) if key == "optimizer" else f"{names.get(key, key)}="
                    f"{config[key]}" for key in keys
                    if key in config and config[key] != defaults[key])


def smoothing_label(config):
    """`` LS 0.0`` when the run's label smoothing is not its recipe's, else ``""``."""
    value = config.get("label_smoothing", 0.0)
    recipe = RunConfig.for_recipe(config.get("recipe", "standard"))
    return "" if value == recipe.label_smoothing else f" LS {value}"


def head_name(config):
    """A run's head: ``softmax``, ``arcface s=16 m=0.5 monotonic``, ``cosface s=8 m=0.3``,
    then `` LS 0.0`` when its label smoothing is not the recipe's."""
    if config["loss"] == "softmax":
        return "softmax" + smoothing_label(config)
    label = f"{config['loss']} s={config['head_scale']:.3g} m={config['margin']}"
    label += f" {config['fallback']}" if config["loss"] in ("arcface", "combined") else ""
    label += f" CE {config['ce_weight']}" if config.get("ce_weight") else ""
    return label + smoothing_label(config)


def validation_rank(run):
    """What a choice maximises: validation top-1, ties (5,000 images: steps of 0.02 %)
    broken by validation mAP."""
    return run["metrics"]["val"]["top1"], run["metrics"]["val"]["mAP"]


def best_on_validation(runs):
    """``{loss: [run, ...]}``: for each head type (softmax included), the runs of the setting
    that ranks first on validation, a setting's rank (``validation_rank``) being the mean over
    its seeds. The test split plays no part."""
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


def head_spec(config):
    """The ``sweep.py --heads`` entry of a run's head, e.g. ``arcface:s=8:m=0.1:ls=0``
    (fallback and label smoothing only when not the defaults)."""
    if config["loss"] == "softmax":
        parts = ["softmax"]
    else:
        margin = config["margin"]
        margin = "/".join(f"{m:g}" for m in margin) if isinstance(margin, list) else \
            f"{margin:g}"
        parts = [config["loss"], f"s={config['head_scale']:g}", f"m={margin}"]
        if config["fallback"] != RunConfig.fallback:
            parts.append(f"f={config['fallback']}")
    if smoothing_label(config):
        parts.append(f"ls={config['label_smoothing']:g}")
    return ":".join(parts)


def precision_name(config):
    """``mixed`` or ``float32``: a run's precision as its identity records it."""
    return "mixed" if config.get("mixed_precision") else "float32"


# The kernel settings of a network (``--gelu``, ``--batchnorm``), named for tables.
KERNEL_SETTINGS = {"gelu": "GELU", "batchnorm": "BatchNorm"}


def run_setting(config, key):
    """A run's ``--gelu`` or ``--batchnorm``."""
    return config[key]


def setting_name(config, key):
    """``Keras GELU``, ``fused BatchNorm``: the kernel a run's network was built with."""
    value = run_setting(config, key)
    return f"{'Keras' if value == 'keras' else value} {KERNEL_SETTINGS[key]}"


def setting_label(config, leave_out=()):
    """What a group of runs shares, in words: data, backbone, recipe, budget, precision,
    and each kernel setting where it is not Keras's (unless it is in ``leave_out``)."""
    return " ".join(str(part) for part in (
        dataset_label(config["dataset"]), config["backbone"], config.get("recipe", "standard"),
        f"{config['train_size']}x{config['epochs']}", precision_name(config))) + "".join(
        f", {setting_name(config, key)}" for key in KERNEL_SETTINGS
        if run_setting(config, key) != "keras" and key not in leave_out)


def batchnorm_used(config):
    """The BatchNorm a run was built with (runs from before the setting record none:
    Keras's)."""
    return config["batchnorm"]


def batchnorm_label(config):
    """``Keras BatchNorm`` for a run of a backbone built with BatchNorm whose BatchNorm is not
    today's default (runs from before the fused one record none: Keras's), else ``""``."""
    if config["backbone"] not in BATCHNORM_BACKBONES:
        return ""
    used = batchnorm_used(config)
    recipe = RunConfig.for_recipe(config.get("recipe", "standard"))
    return "" if used == recipe.batchnorm else f"{used.capitalize()} BatchNorm"


def head_label(config):
    """A run's head and non-default recipe: ``softmax``, ``arcface s=16 m=0.5 monotonic``."""
    label, recipe = head_name(config), recipe_label(config)
    return f"{label}, {recipe}" if recipe else label


SEED_METRICS = (("top1", "top-1"), ("tta.top1", "top-1 TTA"), ("mAP", "mAP"),
                ("precision_at_1", "P@1"), ("map_at_r", "MAP@R"))


def metric_value(run, key):
    """A run's metric by dotted path (``tta.top1``, ``open_set.knn.auroc``), or None."""
    value = run["metrics"]
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


# A head is compared at its own learning rate (recipes.HEAD_LEARNING_RATES): the rate is
# part of the arm, not of the setting the arms share.
HEAD_FIELDS = ("loss", "scale", "margin", "fallback", "sub_centers", "ce_weight",
               "label_smoothing", "learning_rate")


def head_arm(config):
    """A head's arm: ``softmax``, or ``softmax lr=0.05`` at a rate not the head's default."""
    rate = recipe_label(config, keys=("learning_rate",))
    return f"{head_name(config)} {rate}" if rate else head_name(config)


def seed_arms(runs, pair_by="seed", arm=None, arm_fields=None):
    """``{(setting, arm): {pair: run}}``: runs whose identities differ only by ``pair_by``
    (``seed``; ``classes`` for the splits of the open-set study) are one arm; arms whose
    settings differ only in ``arm_fields`` (default: the head's, ``HEAD_FIELDS``) are
    compared, each arm named by ``arm(config)`` (default ``head_arm``). ``setting`` is
    ``(label, key)``."""
    arm, arm_fields = arm or head_arm, arm_fields or HEAD_FIELDS
    arms = {}
    for run in runs:
        config = run["config"]
        # The seed pairs, it labels nothing; an arm's own setting is in its arm's name.
        recipe = recipe_label(config, keys=[key for key in RECIPE_KEYS[:-1]
                                            if key not in arm_fields])
        # Arms that are not heads compare one head's runs: the setting names it.
        head = "" if "loss" in arm_fields else f", {head_name(config)}"
        setting = (setting_label(config, leave_out=arm_fields) + head
                   + (f", {recipe}" if recipe else ""),
                   setting_key(config, (pair_by, *arm_fields)))
        pairs = arms.setdefault((setting, arm(config)), {})
        key = config[pair_by]
        if pair_by != "seed":
            key = (key, config["seed"])
        pairs[key] = run
    return arms


def paired_difference(a, b, confidence=0.95):
    """Mean of ``a - b`` over pairs and its two-sided t confidence interval (None for one
    pair)."""
    from scipy import stats

    diff = np.asarray(a, float) - np.asarray(b, float)
    mean = float(diff.mean())
    if len(diff) < 2:
        return mean, None
    half = stats.t.ppf(0.5 + confidence / 2, len(diff) - 1) * diff.std(ddof=1) / np.sqrt(
        len(diff))
    return mean, (mean - half, mean + half)


def difference_cell(a, b):
    """``a - b`` over pairs of fractions, in percent, as ``+m (+low, +high)`` (the mean alone
    for one pair); returns ``(text, interval)``."""
    mean, interval = paired_difference(100 * np.asarray(a, float), 100 * np.asarray(b, float))
    return (f"{mean:+.2f}" + (f" ({interval[0]:+.2f}, {interval[1]:+.2f})" if interval else ""),
            interval)


def verdict(interval, pairs_name="seeds"):
    if interval is None:
        return f"one {pairs_name[:-1]}: an anecdote"
    low, high = interval
    return "helps" if low > 0 else "hurts" if high < 0 else "within noise"


def mean_sd(values):
    values = 100 * np.asarray(values, float)
    spread = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
    return f"{values.mean():.2f}{spread}"


def seed_table(runs, columns=SEED_METRICS, baseline="softmax", pair_by="seed",
               pairs_name="seeds", arm=None, arm_fields=None, arm_title="head"):
    """Per arm: its pairs (seeds, or splits), mean +- s.d. of each metric (percent); then
    each arm's paired difference from ``baseline`` in each metric over their common pairs,
    with a 95 % t interval and a verdict on the first column. Arms are heads unless
    ``arm``, ``arm_fields`` say otherwise (``seed_arms``); ``arm_title`` heads their column."""
    arms = seed_arms(runs, pair_by, arm, arm_fields)
    lines = [f"| setting | {arm_title} | {pairs_name} | " + " | ".join(n for _, n in columns)
             + " | wall (min) |", "|" + "---|" * (len(columns) + 4)]
    diffs = [f"| setting | {arm_title} − {baseline} | common {pairs_name} | "
             + " | ".join(f"{name} Δ (95 % CI)" for _, name in columns)
             + f" | verdict ({columns[0][1]}) |", "|" + "---|" * (len(columns) + 4)]
    for (setting, head), pairs in sorted(arms.items()):
        cells = []
        for key, _ in columns:
            values = [metric_value(r, key) for r in pairs.values()]
            cells.append("-" if None in values else mean_sd(values))
        # A resumed run's wall time covers only the epochs after the resume; one timed
        # beside other work is not the recipe's time.
        walls = [r["metrics"]["wall_seconds"] / 60 for r in pairs.values()
                 if not r["metrics"].get("resumed_at_epoch")
                 and not timed_on_shared_machine(r["metrics"])]
        wall = f"{np.mean(walls):.1f}" if walls else "-"
        names = ", ".join(map(str, sorted(pairs))) if pair_by == "seed" else str(len(pairs))
        lines.append(f"| {setting[0]} | {head} | {names} | " + " | ".join(cells)
                     + f" | {wall} |")
        base = arms.get((setting, baseline))
        if head == baseline or not base:
            continue
        common = sorted(set(pairs) & set(base))
        if not common:
            continue
        row = []
        for key, _ in columns:
            a = [metric_value(pairs[k], key) for k in common]
            b = [metric_value(base[k], key) for k in common]
            if None in a or None in b:
                row.append(("-", None))
                continue
            row.append(difference_cell(a, b))
        diffs.append(f"| {setting[0]} | {head} | {len(common)} | "
                     + " | ".join(text for text, _ in row)
                     + f" | {verdict(row[0][1], pairs_name) if row[0][0] != '-' else '-'} |")
    paired = "\n\n" + "\n".join(diffs) if len(diffs) > 2 else \
        f"\n\nNo {'margin head' if arm_title == 'head' else 'other ' + arm_title} has " \
        f"{pairs_name} in common with {baseline} yet: no paired " \
        "difference."
    return "\n".join(lines) + paired + "\n"


def paper_table(runs, paper, metric="mAP"):
    """Paper layout: rows = heads, columns = backbones; ours beside the paper's numbers.

    ``paper``: ``{backbone: (cross-entropy, angular margin)}`` in percent.
    """
    ours = {}
    for run in runs:
        head, backbone = head_label(run["config"]), run["config"]["backbone"]
        if batchnorm_label(run["config"]):
            head += f", {batchnorm_label(run['config'])}"
        cells = ours.setdefault(head, {})
        if backbone in cells:
            raise ValueError(f"two runs for one cell of the paper table: {head}, {backbone}")
        cells[run["config"]["backbone"]] = 100 * run["metrics"][metric]
    lines = ["| head | " + " | ".join(BACKBONE_COLUMNS) + " |", "|---|---|---|---|",
             "| paper: cross-entropy | " + " | ".join(f"{paper[b][0]}" for b in BACKBONE_COLUMNS)
             + " |",
             "| paper: angular margin (s=1, m=0.1) | "
             + " | ".join(f"{paper[b][1]}" for b in BACKBONE_COLUMNS) + " |"]
    softmax = ours.get("softmax", {})

    def cell(head, b):
        if b not in ours[head]:
            return "not run"
        if head == "softmax" or b not in softmax:
            return f"{ours[head][b]:.2f}"
        delta = ours[head][b] - softmax[b]
        return f"{ours[head][b]:.2f} ({delta:+.2f}{', loses' if delta < 0 else ''})"

    for head in sorted(ours):
        lines.append(f"| ours: {head} | " + " | ".join(cell(head, b) for b in BACKBONE_COLUMNS)
                     + " |")
    return ("\n".join(lines) + "\n\nIn brackets: our head's value minus our softmax head's on "
            "the same backbone and budget; \"loses\" where it is lower. One seed per cell: a "
            "difference of a few points at this budget is an anecdote, not a result.\n")


def margin_curves(runs):
    """ArcFace runs grouped into curves over m: {(backbone, fallback, s, budget): [(m, run)]}.

    Runs with a non-default recipe are left out; a curve needs two margins or more.
    """
    curves = {}
    for run in runs:
        c = run["config"]
        if c["loss"] != "arcface" or c.get("ce_weight") or recipe_label(c):
            continue
        key = (c["backbone"], c["fallback"], c["head_scale"], c["train_size"],
               run["metrics"]["epochs"])
        curves.setdefault(key, []).append((float(c["margin"]), run))
    return {k: sorted(v, key=lambda p: p[0]) for k, v in curves.items()
            if len({m for m, _ in v}) >= 2}
