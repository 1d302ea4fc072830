"""The ledger: a run recorded whole or not at all, with nothing of the machine that ran it
but its description."""

import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))


def test_a_run_timed_beside_other_work_says_so_when_it_ends():
    from run import shared_note

    assert shared_note({"cpu_share_of_other_processes": 0.453}) == (
        " (other processes used 45 % of the CPU meanwhile)")
    assert shared_note({"cpu_share_of_other_processes": 0.02}) == ""
    assert shared_note({}) == ""  # recorded before the measure: nothing claimed


def test_a_run_is_recorded_whole_or_not_at_all(tmp_path, monkeypatch):
    """A crash while the ledger copies a run leaves nothing the ledger counts as recorded,
    so the next ``record`` copies the run again, whole."""
    import shutil

    import ledger

    run = tmp_path / "runs" / "a-run"
    run.mkdir(parents=True)
    for file in ledger.LEDGER_FILES:
        (run / file).write_text(file)
    copy = shutil.copy2

    def crash_after_metrics(source, target):
        copy(source, target)
        if source.endswith("metrics.json"):
            raise OSError("disk full")

    monkeypatch.setattr(shutil, "copy2", crash_after_metrics)
    with pytest.raises(OSError, match="disk full"):
        ledger.record(str(run), str(tmp_path / "ledger"))
    assert not ledger.is_recorded("a-run", str(tmp_path / "ledger"))
    monkeypatch.setattr(shutil, "copy2", copy)
    assert ledger.record(str(run), str(tmp_path / "ledger"))
    assert sorted(os.listdir(tmp_path / "ledger" / "a-run")) == sorted(ledger.LEDGER_FILES)


def test_no_ledger_record_names_a_path_of_the_machine_that_ran_it():
    """The dataset as typed and its fingerprint are a run's data provenance; an absolute
    path of some machine (config.json's old ``data_source``) is not."""
    ledger = os.path.join(ROOT, "results", "runs")
    for name in os.listdir(ledger):
        with open(os.path.join(ledger, name, "config.json")) as f:
            config = json.load(f)
        assert "data_source" not in config, name
        assert not os.path.isabs(config["dataset"]) or config["dataset"].startswith("tfds"), name


def test_a_sweep_given_the_ledgers_data_under_another_path_is_refused(tmp_path):
    """A run's name hashes ``--dataset`` as typed: the same folder under another path would
    name every recorded run anew and train it again, so the sweep and the studies refuse it
    and name the ledger's path. A path the ledger used, or other data, is let through."""
    import subprocess

    from ledger import dataset_path_mismatch

    ledger = tmp_path / "ledger"
    (ledger / "a-run").mkdir(parents=True)
    (ledger / "a-run" / "config.json").write_text(
        json.dumps({"dataset": "../shared/datasets/cifar10-jpeg"}))
    assert dataset_path_mismatch("/work/shared/datasets/cifar10-jpeg", str(ledger)) == (
        "the ledger's cifar10-jpeg runs were trained with --dataset "
        "../shared/datasets/cifar10-jpeg, not /work/shared/datasets/cifar10-jpeg: a run's name "
        "holds the path as typed, so each would train again; pass that path (from the "
        "repository root)")
    assert dataset_path_mismatch("../shared/datasets/cifar10-jpeg", str(ledger)) is None
    assert dataset_path_mismatch("data/glyphs", str(ledger)) is None
    assert dataset_path_mismatch("data/cifar10-jpeg", str(tmp_path / "empty")) is None
    for script in ("sweep.py", "studies.py"):
        argv = ["heads", "--dry-run"] if script == "sweep.py" else []
        refused = subprocess.run(
            [sys.executable, os.path.join(ROOT, "experiments", script), *argv, "--dataset",
             "data/cifar10-jpeg", "--ledger", str(ledger)], capture_output=True, text=True,
            timeout=300)
        assert refused.returncode == 2, script
        assert refused.stderr.splitlines()[-1] == (
            f"{script}: error: the ledger's cifar10-jpeg runs were trained with --dataset "
            "../shared/datasets/cifar10-jpeg, not data/cifar10-jpeg: a run's name holds the "
            "path as typed, so each would train again; pass that path (from the repository "
            "root)")
