"""Each head's settings under the airbench recipe, chosen on validation by the rule of
docs/recipe.md ("Each head's recipe at the converged budget"), and the runs the rule needs next.

    python experiments/head_recipes.py            # each head's choice, or the runs it waits on
    python experiments/head_recipes.py --check    # exit 1 if recipes.HEAD_DEFAULTS["airbench"]
                                                  # is not the rule's choice

The rule, step by step, each step at the previous step's choice: label smoothing {0, 0.1,
0.2} at the head's starting scale and margin; for ArcFace and CosFace the scale {8, 16} (and 32
where 16 wins) and the margin; then the learning rate halved and doubled (and one step further
where an end of that wins). A step chooses the highest mean validation top-1 once every
candidate has a run and every candidate within 0.5 points of the best (the best too) has two
seeds.
Candidates are the ledger's airbench runs on all ten classes with 10 % held out for
validation, in bfloat16 mixed precision (runs in float32, from CPUs without bfloat16
instructions, are another setting), with the recipe's other settings.
"""

import argparse

import numpy as np
from ledger import LEDGER
from tables import load_runs, markdown, metric_value, setting_key

from tfmargin.runner.config import RunConfig
from tfmargin.runner.recipes import HEAD_DEFAULTS, RECIPES

RECIPE = "airbench"
HEADS = ("softmax", "arcface", "cosface", "normface")
SMOOTHINGS = (0.0, 0.1, 0.2)
SCALES = (8.0, 16.0)
WIDE_SCALE = 32.0  # tried where 16 wins
MARGINS = {"arcface": (0.1, 0.2, 0.3), "cosface": (0.1, 0.2, 0.35)}
# Where each head starts: the registry's scale and margin (softmax has neither).
START = {"softmax": (None, None), "arcface": (8.0, 0.1), "cosface": (8.0, 0.1),
         "normface": (8.0, 0.0)}
NEAR = 0.005  # candidates this close to the best (validation top-1) get a second seed
# A candidate: (label smoothing, scale, margin, learning rate).
FIELDS = ("label_smoothing", "scale", "margin", "learning_rate")


def candidate(*values):
    return tuple(None if v is None else round(float(v), 6) for v in values)


RATE = candidate(RECIPES[RECIPE]["learning_rate"])[0]  # the recipe's own, per 128 images


def settings(config):
    """A run's candidate: its label smoothing, scale, margin and learning rate."""
    return candidate(*(config[field] for field in FIELDS))


def airbench_settings(loss):
    """Where a head starts: airbench's own label smoothing and rate (tuned for softmax), the
    registry's scale and margin."""
    return candidate(RECIPES[RECIPE]["label_smoothing"], *START[loss], RATE)


def is_candidate(config):
    """Whether a run is a selection candidate: the airbench recipe on all classes, 10 %
    validation, bfloat16, and nothing but its head's settings changed from the recipe."""
    if (config["recipe"] != RECIPE or config["classes"] or config["val_split"] != 0.1
            or not config["mixed_precision"] or config["loss"] not in HEADS):
        return False
    default = RunConfig.for_recipe(RECIPE, loss=config["loss"], dataset=config["dataset"],
                                   mixed_precision=True).resolved().record()
    leave_out = ("seed", *FIELDS)
    return setting_key(config, leave_out) == setting_key(default, leave_out)


def candidates(runs):
    """``{loss: {candidate: {seed: validation top-1}}}`` of the selection runs."""
    found = {loss: {} for loss in HEADS}
    for run in runs:
        c = run["config"]
        if is_candidate(c) and metric_value(run, "val.top1") is not None:
            found[c["loss"]].setdefault(settings(c), {})[c["seed"]] = metric_value(run,
                                                                                   "val.top1")
    return found


def step(found, keys):
    """Among ``keys``: ``(best, needed)``; ``best`` is None while ``needed`` lists the runs,
    ``(candidate, seed)``, the step waits on (first a run of each, then second seeds)."""
    missing = [(key, 0) for key in keys if not found.get(key)]
    if missing:
        return None, missing
    means = {key: float(np.mean(list(found[key].values()))) for key in keys}
    best = max(keys, key=means.get)
    seconds = [(key, min(set(range(3)) - set(found[key]))) for key in keys
               if means[key] >= means[best] - NEAR and len(found[key]) < 2]
    return (None, seconds) if seconds else (best, [])


