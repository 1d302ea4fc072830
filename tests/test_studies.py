"""experiments/studies.py: each study's runs, which of them the ledger holds, and the hours
the rest would take; the sweep's plan beneath it."""

import json
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import studies  # noqa: E402
from tables import load_runs  # noqa: E402

from tfmargin.runner import provenance  # noqa: E402

DATA = "../shared/datasets/cifar10-jpeg"  # only its name enters the run names


def plan_args(ledger, runs_dir="runs", far_ood=None):
    return SimpleNamespace(dataset=DATA, ledger=str(ledger), runs_dir=str(runs_dir),
                           far_ood=far_ood)


@pytest.fixture
def bfloat16_cpu(monkeypatch):
    """Plan as on a CPU with bfloat16 instructions (where the ledger's airbench runs ran)."""
    monkeypatch.setattr(provenance, "has_bfloat16_instructions", lambda: True)
    monkeypatch.setattr(provenance, "has_gpu", lambda: False)


def planned(name, args):
    return [run for _, runs in studies.study_plan(name, args) for run in runs]


def test_each_study_plans_its_grid_once_per_run(tmp_path, bfloat16_cpu):
    sizes = {"selection": 4 * 3, "smoothing-open-set": 4 * 3, "open-set": 2 * 4 * 2 + 2 * 4,
             "reject-dev-standard": 2 * 2, "table1": 3 * 3 * 2, "figure2-airbench": 2 * 7,
             "figure2-short": 2 * 2 * 7, "converged-pairs": 3 * 5,
             "chosen-pairs": 0}  # planned once the selection has chosen
    assert set(sizes) == set(studies.STUDIES)
    for name, size in sizes.items():
        runs = planned(name, plan_args(tmp_path))
        assert len(runs) == size, name
        assert len({config.run_name() for _, config in runs}) == size, name
        assert {state for state, _ in runs} <= {"to train"}, name
    # The open-set study at ls 0.2 on split 0, seed 1, is also the smoothing study's.
    shared = ({c.run_name() for _, c in planned("open-set", plan_args(tmp_path))}
              & {c.run_name() for _, c in planned("smoothing-open-set", plan_args(tmp_path))})
    assert len(shared) == 4


def test_the_studies_name_the_ledgers_runs(bfloat16_cpu):
    """The finished studies plan exactly the runs the documents were made from."""
    ledger = os.path.join(ROOT, "results", "runs")
    for name in ("converged-pairs", "figure2-short"):
        states = [state for state, _ in planned(name, plan_args(ledger))]
        assert states == ["recorded"] * len(states), name
    # The selection's next step starts where the ledger's candidates end: none recorded (and
    # none at all once every head has its choice).
    next_step = [state for state, _ in planned("selection", plan_args(ledger))]
    assert "recorded" not in next_step, next_step


def test_the_chosen_pairs_reuse_the_runs_whose_settings_did_not_change(monkeypatch,
                                                                         bfloat16_cpu):
    """Once every head has its choice, the paired study trains each at it on all 50,000
    images, 5 seeds; softmax kept at airbench's own settings is the converged pairs' runs."""
    import head_recipes as hr

    rate = hr.RATE
    chosen = {"softmax": hr.candidate(0.2, None, None, rate),
              "arcface": hr.candidate(0.0, 16.0, 0.2, rate),
              "cosface": hr.candidate(0.1, 8.0, 0.1, rate * 2),
              "normface": hr.candidate(0.0, 8.0, 0.0, rate)}
    monkeypatch.setattr(hr, "choices", lambda found: {
        loss: (None, [(key, 1)]) if loss == "cosface" else (key, [])
        for loss, key in chosen.items()})
    ledger = os.path.join(ROOT, "results", "runs")
    assert planned("chosen-pairs", plan_args(ledger)) == []  # cosface still waits
    monkeypatch.setattr(hr, "choices", lambda found: {
        loss: (key, []) for loss, key in chosen.items()})
    runs = planned("chosen-pairs", plan_args(ledger))
    assert len(runs) == 4 * 5 and {c.val_split for _, c in runs} == {0.0}
    assert {(c.loss, c.seed) for state, c in runs if state == "recorded"} == {
        ("softmax", seed) for seed in range(5)}
    cosface = {(c.label_smoothing, c.learning_rate) for _, c in runs if c.loss == "cosface"}
    assert cosface == {(0.1, rate * 2)}


