"""The three answers the README and docs/results.md open with: one question each, answered
in a sentence, then a small table; and how much of the paper is reproduced. Computed here
from the ledger's runs (``report.py`` writes and checks them).
"""

from margin_sweep import margin_curves
from sweep import grid
from tables import against, head_arm, head_name, markdown, mean_sd, metric_value, seed_arms

from tfmargin.runner.config import RunConfig

LEGEND = ("*top-1*: test accuracy, % (mean ± s.d. over seeds or splits); *MAP@R*: how well a "
          "test image's embedding retrieves the others of its class, %; *AUROC*: how well "
          "the served score ranks known-class test images above held-out-class ones, %; "
          "*Δ*: paired difference from softmax, with its 95 % interval; *monotonic*: ArcFace's "
          "target logit kept decreasing past θ + m = π (docs/heads.md).\n")


def _table(runs, columns, pair_by="seed"):
    """``(table, means, deltas)`` of the study with the most runs: one row per head
    (softmax first), its number of pairs, then for each ``(key, name, paired)`` of
    ``columns`` the mean ± s.d. (``paired`` None: the distinct values, a label) and, where
    ``paired``, the paired difference from softmax
    (``deltas[head, key]``: ``tables.against``'s)."""
    arms, counts = seed_arms(runs, pair_by=pair_by), {}
    for (setting, _), pairs in arms.items():
        counts[setting] = counts.get(setting, 0) + len(pairs)
    study = max(counts, key=counts.get)
    arms = {head: pairs for (setting, head), pairs in arms.items() if setting == study}
    # The baseline: softmax, at whatever label smoothing its study gives it.
    softmax = next((head for head in sorted(arms) if head.startswith("softmax")), None)
    base, rows, means, deltas = arms.get(softmax, {}), [], {}, {}
    for head, pairs in sorted(arms.items(), key=lambda item: item[0] != softmax):
        row = [head, len(pairs)]
        for key, _, paired in columns:
            values = [metric_value(r, key) for r in pairs.values()]
            if paired is None:  # a label, not a figure
                row.append(" / ".join(sorted(set(map(str, values)))))
                continue
            means[head, key] = None if None in values else sum(values) / len(values)
            row.append(mean_sd(values))
            if paired:
                deltas[head, key] = against(pairs, base, key) if head != softmax else \
                    ("-", None, 0)
                row.append(deltas[head, key][0])
        rows.append(row)
    header = ["head", "seeds" if pair_by == "seed" else "splits"]
    for _, name, paired in columns:
        header += [name, f"Δ {name}"] if paired else [name]
    return markdown(header, rows), means, deltas


def _words(text, interval, n):
    """``lower by 0.76 points (95 % CI 0.57 to 0.95)``, from a difference cell."""
    if interval is None:
        return f"{text} points ({n} pair, no interval)"
    low, high = interval
    if low > 0 or high < 0:
        near, far = sorted((abs(low), abs(high)))
        return (f"{'higher' if low > 0 else 'lower'} by {abs(float(text.split()[0])):.2f} "
                f"points (95 % CI {near:.2f} to {far:.2f})")
    return f"within noise ({text.split()[0]} points, 95 % CI {low:+.2f} to {high:+.2f})"


# How each converged study set its heads' settings (report.py: which runs are which).
CONVERGED_STUDIES = {
    "as tuned for softmax": "every head trained by airbench's recipe (tuned for softmax)",
    "chosen": "every head at the settings chosen for it on validation (docs/recipe.md)",
}


def is_paired(runs):
    """Whether a margin head shares at least two seeds with softmax in ``runs``."""
    return bool(runs) and any(key == "top1" and n >= 2 for (_, key), (_, _, n) in _table(
        runs, (("top1", "top-1", True),))[2].items())


def headline(runs, study="as tuned for softmax"):
    """What the margin buys at convergence: each head against softmax, paired by seed, in
    the converged ``study`` (a key of ``CONVERGED_STUDIES``)."""
    if not runs:
        return "No converged comparison is recorded yet.\n"
    table, _, deltas = _table(runs, (("top1", "top-1", True), ("map_at_r", "MAP@R", True)))
    words = [f"{head}, {top1[2]} seeds: top-1 {_words(*top1)}, "
             f"MAP@R {_words(*deltas[head, 'map_at_r'])}"
             for (head, key), top1 in deltas.items() if key == "top1" and top1[2]]
    answer = (f"What the margin buys at convergence, {CONVERGED_STUDIES[study]}, paired by "
              "seed against softmax: " + "; ".join(words)
              if words else "No margin head shares seeds with softmax yet")
    return f"**{answer}.**\n\n{table}\n{LEGEND}"


