"""Run a named grid of runs through the same code path as run.py.

    python experiments/sweep.py table1 --dataset path/to/cifar10 --epochs 3 --limit-train 5000
    python experiments/sweep.py many-classes --dataset /tmp/glyphs200 --backbones tinycnn
    python experiments/sweep.py figure2 --dataset path/to/cifar10 --limit-train 5000 \
        --epochs 2      # the paper's margins, both fallbacks, s = 1 and 8 (MobileNetV2)
    python experiments/sweep.py figure2 --recipe airbench --scales 8 --dataset path/to/cifar10
    python experiments/sweep.py select --recipe airbench --dataset path/to/cifar10 \
        --epochs 5 --val-split 0.1      # s and m of the margin heads, on validation
    python experiments/sweep.py heads --recipe airbench --dataset path/to/cifar10 \
        --val-split 0 --heads softmax,arcface --seeds 0,1,2,3,4   # the seed study, 50,000
    python experiments/sweep.py heads --backbones resnet18 --dataset path/to/cifar10 \
        --val-split 0 --tta 2 --epochs 8 --heads softmax,arcface:s=8:m=0.1   # all 50,000
    python experiments/sweep.py open-set --recipe airbench --dataset path/to/cifar10 \
        --heads softmax,arcface:s=8:m=0.1   # 6 known / 4 unknown classes
    python experiments/sweep.py reject-dev --recipe airbench --dataset path/to/cifar10 \
        --heads softmax,arcface   # 7 classes: each head's served reject score, on validation

``--dry-run`` lists the grid's runs and whether each is recorded, finished or to train
(``experiments/studies.py`` does this for every study behind the documents).
Finished runs are skipped, so a sweep can be stopped and restarted; with ``--ledger
results/runs`` each run is also copied into the ledger as it finishes, and a run already
there is not trained again (on another machine, say). A run's
directory name ends in a hash of its whole configuration, so a sweep with other
settings (say --learning-rate) trains new runs instead of reporting old ones.
"""

import os

from ledger import dataset_path_mismatch, is_recorded, record
from tables import smoothing_label

from tfmargin.runner.cli import OneLineParser, add_run_arguments, exit_with, run_settings
from tfmargin.runner.config import RunConfig, normalized_classes

BACKBONES = ("resnet18", "efficientnetb0", "mobilenetv2")
PAPER_HEAD = dict(loss="arcface", scale=1.0, margin=0.1, fallback="none")
OUR_HEAD = dict(loss="arcface")  # the registry's defaults (tfmargin.margins.MARGIN_TYPES)
# The paper's Figure 2 range; at s = 1 (the paper's) and 8 (ours), each fallback.
FIGURE2_MARGINS = (0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0)
FIGURE2_SCALES = (1.0, 8.0)
# Ten classes: AdaCos' fixed scale sqrt(2) ln(C - 1) = 3.1 is the low end; face-recognition
# scales (30-64) were tuned for 1e4-1e5 classes.
SELECT_SCALES = (4.0, 8.0, 16.0)
SELECT_MARGINS = (0.1, 0.3)
# The open-set protocol's five CIFAR-10 splits (6 known classes each; the other 4 are the
# unknowns): iCGY96/ARPL split.py and sgvaze/osr_closed_set_all_you_need osr_splits.py,
# indices in the official label order. Lists 0 and 1 are the same class set.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                   "ship", "truck")
OPEN_SET_SPLITS = ((0, 6, 4, 9, 1, 7), (7, 6, 4, 9, 0, 1), (1, 5, 7, 3, 9, 4),
                   (8, 6, 1, 9, 0, 7), (2, 4, 1, 7, 9, 6))


# The classes held out of the development runs that choose each head's served reject score:
# the three known in every reporting split of the open-set study, so no reporting split's
# unknown class is ever an unknown of the choice (docs/recipe.md, "The served reject score").
# The first development runs held out horse alone; they still count.
DEVELOPMENT_UNKNOWNS = ("automobile", "horse", "truck")


def split_classes(split):
    """The known classes of an open-set split, as the ``--classes`` value (sorted, as a run
    records it)."""
    return normalized_classes(",".join(CIFAR10_CLASSES[i] for i in OPEN_SET_SPLITS[split]))


HEAD_KEYS = {"s": "scale", "m": "margin", "f": "fallback", "ce": "ce_weight",
             "ls": "label_smoothing"}


