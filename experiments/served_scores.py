"""Each head's served reject score under a recipe, chosen on validation from the development
runs (``sweep.py reject-dev``: CIFAR-10 with automobile, horse and truck held out, the classes
known in every reporting split; the first runs held out horse alone; docs/recipe.md, "The
served reject score"): the score (and for kNN the k) with the highest AUROC of the known
validation images against the held-out classes' validation share, mean over the runs.

    python experiments/served_scores.py           # the choices, as recipes.SERVED_SCORES
    python experiments/served_scores.py --check   # exit 1 if recipes.SERVED_SCORES is not
"""

import argparse

import numpy as np
from ledger import LEDGER
from sweep import CIFAR10_CLASSES, DEVELOPMENT_UNKNOWNS
from tables import head_name, load_runs, markdown, metric_value, setting_key

from tfmargin.runner.config import RunConfig
from tfmargin.runner.recipes import SERVED_SCORES
from tfmargin.scores import GALLERY_SCORES, KNN_KS, LEGACY_KNN_K, SCORES

KNOWN = ",".join(c for c in CIFAR10_CLASSES if c not in DEVELOPMENT_UNKNOWNS)
# Every candidate ``(score, k)``: the kNN score at each k a run keeps; the others at the k of
# their recorded figure (``norm_knn`` reads the kNN similarity at LEGACY_KNN_K).
CANDIDATES = [(name, LEGACY_KNN_K) for name in SCORES if name != "knn"] + [
    ("knn", k) for k in KNN_KS]


def is_development(config):
    """Whether a run is a development run: CIFAR-10 with some of ``DEVELOPMENT_UNKNOWNS``,
    and nothing else, held out of training."""
    held_out = set(CIFAR10_CLASSES) - set(config["classes"].split(","))
    return bool(held_out) and held_out <= set(DEVELOPMENT_UNKNOWNS)  # all 10 when no --classes


def development_runs(runs):
    """``{(recipe, loss): [run]}``: each head's development runs at its recipe's defaults."""
    heads = {}
    for run in runs:
        config = run["config"]
        if not is_development(config):
            continue
        default = RunConfig.for_recipe(config["recipe"], loss=config["loss"],
                                       classes=config["classes"],
                                       dataset=config["dataset"], seed=config["seed"],
                                       mixed_precision=config["mixed_precision"])
        if setting_key(config) == setting_key(default.resolved().record()):
            heads.setdefault((config["recipe"], config["loss"]), []).append(run)
    return heads


def auroc(run, candidate):
    """A development run's validation AUROC of ``(score, k)``, or None."""
    name, k = candidate
    key = f"knn@{k}" if name == "knn" else name
    return metric_value(run, f"open_set_val.{key}.auroc")


def choices(runs):
    """``{(recipe, loss): ((score, k), {candidate: mean AUROC})}``."""
    chosen = {}
    for head, group in development_runs(runs).items():
        means = {c: float(np.mean([auroc(r, c) for r in group])) for c in CANDIDATES
                 if all(auroc(r, c) is not None for r in group)}
        chosen[head] = max(means, key=means.get), means
    return chosen


def label(candidate):
    name, k = candidate
    return f"{name} (k = {k})" if name in GALLERY_SCORES else name


def table(runs):
    """Each head's validation AUROC of every candidate score and its choice."""
    chosen, heads = choices(runs), development_runs(runs)
    if not chosen:
        return "No development run is recorded yet: every head serves the maximum logit.\n"
    shown = sorted({c for _, means in chosen.values() for c in means}, key=CANDIDATES.index)
    rows = [[recipe, head_name(heads[recipe, loss][0]["config"]), len(heads[recipe, loss]),
             *(f"{100 * means[c]:.2f}" if c in means else "-" for c in shown), label(best)]
            for (recipe, loss), (best, means) in sorted(chosen.items())]
    return markdown(["recipe", "head", "runs", *map(label, shown), "served"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", default=LEDGER)
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if recipes.SERVED_SCORES is not the choice of the ledger")
    args = parser.parse_args(argv)
    chosen = {head: best for head, (best, _) in choices(load_runs(args.ledger)).items()}
    if args.check:
        if chosen != SERVED_SCORES:
            parser.exit(1, f"served_scores.py: recipes.SERVED_SCORES should be {chosen!r}\n")
        print("recipes.SERVED_SCORES is the development runs' choice")
        return
    print(f"SERVED_SCORES = {chosen!r}")


if __name__ == "__main__":
    main()
