"""How each setting was chosen: the selection runs' validation figures, one row per candidate
setting (mean ± s.d. over its seeds), a table per budget with the sweep command that runs its
candidates, best first; then each head type's best setting per budget. Nothing here reads a
test figure."""

import math
import os

import numpy as np
from margin_sweep import angles, training_log
from sweep import head_spec, split_classes
from tables import (
    best_on_validation,
    command,
    markdown,
    mean_sd,
    metric_value,
    setting_key,
    setting_label,
    validation_rank,
)

from tfmargin import metrics

# The flags a candidate sets (its ``sweep.py --heads`` entry, its rate, its seed): left out of
# a budget's command.
CANDIDATE_FLAGS = ("--loss", "--scale", "--margin", "--fallback", "--ce-weight",
                   "--sub-centers", "--label-smoothing", "--learning-rate", "--seed")
COLUMNS = (("val.top1", "val top-1"), ("val.mAP", "val mAP"), ("val.map_at_r", "val MAP@R"),
           ("calibration.val.before", "val ECE"), ("calibration.val.after", "val ECE after"))
OPEN_SET_SCORES = (("max_logit", "max logit"), ("feature_norm", "norm"))
# How close (degrees) a run's last-epoch mean target angle must be to pi - m to count as
# stuck where ArcFace's cos(theta + m) is flat (``stuck_at_the_flat_bottom``).
FLAT_BOTTOM_DEGREES = 3.0


def budget_command(config):
    """The ``sweep.py heads`` command of a run's budget: its run.py command without what a
    candidate sets."""
    flags = [flag for flag in command(config).split(" --")[1:]
             if f"--{flag}".split(" ")[0] not in CANDIDATE_FLAGS]
    return " --".join(["python experiments/sweep.py heads", *flags]).replace(
        "--backbone ", "--backbones ")


def with_validation_ece(run, ledger):
    """The run, with its validation ECE before and after temperature scaling computed from
    its own per-image validation logits where its ``metrics.json`` predates the figure (as
    the runner computes it now); unchanged where it has the figure or no such logits."""
    path = os.path.join(ledger, run["name"], "test_predictions.npz")
    if metric_value(run, "calibration.val") is not None or not os.path.exists(path):
        return run
    with np.load(path) as outputs:
        if "val_logits" not in outputs:
            return run
        logits, labels = outputs["val_logits"], outputs["val_labels"]
    val = metrics.ece_before_after(logits, labels, metrics.fit_temperature(logits, labels))
    return run | {"metrics": run["metrics"] | {
        "calibration": run["metrics"].get("calibration", {}) | {"val": val}}}


def mean_cell(group, key):
    """Mean ± s.d. of ``key`` over the runs that record it, ``-`` if none does."""
    values = [v for v in (metric_value(run, key) for run in group) if v is not None]
    return mean_sd(values) if values else "-"


def last_angle(run, ledger):
    """The training images' mean angle to their own class centre over a run's last epoch
    (degrees, its ``log.csv``); None for a head without angles (softmax) or a run without a
    log."""
    first_and_last = angles(training_log(run, ledger))
    return None if first_and_last is None else first_and_last[1]


def angle_cell(group, last_angles):
    """Mean ± s.d. of the group's last-epoch angles (``last_angles``: ``{name: last_angle}``)
    over the runs that log one, ``-`` if none does."""
    values = [v for v in (last_angles[run["name"]] for run in group) if v is not None]
    return mean_sd(values, scale=1) if values else "-"


def stuck_at_the_flat_bottom(runs, last_angles):
    """The ArcFace runs whose last-epoch mean target angle ended within
    ``FLAT_BOTTOM_DEGREES`` of π − m, where cos(θ + m) has its minimum and so no slope: the
    target logit no longer pulls an image toward its class there, while the other logits
    still push it away from theirs (``last_angles``: ``{name: last_angle}``). ``[(run,
    angle, π − m in degrees)]``."""
    stuck = []
    for run in runs:
        c, angle = run["config"], last_angles[run["name"]]
        if c["loss"] == "arcface" and angle is not None:
            bottom = math.degrees(math.pi - c["margin"])
            if abs(angle - bottom) <= FLAT_BOTTOM_DEGREES:
                stuck.append((run, angle, bottom))
    return stuck


