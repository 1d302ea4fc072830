"""Figure 2's study: ArcFace over the margin m, which runs failed to train and why, from the
ledger (``metrics.json`` and each run's per-epoch ``log.csv``)."""

import csv
import math
import os

import numpy as np
from tables import at_recipe_kernels, markdown, recipe_label

from tfmargin.margins import target_logit


def margin_curves(runs):
    """ArcFace runs at their recipe's defaults and today's kernels, grouped into curves over
    m: ``{(backbone, fallback, s, train images, epochs): [(m, [runs at m])]}``, of two
    margins or more (several runs at one m: its seeds)."""
    curves = {}
    for run in runs:
        c = run["config"]
        if (c["loss"] == "arcface" and not c["ce_weight"] and not c["classes"]
                # Any seed: a point's runs are its seeds.
                and not recipe_label(c) and at_recipe_kernels(run)):
            key = (c["backbone"], c["fallback"], c["head_scale"], c["train_size"],
                   run["metrics"]["epochs"])
            curves.setdefault(key, {}).setdefault(float(c["margin"]), []).append(run)
    return {key: sorted(points.items()) for key, points in curves.items() if len(points) >= 2}


def training_log(run, ledger):
    """A run's per-epoch training log (its ``log.csv``) as ``{column: [floats]}``, NaN where
    Keras wrote NA; ``{}`` where the ledger has no log."""
    path = os.path.join(ledger, run["name"], "log.csv")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {key: [math.nan if row[key] in ("NA", "") else float(row[key]) for row in rows]
            for key in (rows[0] if rows else ())}


def failure(run, log):
    """How training failed: ``"chance"`` (test top-1 within 1.5 times chance), ``"loss"`` (the
    last epoch's training loss not below the first's; ``log``: ``training_log``) or None. A
    run whose loss became NaN stops with an error and records nothing; the sweep names it and
    goes on."""
    if run["metrics"]["top1"] <= 1.5 / run["config"].get("num_classes", 10):
        return "chance"
    return "loss" if len(log.get("loss", [])) > 1 and not loss_fell(log) else None


def loss_fell(log):
    """Whether the last epoch's training loss is below the first's (``training_log``)."""
    loss = log.get("loss", [])
    return len(loss) > 1 and loss[-1] < loss[0]


def failed(run, log):
    """Whether training failed (``failure``)."""
    return failure(run, log) is not None


def angles(log):
    """The training images' mean angle to their own class centre (degrees), averaged over the
    first epoch and over the last: ``(first, last)``, None where the log has none."""
    theta = log.get("theta_y_mean")
    return (theta[0], theta[-1]) if theta else None


def start_slope(margin, fallback, theta=math.pi / 2, step=1e-6):
    """The slope in θ of ArcFace's target logit per unit s, at ``theta`` (a fresh image's angle
    to its class centre), by a central difference through ``tfmargin.margins.target_logit``:
    how hard training pulls such an image toward its class (negative: toward it)."""
    cos = np.cos([theta - step, theta + step])  # float64: a difference of near values
    psi = np.asarray(target_logit(cos, "arcface", 1.0, margin, 0.0, fallback=fallback))
    return float(psi[1] - psi[0]) / (2 * step)


def final_angles(run, ledger):
    """The test images' angles (degrees) to their own class centre after training
    (``test_predictions.npz``), None where the ledger has none."""
    path = os.path.join(ledger, run["name"], "test_predictions.npz")
    if not os.path.exists(path):
        return None
    with np.load(path) as predictions:
        return predictions["target_angle_deg"] if "target_angle_deg" in predictions else None


def largest_final_angle(run, ledger):
    """The largest of ``final_angles`` (None where the ledger has none)."""
    angles_deg = final_angles(run, ledger)
    return None if angles_deg is None else float(angles_deg.max())


