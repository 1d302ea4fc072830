"""Run a named grid of runs through the same code path as run.py.

    python experiments/sweep.py table1 --dataset path/to/cifar10 --epochs 3 --limit-train 5000
    python experiments/sweep.py many-classes --dataset /tmp/glyphs200 --backbones tinycnn

Finished runs are skipped, so a sweep can be stopped and restarted. A run's
directory name ends in a hash of its whole configuration, so a sweep with other
settings (say --learning-rate) trains new runs instead of reporting old ones.
"""

import os

from tfmargin.cli import OneLineParser, exit_with

BACKBONES = ("resnet18", "efficientnetb0", "mobilenetv2")
PAPER_HEAD = dict(loss="arcface", scale=1.0, margin=0.1, fallback="none")
OUR_HEAD = dict(loss="arcface")  # the registry's defaults: s = 16, m = 0.5
FIGURE2_MARGINS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


def grid(name, backbones=None, margins=FIGURE2_MARGINS, scales=(1.0, 16.0)):
    """The settings (dicts of RunConfig fields) of a named grid."""
    heads = (dict(loss="softmax"), PAPER_HEAD, OUR_HEAD)
    if name in ("table1", "table2"):
        dataset = {"table1": "cifar10", "table2": "cifar100"}[name]
        return [dict(backbone=b, dataset=dataset, **h) for b in backbones or BACKBONES
                for h in heads]
    if name == "figure2":
        return [dict(backbone=b, loss="arcface", margin=m, fallback=f, scale=s,
                     dataset="cifar10")
                for b in backbones or ("efficientnetb0", "mobilenetv2")
                for f in ("monotonic", "none") for s in scales for m in margins]
    if name == "many-classes":  # the paper's s=1 against scale="auto", each with the CE mix
        heads = tuple(dict(loss="arcface", scale=s, margin=0.1, ce_weight=ce)
                      for s in (1.0, "auto") for ce in (0.0, 0.5)) + (dict(loss="softmax"),)
        return [dict(backbone=b, **h) for b in backbones or ("resnet18",) for h in heads]
    raise ValueError(f"unknown grid {name!r}; choose one of {', '.join(GRIDS)}")


GRIDS = ("table1", "table2", "figure2", "many-classes")


def main(argv=None):
    parser = OneLineParser(description=__doc__)
    parser.add_argument("grid", choices=GRIDS, help="which grid to run")
    parser.add_argument("--dataset", help="override the grid's dataset (a TFDS name or folder)")
    parser.add_argument("--epochs", type=int, default=30, help="epochs per run")
    parser.add_argument("--limit-train", type=int, default=0, help="training images per run")
    parser.add_argument("--batch-size", type=int, default=128, help="per-replica batch size")
    parser.add_argument("--learning-rate", type=float, default=None,
                        help="peak learning rate per 128 images (default: run.py's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of every run")
    parser.add_argument("--backbones", help="comma-separated backbones instead of the grid's")
    parser.add_argument("--margins", help="figure2: comma-separated margins instead of "
                        + ",".join(map(str, FIGURE2_MARGINS)))
    parser.add_argument("--scales", help="figure2: comma-separated scales instead of 1,16")
    parser.add_argument("--runs-dir", default="runs", help="where run directories go")
    parser.add_argument("--export", default="none", help="exports per run (as run.py)")
    args = parser.parse_args(argv)

    import keras

    from tfmargin.train import RunConfig, train

    common = dict(epochs=args.epochs, limit_train=args.limit_train, batch_size=args.batch_size,
                  runs_dir=args.runs_dir, export=args.export, validation_freq=args.epochs,
                  seed=args.seed)
    if args.learning_rate is not None:
        common["learning_rate"] = args.learning_rate

    if args.grid == "many-classes" and not args.dataset:
        parser.error("many-classes needs --dataset: a folder with hundreds of classes, e.g. "
                     "from python experiments/make_glyphs.py /tmp/glyphs200")
    margins = tuple(float(m) for m in args.margins.split(",")) if args.margins \
        else FIGURE2_MARGINS
    scales = tuple(float(v) for v in args.scales.split(",")) if args.scales else (1.0, 16.0)
    settings = grid(args.grid, args.backbones.split(",") if args.backbones else None, margins,
                    scales)
    configs = []
    for setting in settings:
        if args.dataset:
            setting = {**setting, "dataset": args.dataset}
        configs.append(RunConfig(**setting, **common))
    progress = keras.utils.Progbar(len(configs), unit_name="run")
    done = skipped = 0
    with exit_with(parser):
        for config in configs:
            finished = os.path.exists(os.path.join(args.runs_dir, config.run_name(),
                                                   "metrics.json"))
            train(config, resume=True)
            skipped += finished
            done += 1
            progress.update(done, values=[("skipped", skipped)], finalize=False)
    print(f"\n{done} runs in grid {args.grid} ({skipped} already finished) under {args.runs_dir}")


if __name__ == "__main__":
    main()