def beside_headline(studies, study, waiting):
    """The converged study the headline does not show (``studies``: report.py's
    ``converged_studies``), or why the headline is the study at softmax's settings
    (``waiting``: how many heads the selection has not chosen for yet)."""
    if study == "chosen":
        return ("Beside it, the study at airbench's own settings:\n\n"
                + headline(studies["as tuned for softmax"]))
    if waiting:
        return f"The selection has not chosen for {waiting} of the 4 heads yet.\n"
    return ("Every head has its choice; the paired runs at it are not recorded yet "
            "(`python experiments/studies.py --run chosen-pairs`).\n")


def main_command(runs, converged=(), study="as tuned for softmax"):
    """The main command per head: seeds, test top-1, MAP@R, and the paired difference; then
    how that difference compares with the same head's at convergence (``converged``: the
    headline's runs, of the converged ``study``)."""
    if not runs:
        return "The main command has no recorded full-budget run yet.\n"
    table, means, deltas = _table(runs, (("top1", "top-1", True), ("map_at_r", "MAP@R", False)))
    heads = [head for head, _ in means if head != "softmax"]
    if not heads or "softmax" not in {head for head, _ in means}:
        return f"**Only one head has a recorded run.**\n\n{table}"
    text, interval, n = deltas[heads[0], "top1"]
    gap = 100 * (means[heads[0], "top1"] - means["softmax", "top1"])
    answer = (f"At this budget {heads[0]} against softmax over {n} paired seeds: top-1 "
              f"{_words(text, interval, n)}" if n >= 2 else
              f"At this budget {heads[0]}'s mean test top-1 is {gap:+.2f} points from "
              f"softmax's; with {n} paired seed(s) that is an anecdote, not a comparison yet")
    # The same loss at convergence, at whatever scale, margin and smoothing its study chose.
    far = next((delta for (head, key), delta in _table(converged, (("top1", "top-1", True),))[
        2].items() if key == "top1" and head.split()[0] == heads[0].split()[0]),
        None) if converged else None
    if far and far[2] and n:
        near_mean, far_mean = float(text.split()[0]), float(far[0].split()[0])
        answer += (f". At convergence, {CONVERGED_STUDIES[study]}, the same head's "
                   f"paired difference is {far_mean:+.2f} points over {far[2]} seeds: the "
                   + ("same sign" if (near_mean > 0) == (far_mean > 0) else "sign differs")
                   + f", {abs(near_mean - far_mean):.2f} points apart")
    return f"**{answer}.**\n\n{table}" + cpu_types(runs)


def cpu_types(runs):
    """A line naming the CPU types ``runs`` ran on, with their counts, when there are
    several (float32 results differ between them by rounding, hence by training noise). A
    model name shared by several generations (a virtual machine's "AMD EPYC") is told apart
    by its family/model numbers."""
    machines = [run["config"].get("machine", {}) for run in runs]
    families = {}
    for machine in machines:
        families.setdefault(machine.get("model"), set()).add(machine.get("family"))
    counts = {}
    for machine in machines:
        model = machine.get("model") or "an unrecorded CPU"
        model = model.replace("(R)", "").replace(" Processor", "")
        if len(families[machine.get("model")]) > 1:
            model += f" (family/model {machine.get('family') or 'unrecorded'})"
        counts[model] = counts.get(model, 0) + 1
    if len(counts) < 2:
        return ""
    return ("\nThese runs ran on more than one CPU type: " + ", ".join(
        f"{model} ({n} run{'s' * (n > 1)})" for model, n in sorted(counts.items())) + ".\n")


def served_label(run):
    """The score a run's export serves, by name (``knn (k = 10)``)."""
    reject = run["metrics"].get("reject", {})
    score = reject.get("score", "max_logit")
    return score + (f" (k = {reject['k']})" if score == "knn" else "")


def served(run, split="open_set"):
    """The figures (AUROC, OSCR) of ``split`` for the score a run's export serves, with its
    name under ``label``; None where the run has none."""
    reject = run["metrics"].get("reject", {})
    score, k = reject.get("score", "max_logit"), reject.get("k")
    figures = metric_value(run, f"{split}.knn@{k}" if score == "knn" else f"{split}.{score}")
    return figures and figures | {"label": served_label(run)}


