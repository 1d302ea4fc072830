"""Train one model: ``python experiments/run.py --backbone mobilenetv2 --loss arcface``.

The paper's setting: ``--loss arcface --scale 1 --margin 0.1 --fallback none``.
A first run in about a minute, on a generated image folder:
``python experiments/first_run.py``.
"""

import dataclasses
import os

from tfmargin.runner.cli import (
    OneLineParser,
    add_run_arguments,
    config_from_args,
    exit_with,
    parse_run_args,
)
from tfmargin.runner.provenance import timed_on_shared_machine


def batchnorm_line(batchnorm):
    """Which BatchNorm statistics the reported numbers use, and why."""
    if batchnorm["chosen_on"] is None:
        return (f"BatchNorm statistics recalibrated over {batchnorm['recalibration_batches']} "
                "training batches (no validation split to choose on)")
    val = batchnorm["val_top1"]
    line = (f"BatchNorm statistics: {batchnorm['chosen']} (validation top-1 "
            f"{100 * val['moving']:.2f} % with the moving averages, "
            f"{100 * val['recalibrated']:.2f} % recalibrated over "
            f"{batchnorm['recalibration_batches']} training batches)")
    if batchnorm["chosen"] == "recalibrated":
        line += ("; the val_accuracy printed per epoch used the moving averages, which lag "
                 "behind after short runs")
    return line


def shared_note(metrics):
    """`` (other processes used 45 % of the CPU meanwhile)`` where they used a tenth or more
    of it, so a time measured beside other work is not read as the command's speed."""
    if not timed_on_shared_machine(metrics):
        return ""
    share = metrics["cpu_share_of_other_processes"]
    return f" (other processes used {100 * share:.0f} % of the CPU meanwhile)"


def summary(config, metrics):
    """What the run reached, where it wrote, and what to type next."""
    run_dir = os.path.join(config.runs_dir, config.run_name())
    tta = f" ({100 * metrics['tta']['top1']:.2f} % with TTA)" if "tta" in metrics else ""
    lines = [f"{config.run_name()}: test top-1 {100 * metrics['top1']:.2f} %{tta}, mAP "
             f"{100 * metrics['mAP']:.2f} %, P@1 {100 * metrics['precision_at_1']:.2f} %, "
             f"MAP@R {100 * metrics['map_at_r']:.2f} %, training "
             f"{metrics['wall_seconds'] / 60:.1f} min{shared_note(metrics)}",
             f"  run directory: {run_dir} (config.json, metrics.json, log.csv, logs/)"]
    if "export" in metrics:
        lines.append(f"  export: {metrics['export']} (" + ", ".join(config.export_formats())
                     + f"; also {os.path.join(config.export_dir, 'latest')})")
    if "batchnorm" in metrics:
        lines.append("  " + batchnorm_line(metrics["batchnorm"]))
    if "reject" in metrics:
        reject = metrics["reject"]
        unknown = (f"; it rejects {100 * reject['unknown_rejected']:.1f} % of the held-out "
                   "classes' test images" if "unknown_rejected" in reject else "")
        lines.append(f"  reject option: {reject['score']} ({reject['chosen_by']}) below "
                     f"{reject['threshold']:.4g}, the value that keeps "
                     f"{100 * reject['keep']:.0f} % of the validation images{unknown}")
        far = metrics.get("far_ood", {})
        if far:
            lines.append("  images of no known class it rejects: " + ", ".join(
                f"{name} {100 * entry['rejected']:.0f} %" for name, entry in far.items()))
    elif config.export_formats():
        lines.append("  note: no validation split (--val-split 0): the export serves "
                     "probabilities at temperature 1 and cannot reject unknown images")
    calibration = metrics.get("calibration", {})
    if calibration.get("temperature_at_bound"):
        lines.append(f"  note: the temperature fit stopped at its bound "
                     f"({calibration['temperature']:.3g}): every validation image is classified "
                     "with a clear margin, so the served probabilities are near 0 or 1 and say "
                     "little beyond the class; a harder or larger validation split calibrates")
    lines += ["next:", f"  tensorboard --logdir {os.path.join(run_dir, 'logs')}"]
    if "savedmodel" in config.export_formats():
        lines.append(f"  python experiments/predict.py {metrics['export']} IMAGE.jpg ...")
    return "\n".join(lines)


def main(argv=None):
    parser = OneLineParser(description=__doc__)
    add_run_arguments(parser)
    args = parse_run_args(parser, argv)
    config = config_from_args(parser, args)
    from tfmargin.quiet import import_tensorflow

    import_tensorflow()
    with exit_with(parser):
        from tfmargin.runner.train import train

        metrics = train(config, overwrite=args.overwrite)
        print(summary(config, metrics))
    return dataclasses.asdict(config)


if __name__ == "__main__":
    main()