def test_far_ood_reaches_only_the_open_set_sweeps(tmp_path):
    args = plan_args(tmp_path, far_ood="data/fashion-mnist")
    for name in studies.STUDIES:
        for command in studies.study_commands(name, str(tmp_path)):
            argv = studies.sweep_argv(command, args)
            assert ("--far-ood" in argv) == (command[0] == "open-set"), name
            assert argv[argv.index("--ledger") + 1] == str(tmp_path)


def test_recorded_and_finished_runs_are_told_apart(tmp_path, bfloat16_cpu):
    ledger, runs_dir = tmp_path / "ledger", tmp_path / "runs"
    (_, first), (_, second), *_ = planned("reject-dev-standard",
                                          plan_args(ledger, runs_dir))
    for folder, config in ((ledger, first), (runs_dir, second)):
        os.makedirs(folder / config.run_name())
        (folder / config.run_name() / "metrics.json").write_text("{}")
    states = [state for state, _ in planned("reject-dev-standard", plan_args(ledger, runs_dir))]
    assert states == ["recorded", "finished", "to train", "to train"]


def write_run(ledger, name, *, family, wall_seconds, backbone="mobilenetv2"):
    os.makedirs(ledger / name)
    config = {"backbone": backbone, "recipe": "standard", "epochs": 5, "limit_train": 0,
              "val_split": 0.1, "mixed_precision": False, "classes": "", "loss": "softmax",
              "dataset": DATA, "machine": {"family": family}}
    (ledger / name / "config.json").write_text(json.dumps(config))
    (ledger / name / "metrics.json").write_text(json.dumps(
        {"wall_seconds": wall_seconds, "finished_at": "2026-12-07T10:00:00Z"}))


def test_hours_are_the_median_of_this_cpus_runs_of_the_budget(tmp_path):
    for i, (family, wall) in enumerate((("25/17", 3600), ("25/17", 7200), ("25/17", 10800),
                                        ("25/1", 36000))):
        write_run(tmp_path, f"run{i}", family=family, wall_seconds=wall)
    key = studies.budget_key(backbone="mobilenetv2", recipe="standard", epochs=5,
                             limit_train=0, val_split=0.1, mixed=False, classes="")
    assert studies.hours_per_run(load_runs(str(tmp_path)), "25/17") == {key: 2.0}
    assert studies.hours_per_run(load_runs(str(tmp_path)), "25/1") == {key: 10.0}
    assert studies.hours_per_run(load_runs(str(tmp_path)), "6/143") == {}


def test_the_status_shows_the_hours_on_every_cpu_type_beside_this_ones(tmp_path,
                                                                       bfloat16_cpu):
    """Each study's hours on every CPU type the ledger knows, this CPU's first; ``?`` where
    a type has no run of a budget the study needs."""
    ledger = tmp_path / "ledger"
    write_run(ledger, "zen4", family="25/17", wall_seconds=3600)
    write_run(ledger, "xeon", family="6/167", wall_seconds=1800, backbone="resnet18")
    runs = load_runs(str(ledger))
    assert studies.cpu_families(runs, folder=str(tmp_path)) == {"25/17": "?", "6/167": "?"}
    cpus = {"hours here": (studies.hours_per_run(runs, "25/17"), {}),
            "hours 6/167": (studies.hours_per_run(runs, "6/167"), {})}
    plan = studies.study_plan("table1", plan_args(ledger))
    mobilenet = [config for _, planned_runs in plan for _, config in planned_runs
                 if config.backbone == "mobilenetv2"]
    assert len(mobilenet) == 6
    assert studies.hours_to_train(mobilenet, *cpus["hours here"]) == "6.0"
    assert studies.hours_to_train(mobilenet, *cpus["hours 6/167"]) == "?"
    header, row = studies.status_table({"table1": plan}, cpus, 0).splitlines()
    assert header.split()[5:9] == ["hours", "here", "hours", "6/167"]
    assert row.split()[:6] == ["table1", "18", "0", "18", "?", "?"]
    # A study planned only once the selection has chosen shows no count yet, not zero.
    waiting = studies.status_table({"chosen-pairs": []}, cpus, 0).splitlines()[1]
    assert waiting.split()[:6] == ["chosen-pairs", "?", "0", "?", "?", "?"]


