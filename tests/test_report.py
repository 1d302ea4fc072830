import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_run(runs, name, backbone, loss, top1, mAP):
    os.makedirs(runs / name)
    config = {"backbone": backbone, "loss": loss, "dataset": "/data/cifar10-jpeg", "epochs": 3,
              "limit_train": 5000, "batch_size": 128, "optimizer": "sgd",
              "learning_rate": 0.05, "validation_freq": 3, "scale": 16.0, "margin": 0.2,
              "fallback": "monotonic", "ce_weight": 0.0, "head_scale": 16.0,
              "train_size": 5000}
    metrics = {"top1": top1, "top5": 0.9, "mAP": mAP, "epochs": 3, "wall_seconds": 100.0,
               "train_images_per_second": 50.0, "train_accuracy_last_epoch": 0.4}
    (runs / name / "config.json").write_text(json.dumps(config))
    (runs / name / "metrics.json").write_text(json.dumps(metrics))


def test_report_copies_the_metrics_files(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a", "resnet18", "softmax", 0.41234, 0.43219)
    fake_run(runs, "b", "resnet18", "arcface", 0.38765, 0.40001)
    os.makedirs(runs / "unfinished")
    out = tmp_path / "results.md"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "report.py"),
                             "--runs-dir", str(runs), "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "| a | resnet18 | softmax | - | - | - | 5000 | 3 | 41.23 | 43.22 |" in text
    assert "| b | resnet18 | arcface | 16.0 | 0.2 | monotonic | 5000 | 3 | 38.77 | 40.00 |" in text
    assert "| paper: cross-entropy | 65.2 | 84.66 | 59.01 |" in text
    assert "| ours: softmax | 43.22 | not run | not run |" in text
    assert "--backbone resnet18 --loss arcface --dataset /data/cifar10-jpeg --epochs 3" in text
    assert "unfinished" not in text
