"""Train one model: ``python experiments/run.py --backbone mobilenetv2 --loss arcface``.

The paper's setting: ``--loss arcface --scale 1 --margin 0.1 --fallback none``.
"""

import dataclasses
import os

from tfmargin.cli import (
    OneLineParser,
    add_run_arguments,
    config_from_args,
    exit_with,
    parse_run_args,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = OneLineParser(description=__doc__)
    add_run_arguments(parser)
    args = parse_run_args(parser, argv)
    config = config_from_args(parser, args)
    with exit_with(parser):
        from tfmargin.train import train

        metrics = train(config, resume=args.resume, overwrite=args.overwrite)
        print(f"{config.run_name()}: " + ", ".join(
            f"{k} {metrics[k]:.4f}" for k in ("top1", "top5", "mAP", "precision_at_1",
                                               "map_at_r")))
    return dataclasses.asdict(config)


if __name__ == "__main__":
    main()
