"""experiments/head_recipes.py: the per-head selection rule of docs/recipe.md, step by step,
on made-up validation figures; and recipes.HEAD_DEFAULTS is the rule's choice on the ledger."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))

import head_recipes as hr  # noqa: E402
from tables import load_runs  # noqa: E402

RATE = 0.1875  # airbench's learning rate per 128 images


def key(ls, scale=8.0, margin=0.1, rate=RATE):
    return hr.candidate(ls, scale, margin, rate)


def test_label_smoothing_first_each_candidate_once():
    choice, needed = hr.choose("arcface", {})
    assert choice is None and needed == [(key(0), 0), (key(0.1), 0), (key(0.2), 0)]
    choice, needed = hr.choose("softmax", {})
    assert needed[0] == (hr.candidate(0, None, None, RATE), 0)


def test_candidates_near_the_best_get_a_second_seed_before_the_step_chooses():
    found = {key(0): {0: 0.900}, key(0.1): {0: 0.897}, key(0.2): {0: 0.880}}
    choice, needed = hr.choose("arcface", found)
    # 0.1 is 0.3 points behind: both it and the best need seed 1; 0.2, 2 points behind, not.
    assert choice is None and needed == [(key(0), 1), (key(0.1), 1)]
    found[key(0)][1], found[key(0.1)][1] = 0.890, 0.899  # means 0.895 against 0.898
    choice, needed = hr.choose("arcface", found)
    # Label smoothing 0.1 chosen; the scale and margin grid at it, its start already run.
    assert needed == [(key(0.1, s, m), 0) for s in (8.0, 16.0) for m in (0.1, 0.2, 0.3)
                      if (s, m) != (8.0, 0.1)]


def test_a_winning_scale_of_16_adds_32_then_the_rate_is_halved_and_doubled():
    found = {key(0.1): {0: 0.70}, key(0.2): {0: 0.70}}
    found |= {key(0, s, m): {0: 0.70} for s in (8.0, 16.0) for m in (0.1, 0.2, 0.35)}
    found[key(0)] = {0: 0.75}
    choice, needed = hr.choose("cosface", found)
    assert needed == [(key(0), 1)]  # the best alone gets its second seed too
    found[key(0)][1] = 0.75
    found[key(0, 16.0, 0.35)] = {0: 0.90, 1: 0.90}
    choice, needed = hr.choose("cosface", found)
    assert needed == [(key(0, 32.0, m), 0) for m in (0.1, 0.2, 0.35)]
    found |= {key(0, 32.0, m): {0: 0.60} for m in (0.1, 0.2, 0.35)}
    choice, needed = hr.choose("cosface", found)
    assert needed == [(key(0, 16.0, 0.35, RATE / 2), 0), (key(0, 16.0, 0.35, RATE * 2), 0)]
    # The doubled rate wins by more than 0.5 points: one step further, then chosen.
    found[key(0, 16.0, 0.35, RATE / 2)] = {0: 0.80}
    found[key(0, 16.0, 0.35, RATE * 2)] = {0: 0.95, 1: 0.95}
    choice, needed = hr.choose("cosface", found)
    assert needed == [(key(0, 16.0, 0.35, RATE * 4), 0)]
    found[key(0, 16.0, 0.35, RATE * 4)] = {0: 0.85}
    choice, needed = hr.choose("cosface", found)
    assert (choice, needed) == (key(0, 16.0, 0.35, RATE * 2), [])
    assert hr.head_defaults("cosface", choice) == {
        "label_smoothing": 0.0, "scale": 16.0, "margin": 0.35, "learning_rate": RATE * 2}


def test_softmax_has_no_scale_or_margin_step_and_an_unchanged_choice_no_defaults():
    found = {hr.candidate(ls, None, None, RATE): {0: 0.9 - ls / 10, 1: 0.9 - ls / 10}
             for ls in (0, 0.1, 0.2)}
    choice, needed = hr.choose("softmax", found)
    assert needed == [(hr.candidate(0, None, None, r), 0) for r in (RATE / 2, RATE * 2)]
    found[hr.candidate(0, None, None, RATE / 2)] = {0: 0.5}
    found[hr.candidate(0, None, None, RATE * 2)] = {0: 0.5}
    choice, _ = hr.choose("softmax", found)
    assert hr.head_defaults("softmax", choice) == {"label_smoothing": 0.0}
    assert hr.head_defaults("softmax", hr.candidate(0.2, None, None, RATE)) == {}


def test_the_runs_needed_become_one_sweep_per_rate_and_seed():
    commands = hr.sweep_commands({
        "arcface": [(key(0, 16.0, 0.2), 0), (key(0.1), 1)],
        "normface": [(hr.candidate(0, 8.0, 0.0, RATE * 2), 0)],
        "softmax": [(hr.candidate(0.1, None, None, RATE), 1)]})
    assert commands == [
        ["heads", "--recipe", "airbench", "--mixed-precision", "--val-split", "0.1", "--heads",
         "arcface:s=16:m=0.2:ls=0", "--seeds", "0"],
        ["heads", "--recipe", "airbench", "--mixed-precision", "--val-split", "0.1", "--heads",
         "arcface:s=8:m=0.1:ls=0.1,softmax:ls=0.1", "--seeds", "1"],
        ["heads", "--recipe", "airbench", "--mixed-precision", "--val-split", "0.1", "--heads",
         "normface:s=8:m=0:ls=0", "--seeds", "0", "--learning-rate", "0.375"]]


def test_the_ledgers_selection_runs_are_candidates():
    found = hr.candidates(load_runs(os.path.join(ROOT, "results", "runs")))
    for loss in ("softmax", "arcface"):
        scale, margin = hr.START[loss]
        for ls in (0.0, 0.1, 0.2):
            assert 0 in found[loss][hr.candidate(ls, scale, margin, RATE)], (loss, ls)
    # The 50,000-image seed study (no validation split) is not a candidate.
    assert all(len(seeds) <= 3 for f in found.values() for seeds in f.values())


def test_head_defaults_are_the_selections_choice():
    done = subprocess.run([sys.executable, os.path.join(ROOT, "experiments",
                                                        "head_recipes.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_report_shows_each_heads_choice_or_the_runs_it_waits_on(monkeypatch):
    found = {loss: {} for loss in hr.HEADS}
    found["softmax"] = {hr.candidate(ls, None, None, r): {0: 0.9 - ls, 1: 0.9 - ls}
                        for ls in (0, 0.1, 0.2) for r in (RATE,)}
    found["softmax"] |= {hr.candidate(0, None, None, r): {0: 0.5} for r in (RATE / 2, RATE * 2)}
    found["arcface"] = {key(0): {0: 0.9}, key(0.1): {0: 0.8}, key(0.2): {0: 0.8}}
    monkeypatch.setattr(hr, "candidates", lambda runs: found)
    table = hr.table([])
    assert "| softmax | 5 | 8 | chosen: `softmax:ls=0`, lr 0.1875 |" in table
    assert "| arcface | 3 | 3 | waits on `arcface:s=8:m=0.1:ls=0` seed 1 |" in table
    assert "| normface | 0 | 0 | waits on `normface:s=8:m=0:ls=0` seed 0, " in table


def test_head_defaults_do_not_read_the_entry_they_replace(monkeypatch):
    """Once HEAD_DEFAULTS holds a choice, the choice still differs from the recipe's own
    settings (else --check would ask for the entry to be removed)."""
    from tfmargin.runner import recipes

    monkeypatch.setitem(recipes.HEAD_DEFAULTS, "airbench",
                        {"arcface": dict(label_smoothing=0.0, scale=16.0)})
    assert hr.head_defaults("arcface", key(0, 16.0, 0.1)) == {"label_smoothing": 0.0,
                                                               "scale": 16.0}