def open_set(runs):
    """Rejecting unknowns: per head, the score its export serves, that score's AUROC over
    the splits and its paired difference from softmax's, the unknowns rejected, the
    closed-set top-1 and the ECE. The study with per-image outputs (``open_set_val``) where
    there is one: the runs before it cannot be scored again."""
    if not runs:
        return "The open-set study has no recorded runs yet.\n"
    study = [r for r in runs if "open_set_val" in r["metrics"]]
    earlier = [r for r in runs if "open_set_val" not in r["metrics"]]
    pending = ""
    if earlier and not study_is_ready(study):
        if study:
            several = len(study) != 1
            pending = (f" {len(study)} run{'s' * several} of the study that keeps per-image "
                       f"outputs (docs/results.md) {'are' if several else 'is'} recorded; the "
                       "table moves to it once softmax and another head each have two splits.")
        study = earlier
    runs = [r | {"metrics": r["metrics"] | {"served": served(r)}} for r in study]
    table, means, _ = _table(runs, (("served.label", "served score", None),
                                    ("served.auroc", "AUROC", True),
                                    ("reject.unknown_rejected", "unknowns rejected", False),
                                    ("open_set.closed_set_top1", "closed-set top-1", False),
                                    ("calibration.after.ece", "ECE after scaling", False)),
                             pair_by="classes")
    auroc = {head: value for (head, k), value in means.items()
             if k == "served.auroc" and value is not None}
    if not auroc:
        return f"**No open-set run records the AUROC of its served score.**\n\n{table}"
    best, worst = max(auroc, key=auroc.get), min(auroc, key=auroc.get)
    unchosen = any(not metric_value(r, "reject.chosen_by") or "no choice" in
                   r["metrics"]["reject"]["chosen_by"] for r in runs)
    return (f"**Telling held-out classes apart with the score its export serves, the best "
            f"head is {best}, at AUROC {100 * auroc[best]:.2f}, the weakest {worst}, at "
            f"{100 * auroc[worst]:.2f} (50 is chance)"
            + ("; these runs ran before each head's score was chosen on validation "
               "(docs/recipe.md)" * unchosen) + f".**\n\n{table}\nAt the threshold that "
            "keeps 95 % of known validation images. *ECE*: expected calibration error of "
            "the served probabilities, %. Every score's AUROC for every split: "
            f"docs/results.md.{pending}\n")


def study_is_ready(runs):
    """True when the open-set runs that keep per-image outputs hold softmax and another
    head, each on two splits or more: a comparison, not the first runs of one."""
    splits = {}
    for run in runs:
        splits.setdefault(head_name(run["config"]), set()).add(str(run["config"]["classes"]))
    return ("softmax" in splits and len(splits) > 1
            and min(len(classes) for classes in splits.values()) >= 2)


def far_away(runs):
    """Images of no class at all (``far_ood``): per run, each set's AUROC with the run's
    served score and the share its reject option rejects."""
    runs = [r for r in runs if metric_value(r, "far_ood")]
    if not runs:
        return "**No run records far-away images yet.**\n"
    sets = sorted({name for r in runs for name in r["metrics"]["far_ood"]})
    rows = []
    for run in runs:
        score = metric_value(run, "reject.score") or "max_logit"
        cells = [f"{100 * entry['auroc'][score]:.1f} / " + (
            f"{100 * entry['rejected']:.0f} %" if "rejected" in entry else "-")
            if entry else "-" for entry in (run["metrics"]["far_ood"].get(name) for name in sets)]
        known = len(run["config"]["classes"].split(",")) if run["config"]["classes"] else "all"
        rows.append([head_name(run["config"]), known, served_label(run), *cells])
    rejected = [entry["rejected"] for r in runs for entry in r["metrics"]["far_ood"].values()
                if "rejected" in entry]
    table = markdown(["head", "known classes", "served score",
                      *(f"{name}: AUROC / rejected" for name in sets)], rows)
    if not rejected:
        return ("**No run with far-away images has a reject option (no validation split).**"
                f"\n\n{table}")
    return (f"**Over {len(runs)} run{'s' * (len(runs) > 1)}, the reject option turns away between "
            f"{100 * min(rejected):.0f} % and {100 * max(rejected):.0f} % of a set of "
            f"far-away images.**\n\n{table}")


def paper(table1, runs):
    """How much of the paper is reproduced: Table 1's cells (``table1``: its runs) with two
    seeds or more, and Figure 2's points per budget, one line each."""
    seeds = {}
    for run in table1:
        cell = (head_arm(run["config"]), run["config"]["backbone"])
        seeds[cell] = seeds.get(cell, 0) + 1
    budgets = {}
    for (backbone, _, _, size, epochs), points in margin_curves(runs).items():
        budgets[backbone, size, epochs] = budgets.get((backbone, size, epochs), 0) + len(points)
    figure = "; ".join(f"{backbone} at {size:,} training images × {epochs} epochs, {n} points"
                       for (backbone, size, epochs), n in sorted(budgets.items()))
    done = sum(n >= 2 for n in seeds.values())
    main = RunConfig()
    return ("The paper, reproduced so far ([docs/results.md](docs/results.md#the-papers-tables-"
            "and-figure)):\n"
            f"* Table 1 (CIFAR-10) at the main command's budget, "
            f"{round(50_000 * (1 - main.val_split)):,} training images × {main.epochs} epochs: "
            f"{done} of its {len(grid('table1'))} cells with two seeds or more.\n"
            f"* Figure 2 (m from 0.1 to 3, both fallbacks): {figure or 'no sweep yet'}.\n"
            "* Table 2 (CIFAR-100): not run; no copy of CIFAR-100 is reachable here.\n")
