"""Fake ledger runs for the report's tests: a run's config.json and metrics.json written
as a finished run leaves them, and the report run on them as the command line runs it."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


README_TEMPLATE = "".join(f"<!-- results:{name} -->\n<!-- /results:{name} -->\n"
                          for name in ("headline", "main-command", "open-set", "paper"))


def fake_run(runs, name, backbone, loss, top1, mAP, **changes):
    os.makedirs(runs / name)
    config = {"backbone": backbone, "loss": loss, "dataset": "data/cifar10-jpeg", "epochs": 3,
              "limit_train": 5000, "batch_size": 128, "optimizer": "sgd", "seed": 0,
              "learning_rate": 0.025 if loss == "softmax" else 0.05, "validation_freq": 3,
              "scale": None if loss == "softmax" else 16.0,
              "margin": None if loss == "softmax" else 0.2, "fallback": "monotonic",
              "ce_weight": 0.0, "head_scale": 16.0, "train_size": 5000,
              "label_smoothing": 0.0, "batchnorm": "fused", "mixed_precision": False} | changes
    metrics = {"top1": top1, "top5": 0.9, "mAP": mAP, "precision_at_1": 0.3,
               "map_at_r": 0.125, "val": {"top1": 0.5, "mAP": 0.5, "precision_at_1": 0.5,
                                          "map_at_r": 0.5}, "epochs": 3, "wall_seconds": 100.0,
               "train_images_per_second": 50.0, "train_accuracy_last_epoch": 0.4,
               "finished_at": "2026-12-01T10:20:30Z"}
    (runs / name / "config.json").write_text(json.dumps(config))
    (runs / name / "metrics.json").write_text(json.dumps(metrics))


def write_report(runs, output, *extra):
    """Run experiments/report.py on the ledger ``runs`` as the command line does, with a
    README of empty results blocks beside ``output``; the Markdown it wrote."""
    readme = output.parent / "README.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    if not readme.exists():
        readme.write_text(README_TEMPLATE)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                             "--ledger", str(runs), "--output", str(output), "--readme",
                             str(readme), *extra], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return output.read_text()


def update_metrics(runs, name, **changes):
    """Change a fake run's metrics.json (keys given None are removed)."""
    metrics = json.loads((runs / name / "metrics.json").read_text()) | changes
    metrics = {k: v for k, v in metrics.items() if v is not None}
    (runs / name / "metrics.json").write_text(json.dumps(metrics))


def seed_run(name, loss, seed, top1, tta_top1, map_at_r=0.8):
    config = {"backbone": "airbench94", "loss": loss, "dataset": "data/cifar10-jpeg/",
              "recipe": "airbench", "train_size": 50000, "epochs": 10, "seed": seed,
              "margin": None if loss == "softmax" else 0.3, "head_scale": 8.0,
              "fallback": "monotonic", "ce_weight": 0.0, "label_smoothing": 0.2,
              "learning_rate": 0.1875, "weight_decay": 0.0153 / 11.5, "optimizer": "sgd",
              "scale": None if loss == "softmax" else 8.0}
    metrics = {"top1": top1, "tta": {"top1": tta_top1}, "mAP": 0.9, "precision_at_1": 0.9,
               "map_at_r": map_at_r, "wall_seconds": 1800.0}
    from tables import complete

    return {"name": name, "config": complete(config | {"mixed_precision": False}),
            "metrics": metrics}
