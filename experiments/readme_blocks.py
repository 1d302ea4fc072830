"""The README's three results blocks: one question each, answered in a sentence, then a
small table and a one-line legend. Every number is computed here from the ledger's runs
(``report.py`` writes the blocks and checks them); the full tables are in docs/results.md.
"""

import numpy as np
from tables import difference_cell, mean_sd, metric_value, seed_arms

LEGEND = ("*top-1*: test accuracy, % (mean ± s.d. over seeds or splits); *MAP@R*: how well a "
          "test image's embedding retrieves the others of its class, %; *AUROC*: how well "
          "the served score ranks known-class test images above held-out-class ones, %; "
          "*Δ*: paired difference from softmax, with its 95 % interval.\n")


def _largest_setting(arms):
    """The arms of the setting with the most runs (the study a block reports)."""
    counts = {}
    for (setting, _), pairs in arms.items():
        counts[setting] = counts.get(setting, 0) + len(pairs)
    chosen = max(counts, key=counts.get)
    return {head: pairs for (setting, head), pairs in arms.items() if setting == chosen}


def _against(pairs, base, key):
    """``(cell, interval, n)``: the paired difference from softmax over common pairs."""
    common = sorted(set(pairs) & set(base))
    if not common:
        return "-", None, 0
    text, interval = difference_cell([metric_value(pairs[k], key) for k in common],
                                     [metric_value(base[k], key) for k in common])
    return text, interval, len(common)


def _words(text, interval):
    """``-0.76 points (95 % CI -0.95 to -0.57): lower``, from a difference cell."""
    if interval is None:
        return f"{text} points (one pair, no interval)"
    sign = "lower" if interval[1] < 0 else "higher" if interval[0] > 0 else "within noise"
    return (f"{text.split()[0]} points (95 % CI {interval[0]:+.2f} to {interval[1]:+.2f}): "
            f"{sign}")


def headline(runs):
    """What the margin buys at convergence: each head against softmax, paired by seed."""
    if not runs:
        return "No converged comparison is recorded yet.\n"
    arms = _largest_setting(seed_arms(runs))
    base = arms.get("softmax", {})
    rows, words = [], []
    for head, pairs in sorted(arms.items(), key=lambda item: item[0] != "softmax"):
        top1 = _against(pairs, base, "top1") if head != "softmax" else ("-", None, 0)
        retrieval = _against(pairs, base, "map_at_r") if head != "softmax" else ("-", None, 0)
        rows.append(f"| {head} | {len(pairs)} | "
                    f"{mean_sd([metric_value(r, 'top1') for r in pairs.values()])} | "
                    f"{top1[0]} | "
                    f"{mean_sd([metric_value(r, 'map_at_r') for r in pairs.values()])} | "
                    f"{retrieval[0]} |")
        if head != "softmax" and top1[2]:
            words.append(f"{head} against softmax over {top1[2]} paired seeds: top-1 "
                         f"{_words(*top1[:2])}, MAP@R {_words(*retrieval[:2])}")
    answer = ("**What the margin buys at convergence, every head trained by airbench's "
              "recipe (tuned for softmax): " + "; ".join(words) + ".**"
              if words else "**No margin head shares seeds with softmax yet.**")
    return (answer + "\n\n| head | seeds | top-1 | Δ top-1 | MAP@R | Δ MAP@R |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n" + LEGEND)


def main_command(runs):
    """The main command per head: seeds, test top-1, MAP@R, and the paired difference."""
    if not runs:
        return "The main command has no recorded full-budget run yet.\n"
    by_head = {}
    for run in runs:
        by_head.setdefault(run["config"]["loss"], {})[run["config"]["seed"]] = run
    base = by_head.get("softmax", {})
    rows = []
    for head, pairs in sorted(by_head.items(), key=lambda item: item[0] != "arcface"):
        top1 = _against(pairs, base, "top1")[0] if head != "softmax" else "-"
        machines = sorted({r["config"].get("machine", {}).get("model", "?")
                           for r in pairs.values()})
        rows.append(f"| `--loss {head}` | {', '.join(map(str, sorted(pairs)))} | "
                    f"{mean_sd([metric_value(r, 'top1') for r in pairs.values()])} | {top1} | "
                    f"{mean_sd([metric_value(r, 'map_at_r') for r in pairs.values()])} | "
                    f"{'; '.join(machines)} |")
    arcface, softmax = by_head.get("arcface", {}), base
    common = sorted(set(arcface) & set(softmax))
    if len(common) >= 2:
        text, interval, n = _against(arcface, softmax, "top1")
        answer = (f"**At this budget ArcFace against softmax over {n} paired seeds: top-1 "
                  f"{_words(text, interval)}.**")
    else:
        gap = 100 * (np.mean([metric_value(r, "top1") for r in arcface.values()])
                     - np.mean([metric_value(r, "top1") for r in softmax.values()])) \
            if arcface and softmax else None
        answer = (f"**At this budget ArcFace's mean test top-1 ({len(arcface)} seed(s)) is "
                  f"{gap:+.2f} points from softmax's ({len(softmax)} seed(s)); with "
                  f"{len(common)} paired seed(s) that is an anecdote, not a comparison yet.**"
                  if gap is not None else "**Only one head has a recorded run.**")
    return (answer + "\n\n| command | seeds | top-1 | Δ top-1 | MAP@R | CPU |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")


def open_set(runs):
    """Rejecting unknowns: per head, the served score's AUROC over the splits, its paired
    difference from softmax's, the unknowns rejected and the closed-set top-1."""
    if not runs:
        return "The open-set study has no recorded runs yet.\n"
    arms = _largest_setting(seed_arms(runs, pair_by="classes"))
    base = arms.get("softmax", {})
    served = sorted({r["metrics"].get("reject", {}).get("score", "max_logit")
                     for pairs in arms.values() for r in pairs.values()})
    key = f"open_set.{served[0]}.auroc" if len(served) == 1 else "open_set.max_logit.auroc"
    rows, means = [], {}
    for head, pairs in sorted(arms.items(), key=lambda item: item[0] != "softmax"):
        aurocs = [metric_value(r, key) for r in pairs.values()]
        delta = _against(pairs, base, key)[0] if head != "softmax" else "-"
        means[head] = np.mean(aurocs)
        rows.append(f"| {head} | {len(pairs)} | {mean_sd(aurocs)} | {delta} | "
                    + " | ".join(mean_sd([metric_value(r, k) for r in pairs.values()])
                                 for k in ("reject.unknown_rejected",
                                           "open_set.closed_set_top1",
                                           "calibration.after.ece")) + " |")
    best, worst = max(means, key=means.get), min(means, key=means.get)
    answer = (f"**The study's exports serve {' and '.join(served)}. Telling held-out classes "
              f"apart, the best head is {best}, at AUROC {100 * means[best]:.2f}, the weakest "
              f"{worst}, at {100 * means[worst]:.2f} (50 is chance); each head's served score "
              "is to be chosen on validation (docs/recipe.md).**")
    return (answer + "\n\n| head | splits | AUROC | Δ AUROC | unknowns rejected | closed-set "
            "top-1 | ECE after scaling |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
            + "\n\nAt the threshold that keeps 95 % of known validation images. *ECE*: "
            "expected calibration error of the served probabilities, %. Every score's AUROC "
            "for every split: docs/results.md.\n")
