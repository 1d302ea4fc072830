import dataclasses
import json
import os
import shutil
import signal
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
            "--export", "none", "--far-ood", "none", "--runs-dir", str(runs), "--name", "r",
            *extra]


@pytest.mark.slow
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


@pytest.mark.slow
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
    metrics = [json.loads((tmp_path / f"worker{i}" / "r" / "metrics.json").read_text())
               for i in range(2)]
    assert metrics[0]["top1"] == metrics[1]["top1"] and metrics[0]["test_size"] == 24
    import tfmargin

    probe = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    models = [tfmargin.load_model(tmp_path / f"worker{i}" / "r" / "inference.keras")
              for i in range(2)]
    for a, b in zip(models[0].weights, models[1].weights, strict=True):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_array_equal(models[0].predict(probe, verbose=0),
                                  models[1].predict(probe, verbose=0))


@pytest.mark.slow
@pytest.mark.parametrize("torn_backup", [False, True])
def test_sigkill_mid_epoch_then_same_command_resumes(shapes, tmp_path, torn_backup):
    args = tiny_args(shapes, tmp_path, "--seed", "1")
    args[args.index("--epochs") + 1] = "3"
    env = {**os.environ, "CI": "1", "PYTHONUNBUFFERED": "1"}
    kill_at_epoch(args, 3, env)  # epochs 1 and 2 are backed up once "Epoch 3/3" starts
    run_dir = tmp_path / "r"
    backup = run_dir / "backup"
    assert backup.is_dir() and not (run_dir / "metrics.json").exists()
    if torn_backup:  # as if the kill had hit the write of epoch 2's backup
        with open(backup / "latest.weights.h5", "r+b") as f:
            f.truncate(100)

    second = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert second.returncode == 0, second.stderr[-2000:]
    resumed_at = 2 if torn_backup else 3  # the previous backup is epoch 1's
    started = [line.split()[1] for line in second.stdout.splitlines()
               if line.startswith("Epoch ")]
    assert started[0] == f"{resumed_at}/3", second.stdout[-2000:]
    epochs = [line.split(",")[0] for line in (run_dir / "log.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1"] + ["1"] * torn_backup + ["2"]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 3 and metrics["test_size"] == 24
    assert metrics["resumed_at_epoch"] == resumed_at - 1  # its wall time covers the rest
    # A finished run keeps no training checkpoint: inference.keras (--export none) holds it.
    assert not (run_dir / "checkpoints").exists() and (run_dir / "inference.keras").exists()


def test_a_run_killed_while_it_evaluates_is_evaluated_again_not_trained_again(
        shapes, tmp_path, monkeypatch):
    """Keras's BackupAndRestore deletes its backup when fit returns; the weights fit ended
    with are kept until metrics.json is written, so the same command only evaluates."""
    from tfmargin.runner import train as train_module
    from tfmargin.runner.config import RunConfig

    config = RunConfig(backbone="tinycnn", dataset=shapes, epochs=2, batch_size=16,
                       embedding_dim=0, projector_samples=0, export="none", seed=3,
                       deterministic=True, runs_dir=str(tmp_path), name="r")
    evaluate = train_module.evaluate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        train_module.train(config)
    run_dir = tmp_path / "r"
    fitted = json.loads((run_dir / train_module.FIT_RECORD).read_text())
    assert len(fitted["history"]["loss"]) == 2 and fitted["timing"]["resumed_at_epoch"] == 0
    assert (run_dir / train_module.TRAINED_WEIGHTS).exists()
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "backup").exists()

    def trains_again(*args, **kwargs):
        raise AssertionError("fit ran again")

    monkeypatch.setattr(train_module, "evaluate", evaluate)
    monkeypatch.setattr(train_module, "fit", trains_again)
    metrics = train_module.train(config)
    assert metrics["epochs"] == 2 and metrics["test_size"] == 24
    assert metrics["wall_seconds"] == fitted["timing"]["wall_seconds"]
    assert metrics["train_accuracy_last_epoch"] == fitted["history"]["accuracy"][-1]
    assert len((run_dir / "log.csv").read_text().splitlines()) == 3  # a header and 2 epochs
    assert not (run_dir / train_module.TRAINED_WEIGHTS).exists()  # the export has it
    # The evaluated weights are the ones fit ended with: as a run never interrupted.
    monkeypatch.undo()
    whole = train_module.train(dataclasses.replace(config, runs_dir=str(tmp_path / "w")))
    assert {k: whole[k] for k in ("top1", "mAP", "map_at_r")} == {
        k: metrics[k] for k in ("top1", "mAP", "map_at_r")}


