import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
from synthetic import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("shapes"), num_classes=3, per_class=32,
                              test_per_class=8)


def tiny_args(shapes, runs, *extra):
    return [sys.executable, RUN, "--backbone", "tinycnn", "--dataset", shapes, "--epochs", "2",
            "--batch-size", "16", "--embedding-dim", "0", "--projector-samples", "0",
            "--export", "none", "--runs-dir", str(runs), "--name", "r", *extra]


def test_seed_and_deterministic_give_bit_identical_metrics(shapes, tmp_path):
    results = []
    for i in range(2):
        runs = tmp_path / str(i)
        done = subprocess.run(tiny_args(shapes, runs, "--seed", "7", "--deterministic"),
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "CI": "1"})
        assert done.returncode == 0, done.stderr[-2000:]
        metrics = json.loads((runs / "r" / "metrics.json").read_text())
        log = (runs / "r" / "log.csv").read_text()
        results.append(({k: metrics[k] for k in ("top1", "top5", "mAP")}, log))
    assert results[0][0] == results[1][0]
    assert results[0][1] == results[1][1]  # every logged loss and metric, to the last digit


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.xfail(strict=True, reason=(
    "Keras 3 model.fit cannot consume MultiWorkerMirroredStrategy's distributed dataset "
    "('Attempt to convert a value ... PerReplica'), keras-team/keras#20585; strict, so this "
    "test fails loudly once an upgrade fixes it"))
def test_multiworker_two_processes_end_with_identical_weights(shapes, tmp_path):
    workers = [f"127.0.0.1:{port}" for port in free_ports(2)]
    processes = []
    for index in range(2):
        tf_config = {"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}}
        env = {**os.environ, "CI": "1", "TF_CONFIG": json.dumps(tf_config)}
        processes.append(subprocess.Popen(
            tiny_args(shapes, tmp_path / f"worker{index}", "--strategy", "multiworker",
                      "--augment", "none"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
    outputs = [p.communicate(timeout=600) for p in processes]
    for p, (_, err) in zip(processes, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    configs = [json.loads((tmp_path / f"worker{i}" / "r" / "config.json").read_text())
               for i in range(2)]
    assert [c["replicas"] for c in configs] == [2, 2]
    assert [c["global_batch"] for c in configs] == [32, 32]
    import keras

    probe = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    models = [keras.saving.load_model(tmp_path / f"worker{i}" / "r" / "inference.keras")
              for i in range(2)]
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(models[0].predict(probe, verbose=0),
                                  models[1].predict(probe, verbose=0))


def test_sigkill_mid_epoch_then_same_command_resumes(shapes, tmp_path):
    import signal

    args = tiny_args(shapes, tmp_path, "--seed", "1")
    args[args.index("--epochs") + 1] = "3"
    env = {**os.environ, "CI": "1", "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                             env=env)
    seen = []
    for line in first.stdout:  # epoch 1 is backed up once "Epoch 2/3" starts
        seen.append(line)
        if line.startswith("Epoch 2/3"):
            first.send_signal(signal.SIGKILL)
            break
    first.wait(timeout=120)
    assert first.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    run_dir = tmp_path / "r"
    assert (run_dir / "backup").is_dir() and not (run_dir / "metrics.json").exists()

    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "Epoch 1/3" not in second.stdout and "Epoch 2/3" in second.stdout
    epochs = [line.split(",")[0] for line in (run_dir / "log.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["test_size"] == 24


def broken_jpeg(root):
    path = write_image_folder(root, num_classes=2, per_class=4, fmt="jpg")
    bad = os.path.join(path, "class_0", "0001.jpg")
    with open(bad, "r+b") as f:
        f.truncate(40)
    return path, "0001.jpg' is corrupt, truncated or not an image"


def one_class(root):
    return write_image_folder(root, num_classes=1, per_class=4), "needs at least 2"


def empty(root):
    os.makedirs(root)
    return str(root), "has 0 class folder(s)"


def unknown_name(root):
    return "cifar11", "Unknown dataset 'cifar11': not a TFDS name and not a folder"


@pytest.mark.parametrize("make", [broken_jpeg, one_class, empty, unknown_name])
def test_bad_data_is_one_line_and_leaves_nothing(make, tmp_path):
    dataset, message = make(tmp_path / "data")
    runs, exports = tmp_path / "runs", tmp_path / "exports"
    result = subprocess.run(
        [sys.executable, RUN, "--backbone", "tinycnn", "--dataset", dataset, "--runs-dir",
         str(runs), "--export-dir", str(exports)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not runs.exists() and not exports.exists()