def choose(loss, found):
    """``(choice, needed)`` for one head: the chosen candidate (None until every step has
    chosen) and the runs the next undecided step waits on."""
    scale, margin = START[loss]
    best, needed = step(found, [candidate(ls, scale, margin, RATE) for ls in SMOOTHINGS])
    if best is None:
        return None, needed
    smoothing = best[0]
    if loss in MARGINS:
        keys = [candidate(smoothing, s, m, RATE) for s in SCALES for m in MARGINS[loss]]
        best, needed = step(found, keys)
        if best is not None and best[1] == SCALES[-1]:
            best, needed = step(found, keys + [candidate(smoothing, WIDE_SCALE, m, RATE)
                                               for m in MARGINS[loss]])
        if best is None:
            return None, needed
    rates = [RATE / 2, RATE, RATE * 2]
    keys = [candidate(*best[:3], r) for r in rates]
    best, needed = step(found, keys)
    if best is not None and best[3] in (keys[0][3], keys[-1][3]):
        further = rates[0] / 2 if best[3] == keys[0][3] else rates[-1] * 2
        best, needed = step(found, keys + [candidate(*best[:3], further)])
    return best, needed


def head_defaults(loss, choice):
    """The HEAD_DEFAULTS entry of a choice: its settings that differ from the recipe's own
    (not today's HEAD_DEFAULTS, which this entry replaces) and the registry's."""
    start = dict(zip(FIELDS, airbench_settings(loss), strict=True))
    return {field: value for field, value in zip(FIELDS, choice, strict=True)
            if value != start[field]}


def choices(found):
    """``{loss: (choice or None, needed)}`` for every head, from ``candidates(runs)``."""
    return {loss: choose(loss, found[loss]) for loss in HEADS}


def spec(loss, key):
    """A candidate as a ``sweep.py --heads`` entry (its rate apart)."""
    smoothing, scale, margin, _ = key
    return ":".join([loss, *([f"s={scale:g}", f"m={margin:g}"] if scale else []),
                     f"ls={smoothing:g}"])


def table(runs):
    """Each head's selection so far: its candidates and runs, and its choice or the runs
    its next step waits on."""
    found = candidates(runs)
    rows = []
    for loss, (choice, needed) in choices(found).items():
        if choice is not None:
            state = f"chosen: `{spec(loss, choice)}`, lr {choice[3]:g}"
        else:
            state = "waits on " + ", ".join(
                f"`{spec(loss, key)}` seed {seed}"
                + (f" lr {key[3]:g}" if key[3] != RATE else "") for key, seed in needed)
        rows.append([loss, len(found[loss]), sum(map(len, found[loss].values())), state])
    return markdown(["head", "settings run", "runs", "choice"], rows)


def sweep_commands(needed, val_split="0.1"):
    """The ``sweep.py`` arguments that train ``{loss: [(candidate, seeds)]}`` (``seeds``: a
    seed, or ``sweep.py --seeds``' list) with ``val_split`` of the training images held out:
    one command per learning rate and seeds."""
    groups = {}
    for loss, runs in needed.items():
        for key, seed in runs:
            groups.setdefault((key[3], seed), []).append(spec(loss, key))
    return [["heads", "--recipe", RECIPE, "--mixed-precision", "--val-split", val_split,
             "--heads", ",".join(specs),
             "--seeds", str(seed),
             *(["--learning-rate", f"{rate:g}"] if rate != RATE else [])]
            for (rate, seed), specs in sorted(groups.items())]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ledger", default=LEDGER)
    parser.add_argument("--check", action="store_true", help="exit 1 if recipes.HEAD_DEFAULTS"
                        "['airbench'] is not the rule's choice")
    args = parser.parse_args(argv)
    chosen = choices(candidates(load_runs(args.ledger)))
    expected = {loss: defaults for loss, (choice, _) in chosen.items() if choice is not None
                for defaults in [head_defaults(loss, choice)] if defaults}
    if args.check:
        if expected != HEAD_DEFAULTS[RECIPE]:
            parser.exit(1, f"head_recipes.py: recipes.HEAD_DEFAULTS['{RECIPE}'] should be "
                           f"{expected!r}\n")
        print(f"recipes.HEAD_DEFAULTS['{RECIPE}'] is the selection's choice")
        return
    for loss, (choice, needed) in chosen.items():
        if choice is None:
            print(f"{loss}: waits on {len(needed)} run(s)")
        else:
            print(f"{loss}: chosen {dict(zip(FIELDS, choice, strict=True))}")
    needed = {loss: runs for loss, (_, runs) in chosen.items() if runs}
    for command in sweep_commands(needed):
        print("python experiments/sweep.py " + " ".join(command) + " --dataset DATA")
    print(f"HEAD_DEFAULTS['{RECIPE}'] = {expected!r}")


if __name__ == "__main__":
    main()
