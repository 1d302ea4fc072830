"""Results tables from run directories: ``runs/*/{config,metrics}.json`` to Markdown."""

import datetime
import glob
import json
import os

import numpy as np

from tfmargin.config import RunConfig

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
    defaults = RunConfig(loss=config["loss"]).identity()
    parts = ["python experiments/run.py", f"--backbone {config['backbone']}",
             f"--loss {config['loss']}", f"--dataset {config['dataset']}"]
    for key, default in defaults.items():
        value = config.get(key, default)
        if key in ("backbone", "loss", "dataset") or value == default:
            continue
        flag = f"--{key.replace('_', '-')}"
        if isinstance(value, list):
            value = " ".join(map(str, value))
        parts.append(flag if isinstance(value, bool) else f"{flag} {value}")
    return " ".join(parts)


def _percent(value):
    return "-" if value is None else f"{100 * value:.2f}"


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
                     m["val"]["top1"], m["top1"], m["mAP"], m["precision_at_1"], m["map_at_r"],
                     m.get("train_accuracy_last_epoch"))),
                 f"{m['train_images_per_second']:.1f}", f"{m['wall_seconds']:.0f}",
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


def head_label(config):
    """A run's head and non-default recipe: ``softmax``, ``arcface s=16 m=0.5 monotonic``."""
    if config["loss"] == "softmax":
        label = "softmax"
    else:
        label = f"{config['loss']} s={config['head_scale']:.3g} m={config['margin']}"
        label += f" {config['fallback']}" if config["loss"] in ("arcface", "combined") else ""
        label += f" CE {config['ce_weight']}" if config.get("ce_weight") else ""
    recipe = recipe_label(config)
    return f"{label}, {recipe}" if recipe else label


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
