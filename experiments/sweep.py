"""Run a named grid of runs through the same code path as run.py.

    python experiments/sweep.py table1 --dataset path/to/cifar10 --epochs 3 --limit-train 5000
    python experiments/sweep.py many-classes --dataset /tmp/glyphs200 --backbones tinycnn
    python experiments/sweep.py select --recipe airbench --dataset path/to/cifar10 \
        --epochs 5 --val-split 0.1      # s and m of the margin heads, on validation
    python experiments/sweep.py heads --recipe airbench --dataset path/to/cifar10 \
        --heads softmax,paper,arcface:s=8:m=0.3 --seeds 0,1,2,3,4   # the seed study
    python experiments/sweep.py heads --backbones resnet18 --dataset path/to/cifar10 \
        --val-split 0 --tta 2 --epochs 8 --heads softmax,arcface:s=8:m=0.1   # all 50,000
    python experiments/sweep.py open-set --recipe airbench --dataset path/to/cifar10 \
        --val-split 0.1 --heads softmax,arcface:s=8:m=0.1   # 6 known / 4 unknown classes

Finished runs are skipped, so a sweep can be stopped and restarted; with ``--ledger
results/runs`` each run is also copied into the ledger as it finishes, and a run already
there is not trained again (on another machine, say). A run's
directory name ends in a hash of its whole configuration, so a sweep with other
settings (say --learning-rate) trains new runs instead of reporting old ones.
"""

import argparse
import os

from ledger import is_recorded, record

from tfmargin.cli import OneLineParser, exit_with
from tfmargin.names import BATCHNORMS, GELUS, TTA_LEVELS

BACKBONES = ("resnet18", "efficientnetb0", "mobilenetv2")
PAPER_HEAD = dict(loss="arcface", scale=1.0, margin=0.1, fallback="none")
OUR_HEAD = dict(loss="arcface")  # the registry's defaults (tfmargin.margins.MARGIN_TYPES)
FIGURE2_MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)
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


def split_classes(split):
    """The known classes of an open-set split, as the ``--classes`` value."""
    return ",".join(CIFAR10_CLASSES[i] for i in OPEN_SET_SPLITS[split])


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