def parse_heads(text):
    """``softmax,paper,arcface:s=8:m=0.3:ls=0`` -> head settings; ``paper`` is the paper's
    head."""
    heads = []
    for spec in text.split(","):
        loss, *pairs = spec.split(":")
        if loss == "paper":
            heads.append(dict(PAPER_HEAD))
            continue
        head = dict(loss=loss)
        for pair in pairs:
            key, _, value = pair.partition("=")
            if key not in HEAD_KEYS:
                raise ValueError(f"unknown head setting {key!r} in {spec!r}; use "
                                 f"{', '.join(f'{k}= ({v})' for k, v in HEAD_KEYS.items())}")
            if HEAD_KEYS[key] in head:
                raise ValueError(f"head setting {key!r} given twice in {spec!r}; give it once")
            if key == "f":
                head[HEAD_KEYS[key]] = value
            elif key == "m" and "/" in value:  # combined: m1/m2/m3
                head[HEAD_KEYS[key]] = tuple(float(v) for v in value.split("/"))
            else:
                head[HEAD_KEYS[key]] = float(value)
        heads.append(head)
    return heads


def head_spec(config):
    """The ``sweep.py --heads`` entry of a run's head, e.g. ``arcface:s=8:m=0.1:ls=0``
    (fallback and label smoothing only when not the defaults)."""
    parts = [config["loss"]]
    if config["loss"] != "softmax":
        margin = config["margin"]
        margin = "/".join(f"{m:g}" for m in margin) if isinstance(margin, list) else \
            f"{margin:g}"
        parts += [f"s={config['head_scale']:g}", f"m={margin}"]
        if config["fallback"] != RunConfig.fallback:
            parts.append(f"f={config['fallback']}")
    if smoothing_label(config):
        parts.append(f"ls={config['label_smoothing']:g}")
    return ":".join(parts)


def grid(name, backbones=None, margins=None, scales=None, heads=None, splits=None):
    """The settings (dicts of RunConfig fields) of a named grid."""
    if name in ("table1", "table2"):
        dataset = {"table1": "cifar10", "table2": "cifar100"}[name]
        return [dict(backbone=b, dataset=dataset, **h) for b in backbones or BACKBONES
                for h in (dict(loss="softmax"), PAPER_HEAD, OUR_HEAD)]
    if name == "figure2":  # on the recipe's backbone unless --backbones names others
        return [dict(loss="arcface", margin=m, fallback=f, scale=s, dataset="cifar10",
                     **({"backbone": b} if b else {}))
                for b in backbones or (None,)
                for f in ("monotonic", "none") for s in scales or FIGURE2_SCALES
                for m in margins or FIGURE2_MARGINS]
    if name == "select":  # each margin head's s and m, on a validation split; softmax beside
        return [dict(backbone=b, loss="softmax") for b in backbones or ("airbench94",)] + [
            dict(backbone=b, loss=loss, scale=s, margin=m)
            for b in backbones or ("airbench94",) for s in scales or SELECT_SCALES
            for m in margins or SELECT_MARGINS for loss in ("arcface", "cosface")]
    if name == "many-classes":  # the paper's s=1 against scale="auto", each with the CE mix
        mixes = tuple(dict(loss="arcface", scale=s, margin=0.1, ce_weight=ce)
                      for s in (1.0, "auto") for ce in (0.0, 0.5)) + (dict(loss="softmax"),)
        return [dict(backbone=b, **h) for b in backbones or ("resnet18",) for h in mixes]
    if name == "heads":  # the seed study: each head on each backbone (seeds: --seeds)
        return [dict(backbone=b, **h) for b in backbones or ("airbench94",)
                for h in heads or (dict(loss="softmax"), PAPER_HEAD)]
    if name == "reject-dev":  # each head on 7 classes; the other 3's validation images unknown
        known = ",".join(c for c in CIFAR10_CLASSES if c not in DEVELOPMENT_UNKNOWNS)
        return [dict(backbone=b, classes=known, **h) for b in backbones or ("airbench94",)
                for h in heads or (dict(loss="softmax"),)]
    if name == "open-set":  # each head on each split of the open-set protocol, same seeds
        return [dict(backbone=b, classes=split_classes(split), **h)
                for split in (range(len(OPEN_SET_SPLITS)) if splits is None else splits)
                for b in backbones or ("airbench94",)
                for h in heads or (dict(loss="softmax"),)]
    raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")


GRIDS = ("table1", "table2", "figure2", "many-classes", "select", "heads", "open-set",
         "reject-dev")


