"""Figure 2's sweep: the runs it trains and skips, what counts as a failed run, the table of
angles and where training failed, and a sweep that goes on past a diverged run."""

import os
import subprocess
import sys

import pytest
from fake_runs import ROOT, fake_run, update_metrics, write_report


@pytest.mark.slow
def test_sweep_runs_skips_finished_and_reports_a_figure(tmp_path):
    from ledger import collect
    from synthetic import write_image_folder

    data = write_image_folder(tmp_path / "shapes", num_classes=3, per_class=16, test_per_class=6)
    runs = tmp_path / "runs"
    sweep = [sys.executable, os.path.join(ROOT, "experiments", "sweep.py"), "figure2",
             "--dataset", data, "--backbones", "tinycnn", "--margins", "0.1,2.0", "--scales", "16",
             "--far-ood", "none",
             "--epochs",
             "1", "--batch-size", "16", "--runs-dir", str(runs)]
    env = {**os.environ, "CI": "1"}
    recorded = tmp_path / "recorded"
    first = subprocess.run(sweep + ["--ledger", str(recorded)], capture_output=True, text=True,
                           timeout=900, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    assert len(os.listdir(runs)) == 4  # 2 margins x 2 fallbacks
    assert sorted(os.listdir(recorded)) == sorted(os.listdir(runs))  # recorded as they finish
    assert "4 runs in grid figure2 (0 already finished)" in first.stdout
    again = subprocess.run(sweep, capture_output=True, text=True, timeout=900, env=env)
    assert "4 runs in grid figure2 (4 already finished)" in again.stdout
    assert "Epoch 1/1" not in again.stdout

    ledger = tmp_path / "ledger"
    assert len(collect(str(runs), str(ledger))) == 4
    assert sorted(os.listdir(ledger / sorted(os.listdir(ledger))[0])) == [
        "config.json", "log.csv", "metrics.json", "test_predictions.npz"]
    assert collect(str(runs), str(ledger)) == []  # already there
    # On a machine without runs/, a sweep given the ledger trains nothing it records.
    elsewhere = sweep[:sweep.index("--runs-dir")] + ["--runs-dir", str(tmp_path / "new"),
                                                     "--ledger", str(ledger)]
    third = subprocess.run(elsewhere, capture_output=True, text=True, timeout=900, env=env)
    assert "4 runs in grid figure2 (4 already finished)" in third.stdout, third.stderr[-2000:]
    assert not (tmp_path / "new").exists()
    text = write_report(ledger, tmp_path / "docs" / "results.md")
    png = tmp_path / "docs" / "figure2.png"
    assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    assert "![mAP and top-1 against m](figure2.png)" in text
    # Each run: a row of the runs table and its command.
    assert text.count("| shapes-tinycnn-arcface-") == text.count("- `shapes-tinycnn-arcface-") == 4


def test_figure2_marks_failed_runs_and_shows_where_the_angles_went(tmp_path):
    """A run fails at chance top-1 or when its training loss did not fall (log.csv); the
    table shows each point's top-1 and its mean target angle over the first and last epoch."""
    import sweep
    from margin_sweep import failed, failure, sweep_table, training_log

    runs = tmp_path / "runs"
    logs = {"m01": ("0,2.9,88.0\n1,2.4,80.5\n", 0.40), "m2": ("0,2.9,90.0\n1,3.1,120.0\n", 0.20),
            "m3": ("0,2.9,89.0\n1,2.8,150.0\n", 0.14)}
    for name, (rows, top1) in logs.items():
        fake_run(runs, name, "mobilenetv2", "arcface", top1, 0.3, fallback="none",
                 margin=float(name[1:].replace("01", "0.1")), scale=8.0, head_scale=8.0,
                 epochs=2, validation_freq=2)
        update_metrics(runs, name, epochs=2)
        (runs / name / "log.csv").write_text("epoch,loss,theta_y_mean\n" + rows)
    # The monotonic fallback trains at m = 3; its point there is the mean of two seeds.
    for name, margin, seed in (("f01", 0.1, 0), ("f3", 3.0, 0), ("f3s1", 3.0, 1)):
        fake_run(runs, name, "mobilenetv2", "arcface", 0.4, 0.3, margin=margin, scale=8.0,
                 head_scale=8.0, epochs=2, validation_freq=2, seed=seed)
        update_metrics(runs, name, epochs=2)
        (runs / name / "log.csv").write_text("epoch,loss,theta_y_mean\n0,2.9,88.0\n1,2.4,79.0\n")
    # The noise gauge: at m = 0.1 both runs ended with every test image below 180° - m, where
    # the two fallbacks give the same logit; at m = 3 they did not (and m = 2 has no pair).
    import numpy as np

    update_metrics(runs, "f01", top1=0.425)
    update_metrics(runs, "f3s1", top1=0.45)
    for name, largest in (("m01", 120.0), ("f01", 100.0), ("m3", 150.0), ("f3", 80.0)):
        np.savez(runs / name / "test_predictions.npz",
                 target_angle_deg=np.array([60.0, largest], np.float32))
    from tables import load_runs

    loaded = {r["name"]: r for r in load_runs(str(runs))}
    log = training_log(loaded["m2"], str(runs))
    assert log == {"epoch": [0.0, 1.0], "loss": [2.9, 3.1], "theta_y_mean": [90.0, 120.0]}
    assert failure(loaded["m2"], log) == "loss"  # it rose
    assert failure(loaded["m3"], {}) == "chance"  # top-1 within 1.5 x chance
    assert not failed(loaded["m01"], training_log(loaded["m01"], str(runs)))
    table = sweep_table(list(loaded.values()), str(runs))
    assert ("| mobilenetv2 | 5,000 × 2 | none | 8 | 40.0 (88° → 80°) | 20.0 (90° → 120°) ✗ | "
            "14.0 (89° → 150°) ✗ |") in table
    assert ("| mobilenetv2 | 5,000 × 2 | monotonic | 8 | 42.5 (88° → 79°) |  | 42.5 (88° → 79°) "
            "|") in table
    assert ("where no test image of either run ended past it, seed-paired runs of the two "
            "differ by 2.5–2.5 points of test top-1 (mean 2.5, 1 pair), a gauge of one point's "
            "noise.") in table
    assert ("Over the first epoch the training images sat at 88°–90° from their own class "
            "centre") in table
    from margin_sweep import sweep_verdict

    assert sweep_verdict(list(loaded.values()), str(runs)) == (
        "On mobilenetv2 at 5,000 training images × 2 epochs, with the raw margin (the paper's "
        "formula) training ends at chance at m = 3 and does not lower its loss at m = 2 "
        "(s = 8); with the monotonic fallback training succeeds at every margin (s = 8).")
    assert sweep_verdict([], str(runs)) == "not run yet."
    # A failure that a larger margin recovers from is named alone, not "from m on".
    from margin_sweep import failure_phrase

    assert failure_phrase([0.1, 1.5, 2.0], {"chance": [1.5, 2.0], "loss": []}) == (
        "ends at chance from m = 1.5 on")
    assert failure_phrase([0.1, 1.5, 2.0], {"chance": [], "loss": [1.5]}) == (
        "does not lower its loss at m = 1.5")
    # m = 3 ended at chance with one of its two test images past 180° - m/2 (94°), where the
    # raw margin is a bonus, and its loss fell all the same; the monotonic run, none.
    assert ("At the end of training a median of 50 % (range 50–50 %) of the test images of the "
            "raw-margin runs that ended at chance sat beyond θ = 180° − m/2, where the raw "
            "target logit is higher than a plain cosine; in the monotonic runs at the same "
            "margins and scales, 0 % (0–0 %). 1 of those 1 raw-margin runs lowered their "
            "training loss all the same.") in table
    # The bonus region, through the head's own target logit: beyond π - m/2 the raw margin
    # raises the target logit above the plain cosine, before it lowers it.
    from keras import ops

    from tfmargin.margins import target_logit

    for m in (1.0, 2.0, 3.0):
        theta = np.pi - m / 2 + np.array([-0.01, 0.01])
        raw = ops.convert_to_numpy(target_logit(np.cos(theta), "arcface", 1.0, m, 0.0,
                                                fallback="none"))
        assert raw[0] < np.cos(theta[0]) and raw[1] > np.cos(theta[1])
    # The pull on a fresh image (θ = 90°): -sin(90° + m) before the turn at θ = π - m, and
    # past it the raw curve's -sin(90° + m) > 0 against the fallback's -sin(90°) = -1.
    assert ("At θ = 90° the target logit's slope in θ per unit s, for m = 0.1, 2, 3, is "
            "monotonic: -1.00, -1.00, -1.00; none: -1.00, 0.42, 0.99") in table
    # The README's line on the paper: what is reproduced, at which budget.
    from readme_blocks import paper

    lines = paper([], list(loaded.values())).splitlines()
    assert lines[2] == ("* Figure 2 (m from 0.1 to 3, both fallbacks): mobilenetv2 at 5,000 "
                        "training images × 2 epochs, 5 points.")
    assert lines[1].endswith("45,000 training images × 5 epochs: 0 of its 9 cells with two "
                             "seeds or more.")
    grid = sweep.grid("figure2")
    assert "backbone" not in grid[0]  # the recipe's: MobileNetV2, or airbench94 for airbench
    assert {(g["margin"], g["fallback"], g["scale"]) for g in grid} == {
        (m, f, s) for m in (0.1, 0.3, 0.5, 1.0, 1.5, 2.0, 3.0) for f in ("monotonic", "none")
        for s in (1.0, 8.0)}


def test_a_sweep_goes_on_past_a_run_whose_loss_became_nan(tmp_path, monkeypatch, capsys):
    """A margin sweep looks for failures: a diverged run is named, the others still run, and
    the sweep exits 3."""
    import sweep

    from tfmargin.runner import train as train_module

    tried = []

    def train(config):
        tried.append(config.margin)
        if config.margin == 3.0:
            raise train_module.TrainingDiverged("loss became NaN in epoch 1")

    monkeypatch.setattr(train_module, "train", train)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(["figure2", "--backbones", "tinycnn", "--margins", "3,0.1", "--scales", "1",
                    "--far-ood", "none", "--runs-dir", str(tmp_path / "runs")])
    assert exit_info.value.code == 3 and tried == [3.0, 0.1, 3.0, 0.1]
    err = capsys.readouterr().err
    assert "2 run(s) diverged, nothing recorded for them:" in err
    assert err.count("-m3.0-") == 2 and "loss became NaN in epoch 1" in err