def test_run_trains_each_study_in_order_past_diverged_runs(tmp_path, monkeypatch, capsys):
    """``--run`` goes on to the next sweep when one exits 3 (some runs diverged, as Figure 2's
    do), in the order the studies were given."""
    from tfmargin.runner import train as train_module

    tried = []

    def train(config):
        tried.append((config.loss, config.margin))
        if config.margin == 3.0:
            raise train_module.TrainingDiverged("loss became NaN in epoch 1")

    monkeypatch.setattr(train_module, "train", train)
    tiny = ["--backbones", "tinycnn", "--far-ood", "none"]
    monkeypatch.setitem(studies.STUDIES, "margins", (
        "a margin sweep", [["figure2", *tiny, "--margins", "3", "--scales", "1"]]))
    monkeypatch.setitem(studies.STUDIES, "heads", (
        "a head study", [["heads", *tiny, "--heads", "softmax"]]))
    studies.main(["--dataset", DATA, "--ledger", str(tmp_path / "ledger"),
                  "--runs-dir", str(tmp_path / "runs"), "--run", "margins", "heads"])
    assert tried == [("arcface", 3.0), ("arcface", 3.0), ("softmax", None)]
    out = capsys.readouterr().out
    assert out.index("== study margins: python experiments/sweep.py figure2") < out.index(
        "== study heads: python experiments/sweep.py heads")


def test_a_study_of_steps_is_asked_again_until_it_needs_nothing(tmp_path, monkeypatch):
    """The selection's next runs follow from its last ones: ``--run`` asks again after each
    step, and stops when a step asks for the same runs twice (they were never recorded)."""
    from tfmargin.runner import train as train_module

    seeds = []
    monkeypatch.setattr(train_module, "train", lambda config: seeds.append(config.seed))
    tiny = ["heads", "--backbones", "tinycnn", "--heads", "softmax"]

    def next_step(ledger):
        return [[*tiny, "--seeds", str(len(seeds))]] if len(seeds) < 3 else []

    monkeypatch.setitem(studies.STUDIES, "steps", ("three steps", next_step))
    monkeypatch.setitem(studies.STUDIES, "stuck", ("the same step", lambda ledger: [tiny]))
    args = ["--dataset", DATA, "--ledger", str(tmp_path / "ledger"), "--runs-dir",
            str(tmp_path / "runs"), "--run"]
    studies.main([*args, "steps"])
    assert seeds == [0, 1, 2]
    studies.main([*args, "stuck"])
    assert seeds == [0, 1, 2, 0]


def test_a_bfloat16_study_is_left_out_on_a_cpu_without_bfloat16(tmp_path, monkeypatch, capsys):
    from tfmargin.runner import train as train_module

    tried = []
    monkeypatch.setattr(train_module, "train", tried.append)
    monkeypatch.setattr(provenance, "has_bfloat16_instructions", lambda: False)
    monkeypatch.setattr(provenance, "has_gpu", lambda: False)
    monkeypatch.setitem(studies.STUDIES, "bf16", ("a bfloat16 study", [
        ["heads", "--backbones", "tinycnn", "--heads", "softmax", "--mixed-precision"]]))
    studies.main(["--dataset", DATA, "--ledger", str(tmp_path / "ledger"), "--runs-dir",
                  str(tmp_path / "runs"), "--run", "bf16"])
    assert tried == []
    assert "== study bf16: left out, it trains in bfloat16 and this CPU has no bfloat16 " \
        "instructions" in capsys.readouterr().out


def test_a_standard_run_without_ledger_runs_here_is_estimated_from_the_budget_benchmark(
        tmp_path):
    """The committed budget benchmarks of the two EPYCs give one main-command run's hours;
    a run on 7 of the 10 classes trains on 7/10 of the images."""
    zen4, zen3 = studies.benchmark_hours("25/17"), studies.benchmark_hours("25/1")
    assert set(zen4) == set(zen3) == {"resnet18", "efficientnetb0", "mobilenetv2"}
    assert round(zen4["resnet18"], 2) == 0.59 and round(zen3["resnet18"], 1) == 3.0
    assert studies.benchmark_hours("6/999") == {}
    (_, dev), *_ = planned("reject-dev-standard", plan_args(tmp_path))
    assert len(dev.class_list()) == 7
    assert studies.estimate(dev, {}, zen4) == (pytest.approx(0.7 * zen4["mobilenetv2"]), True)
    assert studies.estimate(dev, {}, {}) == (None, False)
