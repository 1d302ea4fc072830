"""Results tables from run directories: ``runs/*/{config,metrics}.json`` to Markdown."""

import datetime
import glob
import json
import os

import numpy as np

from tfmargin.config import ADDED_LATER, RunConfig

BACKBONE_COLUMNS = ("resnet18", "efficientnetb0", "mobilenetv2")


def load_runs(runs_dir):
    """Finished runs (those with metrics.json), sorted by name."""
    runs = []
    for path in sorted(glob.glob(os.path.join(runs_dir, "*", "metrics.json"))):
        run_dir = os.path.dirname(path)
        with open(path) as f:
            metrics = json.load(f)
        with open(os.path.join(run_dir, "config.json")) as f:
            config = json.load(f)
        finished = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.UTC)
        runs.append({"name": os.path.basename(run_dir), "config": config, "metrics": metrics,
                     "finished": finished.strftime("%Y-%m-%d %H:%M UTC")})
    return runs


def command(config):
    """The run.py command line that reproduces a run: every setting of its identity that
    differs from run.py's defaults."""
    recipe = config.get("recipe", "standard")
    # Every identity setting, including those left out of the identity at their default
    # (ADDED_LATER), so a run with --tta 2 under the standard recipe shows it.
    defaults = {**ADDED_LATER, **RunConfig.for_recipe(recipe, loss=config["loss"]).identity()}
    parts = ["python experiments/run.py", *([f"--recipe {recipe}"] if recipe != "standard"
                                            else []),
             f"--backbone {config['backbone']}", f"--loss {config['loss']}",
             f"--dataset {config['dataset']}"]
    for key, default in defaults.items():
        value = config.get(key, default)
        if key in ("backbone", "loss", "dataset", "recipe") or value == default:
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, list):
            value = " ".join(map(str, value))
        parts.append(flag if isinstance(value, bool) else f"{flag} {value}")
    return " ".join(parts)


def _percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


def _wall_cell(metrics):
    """The fit's wall seconds; for a resumed run, which epochs they cover."""
    resumed_at = metrics.get("resumed_at_epoch", 0)
    wall = f"{metrics['wall_seconds']:.0f}"
    return f"{wall} (epochs {resumed_at + 1}–{metrics['epochs']})" if resumed_at else wall


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


def recipe_label(config):
    """The recipe settings that differ from run.py's defaults, e.g. ``adamw lr=0.002``."""
    defaults = RunConfig()
    names = {"learning_rate": "lr", "weight_decay": "wd"}
    return " ".join(str(config[key]) if key == "optimizer" else f"{names.get(key, key)}="
                    f"{config[key]}" for key in RECIPE_KEYS
                    if key in config and config[key] != getattr(defaults, key))


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
    """``{loss: run}``: each margin head's run that ranks first on validation
    (``validation_rank``; what the seed study uses, the test split plays no part)."""
    best = {}
    for run in runs:
        loss = run["config"]["loss"]
        if loss != "softmax" and (loss not in best
                                  or validation_rank(run) > validation_rank(best[loss])):
            best[loss] = run
    return best


def head_spec(config):
    """The ``sweep.py --heads`` entry of a run's head, e.g. ``arcface:s=8:m=0.1:ls=0``
    (fallback and label smoothing only when not the defaults)."""
    if config["loss"] == "softmax":
        parts = ["softmax"]
    else:
        parts = [config["loss"], f"s={config['head_scale']:g}", f"m={config['margin']:g}"]
        if config["fallback"] != RunConfig.fallback:
            parts.append(f"f={config['fallback']}")
    if smoothing_label(config):
        parts.append(f"ls={config['label_smoothing']:g}")
    return ":".join(parts)


def precision_name(config):
    """``mixed`` or ``float32``: a run's dtype policy as run.py's flag set it."""
    return "mixed" if config.get("mixed_precision") else "float32"