def without_root_override():
    """In the child: drop the capabilities that let root write through permission bits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_runs_dir_is_refused_before_training(tmp_path):
    data = write_image_folder(tmp_path / "data", num_classes=2, per_class=4)
    read_only = tmp_path / "read-only"
    read_only.mkdir(mode=0o555)
    read_only.chmod(0o555)
    result = subprocess.run(
        [sys.executable, RUN, "--backbone", "tinycnn", "--dataset", data, "--runs-dir",
         str(read_only / "runs"), "--export", "none"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "CI": "1"},
        preexec_fn=without_root_override if os.geteuid() == 0 else None)
    errors = [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]
    assert result.returncode == 1, result.stderr[-2000:]
    assert len(errors) == 1, result.stderr[-2000:]
    assert f"cannot write under {str(read_only)!r} (Permission denied)" in errors[0]
    assert "pass a writable folder to --runs-dir" in errors[0]
    assert os.listdir(read_only) == []


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


def classes_beyond_train(root):
    path = write_image_folder(root, num_classes=2, per_class=4, test_per_class=2)
    shutil.copytree(os.path.join(path, "test", "class_0"), os.path.join(path, "test", "extra"))
    return path, "has classes missing from train/: extra"


def fewer_images_than_a_batch(root):
    return write_image_folder(root, num_classes=2, per_class=4), \
        "fewer than one global batch of 128; lower --batch-size"


def unknown_name(root):
    return "cifar11", "Unknown dataset 'cifar11': not a TFDS name and not a folder"


@pytest.mark.parametrize("make", [broken_jpeg, one_class, empty, classes_beyond_train,
                                  fewer_images_than_a_batch, unknown_name])
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


def kill_at_epoch(args, epoch, env):
    """Start ``args`` and SIGKILL it as soon as it prints ``Epoch <epoch>/``."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True, env=env)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(f"Epoch {epoch}/"):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=120)
    assert process.returncode == -signal.SIGKILL, "".join(seen)[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("recipe_args", [
    ("--augment", "none"),  # Keras' random layers restart their generators on resume
    ("--recipe", "airbench", "--backbone", "airbench93", "--batch-size", "16",
     "--export", "none"),  # stateless augmentation; lookahead state carried over
], ids=["standard", "airbench"])
def test_killed_and_resumed_run_equals_an_uninterrupted_one(shapes, tmp_path, recipe_args):
    """Same data order, augmentation, lookahead and weights after a resume: the resumed
    epoch 3 sees epoch 3's permutation, not epoch 1's."""
    env = {**os.environ, "CI": "1", "PYTHONUNBUFFERED": "1"}
    results = []
    for name, interrupted in (("whole", False), ("resumed", True)):
        args = tiny_args(shapes, tmp_path / name, "--seed", "3", "--deterministic",
                         *recipe_args)
        args[args.index("--epochs") + 1] = "3"
        if interrupted:
            kill_at_epoch(args, 3, env)
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        if interrupted:
            assert "Epoch 3/3" in done.stdout and "Epoch 1/3" not in done.stdout
        metrics = json.loads((tmp_path / name / "r" / "metrics.json").read_text())
        log = (tmp_path / name / "r" / "log.csv").read_text().splitlines()
        results.append(({k: metrics[k] for k in ("top1", "mAP", "map_at_r")}, log[-1]))
    assert results[0] == results[1]  # metrics and the last epoch's logged loss, exactly


@pytest.mark.slow
def test_ctrl_c_is_one_line_and_an_open_set_run_resumes_at_its_next_epoch(shapes, tmp_path):
    """Ctrl-C mid-run: one line saying the same command continues, exit 130; the same
    command (classes typed in no particular order) says so and resumes at the epoch it
    stopped in."""
    env = {**os.environ, "CI": "1", "PYTHONUNBUFFERED": "1"}
    args = tiny_args(shapes, tmp_path, "--classes", "class_2,class_0")
    args[args.index("--epochs") + 1] = "3"
    # A run's Ctrl-C as in a terminal, however the tests were started (a shell's background
    # job ignores SIGINT, and a child started so would inherit that).
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                         signal.SIG_DFL))
    for line in process.stdout:
        if line.startswith("Epoch 2/"):
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines() == [
        "run.py: error: interrupted; the same command continues the run from its last "
        "finished epoch"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"continuing the interrupted run in {tmp_path / 'r'}" in done.stdout
    assert "resuming at epoch 2 " in done.stdout and "Epoch 1/3" not in done.stdout