def past_bonus(run, ledger):
    """The share of a run's test images whose angle to their own class centre ended beyond
    θ = π − m/2, where the raw target logit is *higher* than a plain cosine (cos(θ + m) >
    cos θ): the margin rewards an image for facing away from its class. None without angles."""
    angles_deg = final_angles(run, ledger)
    return None if angles_deg is None else float(np.mean(
        angles_deg > 180 - math.degrees(float(run["config"]["margin"])) / 2))


def fallback_pairs(curves):
    """The raw-margin runs of each point with the monotonic runs at the same margin, scale and
    budget: ``(m, raw runs, monotonic runs)``."""
    for (backbone, fallback, *rest), points in curves.items():
        if fallback == "none":
            monotonic = dict(curves.get((backbone, "monotonic", *rest), ()))
            for m, group in points:
                yield m, group, monotonic.get(m, [])


def bonus_shares(curves, ledger):
    """The raw-margin runs that ended at chance: ``past_bonus`` of each, how many of them
    lowered their training loss all the same, and ``past_bonus`` of the monotonic runs at the
    same margins, scales and budgets: ``(raw shares, lowered, monotonic shares)``."""
    raw, lowered, monotonic = [], 0, []
    for _, group, others in fallback_pairs(curves):
        chance = []
        for run in group:
            log, share = training_log(run, ledger), past_bonus(run, ledger)
            if failure(run, log) == "chance" and share is not None:
                chance.append(share)
                lowered += loss_fell(log)
        raw += chance
        monotonic += [past_bonus(r, ledger) for r in others] if chance else []
    return raw, lowered, [x for x in monotonic if x is not None]


def same_logit_differences(curves, ledger):
    """The two fallbacks give the same target logit below θ = π − m. Where no test image of
    either run ended past that angle, a seed-paired raw and monotonic run differ only by
    run-to-run noise: the absolute test top-1 differences (points) of those pairs."""
    differences = []
    for m, group, others in fallback_pairs(curves):
        for raw in group:
            for other in others:
                largest = [largest_final_angle(r, ledger) for r in (raw, other)]
                if (other["config"]["seed"] == raw["config"]["seed"] and None not in largest
                        and max(largest) < 180 - math.degrees(m)):
                    differences.append(100 * abs(raw["metrics"]["top1"]
                                                 - other["metrics"]["top1"]))
    return differences


def failed_margins(curves, ledger):
    """Where each curve (``margin_curves``) failed: ``{key: {"chance": [m], "loss": [m]}}``, a
    margin under "chance" when any of its runs ended at chance, else under "loss" when any
    run's loss did not fall (``failure``)."""
    result = {}
    for key, points in curves.items():
        result[key] = {"chance": [], "loss": []}
        for m, group in points:
            kinds = {failure(r, training_log(r, ledger)) for r in group} - {None}
            if kinds:
                result[key]["chance" if "chance" in kinds else "loss"].append(m)
    return result


def margins_phrase(margins, chosen):
    """``from m = 1.5 on`` when ``chosen`` are the last of ``margins`` (two or more), else
    ``at m = 1, 2``."""
    if len(chosen) > 1 and chosen == margins[margins.index(chosen[0]):]:
        return f"from m = {chosen[0]:g} on"
    return "at m = " + ", ".join(f"{m:g}" for m in chosen)


def failure_phrase(margins, failures):
    """Where a curve over ``margins`` failed (``failed_margins``' entry), in words."""
    said = [f"{words} {margins_phrase(margins, failures[kind])}" for kind, words in (
        ("chance", "ends at chance"), ("loss", "does not lower its loss")) if failures[kind]]
    return " and ".join(said) or "succeeds at every margin"


# How the verdict names each fallback (``tfmargin.margins.FALLBACKS``), the paper's first.
FALLBACK_NAMES = {"none": "the raw margin (the paper's formula)",
                  "monotonic": "the monotonic fallback", "easy": "the easy margin"}