def stuck_sentence(runs, last_angles):
    """One sentence naming the runs ``stuck_at_the_flat_bottom``, empty if none is."""
    stuck = stuck_at_the_flat_bottom(runs, last_angles)
    if not stuck:
        return ""
    named = "; ".join(f"`{head_spec(run['config'])}` seed {run['config']['seed']} "
                      f"(lr {run['config']['learning_rate']}): {angle:.1f}°, π − m = "
                      f"{bottom:.1f}°" for run, angle, bottom in sorted(
                          stuck, key=lambda s: (s[0]["config"]["margin"], s[0]["name"])))
    return (f"\nStuck where cos(θ + m) has no slope (final θ_y within "
            f"{FLAT_BOTTOM_DEGREES:g}° of π − m), so the target logit no longer pulls an image "
            f"toward its class: {named}.\n")


def selection(runs, main, open_set, ledger):
    """Per budget, each candidate's validation figures over its seeds and (where the same
    setting ran on open-set split 0) its AUROC on validation, best first; then each head
    type's best setting per budget (the main command's runs count there)."""
    if not runs:
        return "No selection run is recorded yet.\n"
    runs = [with_validation_ece(run, ledger) for run in runs]
    last_angles = {run["name"]: last_angle(run, ledger) for run in runs}  # each log read once
    twins = {}  # each setting's runs on open-set split 0, any seed, scored on validation
    for run in open_set:
        if run["config"]["classes"] == split_classes(0) and "open_set_val" in run["metrics"]:
            twins.setdefault(setting_key(run["config"], ("classes", "seed")), []).append(run)
    budgets = {}
    for run in runs:
        c = run["config"]
        budgets.setdefault((c["backbone"], -c["train_size"] * c["epochs"], setting_label(c)),
                           {}).setdefault(setting_key(c), []).append(run)
    parts = []
    for (_, _, label), candidates in sorted(budgets.items()):
        rows = []
        for group in sorted(candidates.values(), reverse=True, key=lambda g: tuple(
                sum(validation_rank(r)[i] for r in g) / len(g) for i in (0, 1))):
            c = group[0]["config"]
            twin = twins.get(setting_key(c, ("classes", "seed")), [])
            rows.append([f"`{head_spec(c)}`", c["learning_rate"],
                         ", ".join(str(r["config"]["seed"]) for r in
                                   sorted(group, key=lambda r: r["config"]["seed"])),
                         *(mean_cell(group, key) for key, _ in COLUMNS),
                         angle_cell(group, last_angles),
                         *(mean_cell(twin, f"open_set_val.{score}.auroc")
                           for score, _ in OPEN_SET_SCORES)])
        first = next(iter(candidates.values()))[0]["config"]
        parts.append(f"*{label}*: `{budget_command(first)} --heads ... --seeds ...`\n\n"
                     + markdown(["candidate (`--heads`)", "lr", "seeds",
                                 *(name for _, name in COLUMNS), "final θ_y",
                                 *(f"open-set val AUROC {name}" for _, name in OPEN_SET_SCORES)],
                                rows)
                     + stuck_sentence([r for g in candidates.values() for r in g],
                                      last_angles))
    best = {}
    for run in runs + main:
        c = run["config"]
        best.setdefault((c["backbone"], -c["train_size"] * c["epochs"]), []).append(run)
    chosen = [[f"`{head_spec(group[0]['config'])}`", setting_label(group[0]["config"]),
               group[0]["config"]["learning_rate"], len(group),
               mean_sd([validation_rank(r)[0] for r in group])]
              for budget in sorted(best)
              for _, group in sorted(best_on_validation(best[budget]).items())]
    return ("\n".join(parts) + "\nBest on validation, per head type and budget:\n\n"
            + markdown(["head (`sweep.py --heads`)", "setting", "lr", "seeds", "val top-1"],
                       chosen))