def grid(name, backbones=None, margins=None, scales=None, heads=None):
    """The settings (dicts of RunConfig fields) of a named grid."""
    if name in ("table1", "table2"):
        dataset = {"table1": "cifar10", "table2": "cifar100"}[name]
        return [dict(backbone=b, dataset=dataset, **h) for b in backbones or BACKBONES
                for h in (dict(loss="softmax"), PAPER_HEAD, OUR_HEAD)]
    if name == "figure2":
        return [dict(backbone=b, loss="arcface", margin=m, fallback=f, scale=s,
                     dataset="cifar10")
                for b in backbones or ("efficientnetb0", "mobilenetv2")
                for f in ("monotonic", "none") for s in scales or (1.0, 16.0)
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
    if name == "open-set":  # each head on each split of the open-set protocol, same seeds
        return [dict(backbone=b, classes=split_classes(split), **h)
                for split in range(len(OPEN_SET_SPLITS)) for b in backbones or ("airbench94",)
                for h in heads or (dict(loss="softmax"),)]
    raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")


GRIDS = ("table1", "table2", "figure2", "many-classes", "select", "heads", "open-set")


def main(argv=None):
    parser = OneLineParser(description=__doc__)
    parser.add_argument("grid", choices=GRIDS, help="which grid to run")
    parser.add_argument("--dataset", help="override the grid's dataset (a TFDS name or folder)")
    parser.add_argument("--recipe", default="standard", help="training recipe (as run.py)")
    parser.add_argument("--epochs", type=int, help="epochs per run (default: the recipe's)")
    parser.add_argument("--limit-train", type=int, help="training images per run")
    parser.add_argument("--batch-size", type=int, help="per-replica batch size")
    parser.add_argument("--learning-rate", type=float,
                        help="peak learning rate per 128 images (default: the recipe's)")
    parser.add_argument("--label-smoothing", type=float,
                        help="label smoothing (as run.py; default: the recipe's)")
    parser.add_argument("--val-split", type=float,
                        help="validation fraction of the training data (default: the recipe's)")
    parser.add_argument("--seeds", default="0",
                        help="comma-separated seeds: every setting runs once per seed")
    parser.add_argument("--backbones", help="comma-separated backbones instead of the grid's")
    parser.add_argument("--margins", help="comma-separated margins instead of the grid's")
    parser.add_argument("--scales", help="comma-separated scales instead of the grid's")
    parser.add_argument("--heads", help="heads: comma-separated softmax, paper, or "
                        "<loss>:" + ":".join(f"{key}=<{field.replace('_', ' ')}>"
                                             for key, field in HEAD_KEYS.items())
                        + " (each setting optional; default softmax,paper)")
    parser.add_argument("--tta", type=int, choices=tuple(TTA_LEVELS),
                        help="test-time augmentation level (as run.py; default: the recipe's)")
    parser.add_argument("--gelu", choices=tuple(GELUS),
                        help="the GELU of airbench's networks (as run.py; default: the "
                        "recipe's)")
    parser.add_argument("--batchnorm", choices=tuple(BATCHNORMS),
                        help="the BatchNorm of the backbones (as run.py; default: the "
                        "recipe's)")
    parser.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction,
                        default="auto", help="mixed precision on or off (as run.py; default "
                        "auto)")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go")
    parser.add_argument("--export", default="none", help="exports per run (as run.py)")
    parser.add_argument("--ledger", help="a results ledger (results/runs): skip the runs "
                        "recorded there, record each run as it finishes")
    args = parser.parse_args(argv)

    from tfmargin.quiet import import_tensorflow

    import_tensorflow()
    import keras

    from tfmargin.config import RunConfig
    from tfmargin.train import train

    common = dict(runs_dir=args.runs_dir, export=args.export,
                  mixed_precision=args.mixed_precision)
    for key in ("epochs", "limit_train", "batch_size", "learning_rate", "label_smoothing",
                "val_split", "tta", "gelu", "batchnorm"):
        if getattr(args, key) is not None:
            common[key] = getattr(args, key)

    if args.grid == "many-classes" and not args.dataset:
        parser.error("many-classes needs --dataset: a folder with hundreds of classes, e.g. "
                     "from python experiments/make_glyphs.py /tmp/glyphs200")

    def floats(text):
        return tuple(float(v) for v in text.split(",")) if text else None

    try:
        heads = parse_heads(args.heads) if args.heads else None
    except ValueError as error:
        parser.error(str(error))
    settings = grid(args.grid, args.backbones.split(",") if args.backbones else None,
                    floats(args.margins), floats(args.scales), heads)
    configs = []
    for seed in (int(v) for v in args.seeds.split(",")):  # seed-major: all heads per seed
        for setting in settings:
            if args.dataset:
                setting = {**setting, "dataset": args.dataset}
            config = RunConfig.for_recipe(args.recipe, **setting, **common, seed=seed)
            config.validation_freq = config.epochs  # validate once, at the end
            configs.append(config)
    progress = keras.utils.Progbar(len(configs), unit_name="run")
    done = skipped = 0
    with exit_with(parser):
        for config in configs:
            name = config.run_name()
            run_dir = os.path.join(args.runs_dir, name)
            recorded = args.ledger and is_recorded(name, args.ledger)
            finished = recorded or os.path.exists(os.path.join(run_dir, "metrics.json"))
            if not recorded:
                train(config)
                if args.ledger:
                    record(run_dir, args.ledger)
            skipped += finished
            done += 1
            progress.update(done, values=[("skipped", skipped)], finalize=False)
    print(f"\n{done} runs in grid {args.grid} ({skipped} already finished) under {args.runs_dir}")


if __name__ == "__main__":
    main()