def sweep_verdict(runs, ledger):
    """Figure 2's answer, one sentence per backbone and budget: where training failed with
    each fallback, and at which scales."""
    curves = margin_curves(runs)
    failures = failed_margins(curves, ledger)
    budgets = {}
    for key, points in sorted(curves.items()):
        backbone, fallback, scale, size, epochs = key
        phrase = failure_phrase([m for m, _ in points], failures[key])
        budgets.setdefault((backbone, size, epochs), {}).setdefault(fallback, {}).setdefault(
            phrase, []).append(f"{scale:g}")
    return " ".join(
        f"On {backbone} at {size:,} training images × {epochs} epochs, " + "; ".join(
            f"with {FALLBACK_NAMES.get(fallback, fallback)} training " + " and ".join(
                f"{phrase} (s = {' and '.join(scales)})"
                for phrase, scales in phrases[fallback].items())
            for fallback in sorted(phrases, key=list(FALLBACK_NAMES).index)) + "."
        for (backbone, size, epochs), phrases in sorted(budgets.items())) or "not run yet."


def sweep_table(runs, ledger):
    """One row per curve, one column per margin: test top-1 (mean over the point's runs), the
    mean target angle over the first and the last epoch, and a cross where training failed;
    then what the runs show beyond ``sweep_verdict`` (where the angles started, the noise of
    one point, the pull on a fresh image)."""
    curves = margin_curves(runs)
    if not curves:
        return ""
    failures = failed_margins(curves, ledger)
    margins = sorted({m for points in curves.values() for m, _ in points})
    rows, starts = [], []
    for key, points in sorted(curves.items()):
        backbone, fallback, scale, size, epochs = key
        cells = dict.fromkeys(margins, "")
        for m, group in points:
            turned = [a for a in (angles(training_log(r, ledger)) for r in group) if a]
            starts += [a[0] for a in turned]
            cells[m] = f"{100 * np.mean([r['metrics']['top1'] for r in group]):.1f}"
            if turned:
                cells[m] += " ({:.0f}° → {:.0f}°)".format(*np.mean(turned, axis=0))
            if m in failures[key]["chance"] + failures[key]["loss"]:
                cells[m] += " ✗"
        rows.append([backbone, f"{size:,} × {epochs}", fallback, f"{scale:g}",
                     *cells.values()])
    said = (f"Over the first epoch the training images sat at {min(starts):.0f}°–"
            f"{max(starts):.0f}° from their own class centre (mean per run). " if starts else "")
    noise = same_logit_differences(curves, ledger)
    if noise:
        said += ("The two fallbacks give the same target logit below θ = 180° − m; where no"
                 " test image of either run ended past it, seed-paired runs of the two differ"
                 f" by {min(noise):.1f}–{max(noise):.1f} points of test top-1 (mean"
                 f" {np.mean(noise):.1f}, {len(noise)} pair{'s' * (len(noise) > 1)}), a gauge"
                 " of one point's noise. ")
    raw, lowered, monotonic = bonus_shares(curves, ledger)
    if raw and monotonic:
        said += ("At the end of training a median of {:.0f} % (range {:.0f}–{:.0f} %) of the test"
                 " images of the raw-margin runs that ended at chance sat beyond θ = 180° − m/2,"
                 " where the raw target logit is higher than a plain cosine; in the monotonic"
                 " runs at the same margins and scales, {:.0f} % ({:.0f}–{:.0f} %).").format(
                     *(100 * f(shares) for shares in (raw, monotonic)
                       for f in (np.median, np.min, np.max)))
        said += (f" {lowered} of those {len(raw)} raw-margin runs lowered their training loss"
                 " all the same. ")
    listed = ", ".join(f"{m:g}" for m in margins)
    slopes = "; ".join(
        f"{fallback}: " + ", ".join(f"{start_slope(m, fallback):.2f}" for m in margins)
        for fallback in sorted({fallback for _, fallback, *_ in curves}))
    return (markdown(["backbone", "train images × epochs", "fallback", "s",
                      *(f"m = {m:g}" for m in margins)], rows)
            + f"\n{said}At θ = 90° the target logit's slope in θ per unit s, for m = {listed},"
            f" is {slopes} (negative: a larger angle lowers the target logit, so training pulls"
            " the image toward its class).\n")