def head_label(config):
    """A run's head and non-default recipe: ``softmax``, ``arcface s=16 m=0.5 monotonic``."""
    label, recipe = head_name(config), recipe_label(config)
    return f"{label}, {recipe}" if recipe else label


SEED_METRICS = (("top1", "top-1"), ("tta_top1", "top-1 TTA"), ("mAP", "mAP"),
                ("precision_at_1", "P@1"), ("map_at_r", "MAP@R"))


def _metric(run, key):
    metrics = run["metrics"]
    if key == "tta_top1":
        return metrics["tta"]["top1"] if "tta" in metrics else None
    return metrics[key]


def seed_arms(runs):
    """``{(setting without head and seed, head): {seed: run}}``: runs that differ only by
    seed, grouped per arm; a seed run twice is an error."""
    arms = {}
    for run in runs:
        config = run["config"]
        setting = (os.path.basename(os.path.normpath(config["dataset"])), config["backbone"],
                   config.get("recipe", "standard"), config["train_size"], config["epochs"],
                   precision_name(config))
        seeds = arms.setdefault((setting, head_name(config)), {})
        if config["seed"] in seeds:
            raise ValueError(f"two runs of {head_name(config)} with seed {config['seed']}: "
                             f"{seeds[config['seed']]['name']} and {run['name']}")
        seeds[config["seed"]] = run
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


def verdict(interval):
    if interval is None:
        return "one seed: an anecdote"
    low, high = interval
    return "helps" if low > 0 else "hurts" if high < 0 else "within noise"


def seed_table(runs, baseline="softmax"):
    """Per arm: seeds, mean +- s.d. of each metric (percent); then each arm's paired
    difference from ``baseline`` in each metric over their common seeds, with a 95 % t
    interval."""
    arms = seed_arms(runs)
    lines = ["| setting | head | seeds | " + " | ".join(name for _, name in SEED_METRICS)
             + " | wall (min) |", "|" + "---|" * (len(SEED_METRICS) + 4)]
    diffs = ["| setting | head − " + baseline + " | common seeds | "
             + " | ".join(f"{name} Δ (95 % CI)" for _, name in SEED_METRICS)
             + " | verdict (top-1) |", "|" + "---|" * (len(SEED_METRICS) + 4)]
    for (setting, head), seeds in sorted(arms.items()):
        cells = []
        for key, _ in SEED_METRICS:
            values = [_metric(r, key) for r in seeds.values()]
            if None in values:
                cells.append("-")
                continue
            values = 100 * np.asarray(values)
            spread = f" ± {values.std(ddof=1):.2f}" if len(values) > 1 else ""
            cells.append(f"{values.mean():.2f}{spread}")
        # A resumed run's wall time covers only the epochs after the resume.
        walls = [r["metrics"]["wall_seconds"] / 60 for r in seeds.values()
                 if not r["metrics"].get("resumed_at_epoch")]
        wall = f"{np.mean(walls):.1f}" if walls else "-"
        name = " ".join(str(part) for part in setting)
        lines.append(f"| {name} | {head} | {', '.join(map(str, sorted(seeds)))} | "
                     + " | ".join(cells) + f" | {wall} |")
        base = arms.get((setting, baseline))
        if head == baseline or not base:
            continue
        common = sorted(set(seeds) & set(base))
        if not common:
            continue
        row = []
        for key, _ in SEED_METRICS:
            a = [_metric(seeds[k], key) for k in common]
            b = [_metric(base[k], key) for k in common]
            if None in a or None in b:
                row.append(("-", None))
                continue
            mean, interval = paired_difference(100 * np.asarray(a), 100 * np.asarray(b))
            text = f"{mean:+.2f}" + (f" ({interval[0]:+.2f}, {interval[1]:+.2f})"
                                     if interval else "")
            row.append((text, interval))
        diffs.append(f"| {name} | {head} | {len(common)} | "
                     + " | ".join(text for text, _ in row)
                     + f" | {verdict(row[0][1]) if row[0][0] != '-' else '-'} |")
    paired = "\n\n" + "\n".join(diffs) if len(diffs) > 2 else \
        f"\n\nNo margin head has a seed in common with {baseline} yet: no paired difference."
    return "\n".join(lines) + paired + "\n"


