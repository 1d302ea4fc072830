"""Figures of recorded runs (matplotlib): Figure 2's margin sweep for docs/results.md, and
any run's diagnostics drawn on demand from its per-image outputs in the ledger:

    python experiments/plots.py RUN_NAME ...     # diagnostics/RUN_NAME.png each

A run's diagnostics: the confusion matrix of its test split (row-normalised), for margin heads
the histogram of each test image's angle to its own class centre, and the reliability diagram
before and after temperature scaling."""

import argparse
import os

import numpy as np
from ledger import LEDGER
from margin_sweep import failed, margin_curves, training_log
from tables import load_runs


def plot_margin_sweep(runs, ledger, path):
    """mAP and top-1 vs m (the mean over a point's seeds), one line per backbone x fallback x
    scale, a point with a failed run (``margin_sweep.failed``) marked with a red cross; False
    if nothing to plot."""
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
        crossed = [any(failed(r, training_log(r, ledger)) for r in group) for _, group in points]
        style = "-" if fallback == "monotonic" else "--"
        label = f"{backbone}, {fallback}, s={scale:.3g}"
        if several_budgets:
            label += f" ({size} x {epochs})"
        for ax, key in zip(axes, ("mAP", "top1"), strict=True):
            values = [100 * np.mean([r["metrics"][key] for r in group]) for _, group in points]
            ax.plot(margins, values, style, marker="o", label=label)
            ax.plot([m for m, x in zip(margins, crossed, strict=True) if x],
                    [v for v, x in zip(values, crossed, strict=True) if x], "x",
                    color="red", markersize=10, label=None)
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
    calibration = run["metrics"].get("calibration")
    panels = 1 + has_angles + (calibration is not None)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.6), squeeze=False)
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
    if calibration is not None:
        plot_reliability(axes[0, panels - 1], calibration)
    fig.suptitle(run["name"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_reliability(ax, calibration):
    """Reliability diagram: accuracy against mean confidence per bin, before and after
    temperature scaling (``metrics.json``'s ``calibration``)."""
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls=":")
    for key, label in (("bins_before", "before"), ("bins_after", "after")):
        if key not in calibration:
            continue
        rows = [(conf, acc) for count, acc, conf in calibration[key] if count]
        ece = calibration[label]["ece"]
        ax.plot([c for c, _ in rows], [a for _, a in rows], marker="o",
                label=f"{label}: ECE {100 * ece:.2f} %"
                + (f", T = {calibration['temperature']:.2f}" if label == "after" else ""))
    ax.set_xlabel("confidence (top probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("reliability, 15 bins")
    ax.legend(fontsize=7)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", metavar="RUN_NAME", help="ledger runs to draw")
    parser.add_argument("--ledger", default=LEDGER, help="the run records")
    parser.add_argument("--output-dir", default="diagnostics", help="where the PNGs go")
    args = parser.parse_args(argv)
    runs = {run["name"]: run for run in load_runs(args.ledger)}
    for name in args.names:
        name = os.path.basename(os.path.normpath(name))  # a run's folder works too
        if name not in runs:
            parser.exit(2, f"plots.py: no finished run {name!r} in {args.ledger}; "
                           "pass a folder name of results/runs/\n")
        predictions = load_predictions(runs[name], args.ledger)
        if predictions is None:
            parser.exit(2, f"plots.py: run {name!r} kept no per-image outputs "
                           "(recorded before runs kept them); pick another run\n")
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, f"{name}.png")
        plot_run_diagnostics(runs[name], predictions, path)
        print(path)


if __name__ == "__main__":
    main()