def build_parser():
    """The sweep's command line: a grid, its own flags, and every run.py flag."""
    parser = OneLineParser(description=__doc__)
    parser.add_argument("grid", choices=GRIDS, help="which grid to run")
    grid_flags = parser.add_argument_group("the grid")
    grid_flags.add_argument("--seeds", default="0",
                            help="comma-separated seeds: every setting runs once per seed")
    grid_flags.add_argument("--backbones", help="comma-separated backbones instead of the grid's")
    grid_flags.add_argument("--margins", help="comma-separated margins instead of the grid's")
    grid_flags.add_argument("--scales", help="comma-separated scales instead of the grid's")
    grid_flags.add_argument("--heads", help="heads: comma-separated softmax, paper, or "
                            "<loss>:" + ":".join(f"{key}=<{field.replace('_', ' ')}>"
                                                 for key, field in HEAD_KEYS.items())
                            + " (each setting optional; default softmax,paper)")
    grid_flags.add_argument("--splits", help="open-set: comma-separated split numbers (0-4) "
                            "instead of all five")
    grid_flags.add_argument("--ledger", help="a results ledger (results/runs): skip the runs "
                            "recorded there, record each run as it finishes")
    grid_flags.add_argument("--dry-run", action="store_true",
                            help="list the grid's runs (recorded, finished or to train) and "
                            "train nothing")
    # Every run.py flag; those given apply to every run (the grid's own settings win), the
    # others keep the recipe's defaults. Exports are off unless asked for.
    add_run_arguments(parser, defaults=False)
    return parser


def planned_runs(args, parser):
    """The grid's RunConfigs, seed-major (all settings of a seed before the next seed), each
    run once (open-set splits 0 and 1 are the same class set, so the same run)."""
    common = {"export": "none", **run_settings(args)}
    recipe = common.pop("recipe", "standard")
    dataset = common.pop("dataset", None)
    if args.grid == "many-classes" and not dataset:
        parser.error("many-classes needs --dataset: a folder with hundreds of classes, e.g. "
                     "from python experiments/make_glyphs.py /tmp/glyphs200")

    def floats(text):
        return tuple(float(v) for v in text.split(",")) if text else None

    try:
        heads = parse_heads(args.heads) if args.heads else None
    except ValueError as error:
        parser.error(str(error))
    settings = grid(args.grid, args.backbones.split(",") if args.backbones else None,
                    floats(args.margins), floats(args.scales), heads,
                    [int(v) for v in args.splits.split(",")] if args.splits else None)
    configs = {}
    for seed in (int(v) for v in args.seeds.split(",")):
        for setting in settings:
            if dataset:
                setting = {**setting, "dataset": dataset}
            config = RunConfig.for_recipe(recipe, **{**common, **setting, "seed": seed})
            config.validation_freq = config.epochs  # validate once, at the end
            configs.setdefault(config.run_name(), config)
    return list(configs.values())


def run_state(config, ledger):
    """``recorded`` (in the ledger), ``finished`` (under the runs folder) or ``to train``."""
    name = config.run_name()
    if ledger and is_recorded(name, ledger):
        return "recorded"
    if os.path.exists(os.path.join(config.runs_dir, name, "metrics.json")):
        return "finished"
    return "to train"


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    dataset = run_settings(args).get("dataset")
    mismatch = args.ledger and dataset and dataset_path_mismatch(dataset, args.ledger)
    if mismatch:
        parser.error(mismatch)

    from tfmargin.quiet import import_tensorflow

    import_tensorflow()
    import keras

    from tfmargin.runner.train import TrainingDiverged, train

    configs = planned_runs(args, parser)
    if args.dry_run:
        for config in configs:
            print(f"{run_state(config, args.ledger):9} {config.run_name()}")
        return
    progress = keras.utils.Progbar(len(configs), unit_name="run")
    done = skipped = 0
    diverged = []
    with exit_with(parser):
        for config in configs:
            name = config.run_name()
            run_dir = os.path.join(config.runs_dir, name)
            state = run_state(config, args.ledger)
            if state != "recorded":
                try:
                    train(config)
                except TrainingDiverged as error:  # a margin sweep looks for these: go on
                    diverged.append(f"{name}: {error}")
                if args.ledger:
                    record(run_dir, args.ledger)
            skipped += state != "to train"
            done += 1
            progress.update(done, values=[("skipped", skipped)], finalize=False)
    print(f"\n{done} runs in grid {args.grid} ({skipped} already finished) under "
          f"{configs[0].runs_dir if configs else run_settings(args).get('runs_dir', 'runs')}")
    if diverged:
        parser.exit(3, f"{len(diverged)} run(s) diverged, nothing recorded for them:\n"
                       + "\n".join(diverged) + "\n")


if __name__ == "__main__":
    main()