def paper_table(runs, paper, metric="mAP"):
    """Paper layout: rows = heads, columns = backbones; ours beside the paper's numbers.

    ``paper``: ``{backbone: (cross-entropy, angular margin)}`` in percent.
    """
    ours = {}
    for run in runs:
        head, backbone = head_label(run["config"]), run["config"]["backbone"]
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


def plot_margin_sweep(runs, path):
    """mAP and top-1 vs m, one line per backbone x fallback x scale; False if nothing to plot."""
    curves = margin_curves(runs)
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    several_budgets = len({k[3:] for k in curves}) > 1
    for (backbone, fallback, scale, size, epochs), points in sorted(curves.items()):
        margins = [m for m, _ in points]
        style = "-" if fallback == "monotonic" else "--"
        label = f"{backbone}, {fallback}, s={scale:.3g}"
        if several_budgets:
            label += f" ({size} x {epochs})"
        for ax, key in zip(axes, ("mAP", "top1"), strict=True):
            ax.plot(margins, [100 * r["metrics"][key] for _, r in points], style, marker="o",
                    label=label)
    for ax, title in zip(axes, ("test mAP (%)", "test top-1 (%)"), strict=True):
        ax.set_xlabel("margin m (radians)")
        ax.set_title(title)
        ax.axvline(2.0, color="grey", lw=0.8, ls=":")
        ax.grid(alpha=0.3)
    budgets = sorted({(k[3], k[4]) for k in curves})
    fig.suptitle("ArcFace margin sweep (" + "; ".join(
        f"{n} train images x {e} epochs" for n, e in budgets) + ")")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def load_predictions(run, runs_dir):
    """A run's ``test_predictions.npz`` (labels, predictions, target angles), or None."""
    from tfmargin.metrics import PREDICTIONS_FILE

    path = os.path.join(runs_dir, run["name"], PREDICTIONS_FILE)
    if not os.path.exists(path):
        return None
    with np.load(path) as f:
        return dict(f)


def plot_run_diagnostics(run, predictions, path):
    """Confusion matrix (row-normalised) and, for margin heads, target-angle histograms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = run["config"]["class_names"]
    labels, predicted = predictions["labels"], predictions["predicted"]
    confusion = np.zeros((len(names), len(names)))
    np.add.at(confusion, (labels, predicted), 1)
    confusion /= np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    angles = predictions["target_angle_deg"]
    has_angles = not np.all(np.isnan(angles))
    fig, axes = plt.subplots(1, 2 if has_angles else 1, figsize=(11 if has_angles else 5.5, 4.6),
                             squeeze=False)
    ax = axes[0, 0]
    ax.imshow(confusion, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 20:
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        for (i, j), value in np.ndenumerate(confusion):
            if value >= 0.05:
                ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if value > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion (% of each true class), top-1 {100 * run['metrics']['top1']:.1f}%")
    if has_angles:
        ax = axes[0, 1]
        bins = np.linspace(0, 180, 61)
        correct = labels == predicted
        ax.hist(angles[correct], bins=bins, alpha=0.7, label="correct")
        ax.hist(angles[~correct], bins=bins, alpha=0.7, label="wrong")
        margin = run["config"]["margin"]
        if isinstance(margin, (int, float)) and run["config"]["loss"] == "arcface":
            ax.axvline(180 - np.degrees(margin), color="grey", ls=":",
                       label="pi - m (fallback starts)")
        ax.set_xlabel("angle to own class centre (degrees)")
        ax.set_ylabel("test images")
        ax.set_title("target angles theta_y")
        ax.legend(fontsize=7)
    fig.suptitle(run["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
