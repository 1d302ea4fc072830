import os
import shutil
import subprocess
import sys

import pytest
from fake_runs import ROOT, fake_run, seed_run, update_metrics, write_report


def test_report_copies_the_metrics_files(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a", "resnet18", "softmax", 0.41234, 0.43219)
    fake_run(runs, "b", "resnet18", "arcface", 0.38765, 0.40001)
    os.makedirs(runs / "unfinished")
    text = write_report(runs, tmp_path / "results.md")
    assert ("| a | resnet18 | softmax | 0 | 5000 | 3 | 50.00 | 41.23 | 41.23 | 43.22 | 12.50 | "
            "- | - | - | 50.0 | 100 | 2026-12-01 10:20 UTC |") in text
    assert ("| b | resnet18 | arcface s=16 m=0.2 monotonic | 0 | 5000 | 3 | 50.00 | 38.77 | "
            "38.77 | 40.00 |") in text
    # At 5,000 images x 3 epochs, not the main command's budget: no cell of Table 1.
    table1 = text.split("**Table 1 (CIFAR-10), test mAP**")[1].split("**Table 1, test top-1")[0]
    assert "| paper: cross-entropy | 65.2 | 84.66 | 59.01 |" in table1 and "ours" not in table1
    # The exact command: every setting that differs from run.py's defaults, nothing else.
    assert ("- `b`: `python experiments/run.py --backbone resnet18 --loss arcface --dataset "
            "data/cifar10-jpeg --epochs 3 --scale 16.0 --margin 0.2 --limit-train 5000 "
            "--no-mixed-precision`\n" in text)
    assert "**Table 2 (CIFAR-100)**: not measured" in text and \
        "| paper: cross-entropy | 60.16 | 62.2 | 58.94 |" in text
    assert "unfinished" not in text and "{{" not in text


def test_table1_pairs_each_head_with_softmax_by_seed_at_the_main_commands_budget(tmp_path):
    """Table 1's cells: softmax, the paper's head and today's ArcFace at the main command's
    settings, mean ± s.d. over seeds and the paired difference from softmax; a run at another
    learning rate is not a cell."""
    runs = tmp_path / "runs"
    main = dict(epochs=5, limit_train=0, train_size=45000, val_split=0.1, scale=8.0,
                margin=0.1, head_scale=8.0)
    for seed, (soft, arc) in enumerate(((0.80, 0.82), (0.81, 0.84))):
        fake_run(runs, f"s{seed}", "resnet18", "softmax", 0.5, soft, seed=seed,
                 **main | {"scale": None, "margin": None})
        fake_run(runs, f"a{seed}", "resnet18", "arcface", 0.5, arc, seed=seed, **main)
    fake_run(runs, "paper0", "mobilenetv2", "arcface", 0.5, 0.5, fallback="none",
             **main | {"scale": 1.0, "head_scale": 1.0})
    fake_run(runs, "lr", "resnet18", "arcface", 0.5, 0.99, learning_rate=0.1, **main)
    text = write_report(runs, tmp_path / "results.md")
    table1 = text.split("**Table 1 (CIFAR-10), test mAP**")[1].split("**Table 1, test top-1")[0]
    assert "| ours: softmax | 80.50 ± 0.71 (2 seeds) | not run | not run |" in table1
    # Differences 2 and 3 points: mean 2.5, s.d. 0.7071, t(0.975, 1) = 12.706: +- 6.35.
    assert ("| ours: arcface s=8 m=0.1 monotonic | 83.00 ± 1.41 (2 seeds), Δ +2.50 (-3.85, "
            "+8.85) | not run | not run |") in table1
    assert "| ours: arcface s=1 m=0.1 none | not run | not run | 50.00 (1 seed) |" in table1
    assert "99.00" not in table1


def test_glyph_folder_has_distinct_classes_and_loads(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    import numpy as np
    from make_glyphs import glyph_classes, write_glyphs

    shapes, colours = glyph_classes(300, np.random.default_rng(0))
    assert len({s.tobytes() for s in shapes}) == 300 and colours.shape == (300, 3)

    from tfmargin.data import load_dataset

    data = load_dataset(write_glyphs(str(tmp_path / "g"), 5, 3, 2))
    assert data.class_names == [f"glyph_{i:03d}" for i in range(5)]
    assert data.sizes == {"train": 10, "val": 5, "test": 10}


def test_seed_table_reports_mean_sd_and_paired_interval():
    from tables import seed_table

    softmax = [0.930, 0.934, 0.931, 0.936, 0.933]
    arcface = [0.932, 0.933, 0.935, 0.937, 0.936]  # paired by seed
    runs = [seed_run(f"s{k}", "softmax", k, t, t + 0.002) for k, t in enumerate(softmax)]
    arcface_map_at_r = [0.82, 0.81, 0.83, 0.82, 0.82]  # softmax: 0.8 at every seed
    runs += [seed_run(f"a{k}", "arcface", k, t, t + 0.001, r)
             for k, (t, r) in enumerate(zip(arcface, arcface_map_at_r, strict=True))]
    runs.append(seed_run("cos0", "cosface", 0, 0.90, 0.91))  # one seed only
    mixed = seed_run("m0", "softmax", 0, 0.95, 0.95)  # same seed, other precision: own arm
    mixed["config"] = mixed["config"] | {"mixed_precision": True}
    text = seed_table(runs + [mixed])
    # Hand computation: top-1 percent mean 93.28, s.d. 0.2387 (softmax).
    float32, mixed = text.split("*cifar10-jpeg airbench94 airbench 50000x10 mixed*")
    assert float32.startswith("*cifar10-jpeg airbench94 airbench 50000x10 float32*\n")
    assert "| softmax | 0, 1, 2, 3, 4 | 93.28 ± 0.24" in float32
    assert "| softmax | 0 | 95.00 |" in mixed and "No head shares" not in mixed
    # Differences (pp) 0.2, -0.1, 0.4, 0.1, 0.3: mean 0.18, s.d. 0.19235,
    # t(0.975, 4) = 2.7764 -> half-width 0.2388.
    assert "| arcface s=8 m=0.3 monotonic | 5 | +0.18 (-0.06, +0.42) |" in text
    assert "within noise" in text
    # TTA: arcface +0.001, softmax +0.002, so the TTA difference is 0.1 pp lower.
    # mAP and P@1 equal everywhere; MAP@R differences 2, 1, 3, 2, 2 pp: mean 2, s.d. 0.7071,
    # half-width 2.7764 * 0.7071 / sqrt(5) = 0.878.
    assert ("| +0.18 (-0.06, +0.42) | +0.08 (-0.16, +0.32) | +0.00 (+0.00, +0.00) | "
            "+0.00 (+0.00, +0.00) | +2.00 (+1.12, +2.88) | within noise |") in text
    assert ("| cosface s=8 m=0.3 | 1 | -3.00 | -2.20 | +0.00 | +0.00 | +0.00 | "
            "one seed: an anecdote |") in text


def test_wall_time_of_a_resumed_or_shared_run_is_labelled_and_left_out_of_the_mean():
    from tables import runs_table, seed_table

    runs = [seed_run(f"s{k}", "softmax", k, 0.9, 0.9) for k in range(3)]
    runs[0]["metrics"] |= {"wall_seconds": 900.0, "resumed_at_epoch": 4}  # epochs 5-10 only
    runs[1]["metrics"]["wall_seconds"] = 1200.0  # 1800 s and 1200 s uninterrupted: 25 min
    for run in runs:
        run["metrics"] |= {"epochs": 10, "train_images_per_second": 500.0}
        run["finished"] = "2026-11-30 01:00 UTC"
    assert "| 0, 1, 2 | 90.00 ± 0.00 |" in seed_table(runs)
    assert seed_table(runs).splitlines()[4].endswith(" | 25.0 |")
    for run in runs:
        run["name"] = "r"
    table = runs_table(runs)
    assert "| 500.0 | 900 (epochs 5–10) | 2026-11-30 01:00 UTC |" in table
    assert "| 500.0 | 1200 | 2026-11-30 01:00 UTC |" in table
    # Timed beside other work: labelled, and not the recipe's time.
    runs[2]["metrics"]["cpu_share_of_other_processes"] = 0.5
    assert seed_table(runs).splitlines()[4].endswith(" | 20.0 |")  # 1200 s alone
    assert "| 500.0 | 1800 (others 50 % of the CPU) | 2026-11-30 01:00 UTC |" in runs_table(runs)
    runs[1]["metrics"]["resumed_at_epoch"] = runs[2]["metrics"]["resumed_at_epoch"] = 1
    assert seed_table(runs).splitlines()[4].endswith(" | - |")  # no uninterrupted run


def test_seed_arms_are_keyed_by_the_whole_identity_but_the_seed():
    """Same head, another learning rate: its own arm (never averaged in, never a clash)."""
    from tables import seed_table

    runs = [seed_run("x", "softmax", 0, 0.90, 0.9), seed_run("y", "softmax", 1, 0.92, 0.9)]
    other = seed_run("z", "softmax", 0, 0.50, 0.5)
    other["config"]["learning_rate"] = 0.5
    text = seed_table(runs + [other])
    assert text.startswith("*cifar10-jpeg airbench94 airbench 50000x10 float32*\n")
    assert "| softmax | 0, 1 | 91.00 ± 1.41" in text and "| softmax lr=0.5 | 0 | 50.00" in text
    assert "| softmax lr=0.5 | 1 | -40.00 |" in text  # paired with seed 0 only


@pytest.mark.parametrize("key,name", [("gelu", "GELU"), ("batchnorm", "BatchNorm")])
def test_kernel_check_pairs_the_fused_kernel_with_keras_by_seed(key, name):
    """The same head and seeds with either kernel: arms by kernel, Keras's the baseline; a
    head run one way only is not in the check, and the heads table keeps the two apart."""
    import report
    from tables import seed_table

    stock = [seed_run(f"k{k}", "softmax", k, t, t) for k, t in enumerate([0.900, 0.904])]
    fused = [seed_run(f"f{k}", "softmax", k, t, t) for k, t in enumerate([0.903, 0.905])]
    for run in fused:
        run["config"][key] = "fused"
    arcface = seed_run("a0", "arcface", 0, 0.89, 0.89)  # Keras's kernel only
    block = report.kernels(stock + fused + [arcface])
    # The arms are kernels: the setting they share names the head.
    assert block.startswith("*cifar10-jpeg airbench94 airbench 50000x10 float32, softmax*\n")
    assert f"| Keras {name} | 0, 1 | 90.20 ± 0.28 |" in block
    assert f"| fused {name} | 0, 1 | 90.40 ± 0.14 |" in block
    # Differences 0.3, 0.1 pp: mean 0.2, s.d. 0.1414, t(0.975, 1) = 12.706: half-width 1.27.
    assert f"| fused {name} | 2 | +0.20 (-1.07, +1.47) |" in block
    assert "arcface" not in block and f"| {name} − Keras {name} | common seeds |" in block
    assert "*cifar10-jpeg airbench94 airbench 50000x10 float32, fused " + name + "*\n" in \
        seed_table(stock + fused + [arcface])
    assert report.kernels(stock + [arcface]).startswith("No run with a fused kernel")
    # Commands: a run that predates the flag was built with Keras's kernel, which is no
    # longer the recipe's.
    from tables import command
    for run in (stock[0], fused[0]):
        run["config"] |= {"mixed_precision": True, "augment": "airbench", "embedding_dim": 0,
                          "epochs": 10, "batch_size": 1024, "tta": 2, "val_split": 0.0,
                          "precise_bn_batches": 0, "learning_rate": 0.1875,
                          "weight_decay": 0.0153 / 11.5}
    assert f" --{key} keras " in command(stock[0]["config"])
    assert f"--{key}" not in command(fused[0]["config"])
    assert not report.at_recipe_kernels(stock[0]) and not report.at_recipe_kernels(fused[0])
    fused[0]["config"] |= {"gelu": "fused", "batchnorm": "fused"}
    assert report.at_recipe_kernels(fused[0])


def test_head_spec_of_a_combined_margin_round_trips_through_the_sweep_grammar():
    import sweep
    from sweep import head_spec
    from tables import recipe_label

    config = {"loss": "combined", "head_scale": 8.0, "margin": [1.0, 0.3, 0.2],
              "fallback": "monotonic", "label_smoothing": 0.0, "recipe": "standard"}
    assert head_spec(config) == "combined:s=8:m=1/0.3/0.2"
    assert sweep.parse_heads(head_spec(config)) == [
        dict(loss="combined", scale=8.0, margin=(1.0, 0.3, 0.2))]
    # An airbench run at its own recipe's settings has no recipe label.
    assert recipe_label(seed_run("a", "softmax", 0, 0.9, 0.9)["config"]) == ""


def test_selection_section_shows_precision_smoothing_and_each_command(tmp_path):
    runs = tmp_path / "runs"
    selection = dict(recipe="airbench", batch_size=1024, epochs=5, limit_train=0,
                     val_split=0.1, validation_freq=5, learning_rate=0.1875, optimizer="sgd",
                     train_size=45000, tta=2, gelu="fused")
    fake_run(runs, "a", "airbench94", "softmax", 0.9, 0.9, label_smoothing=0.2,
             mixed_precision=True, **selection)
    fake_run(runs, "b", "airbench94", "cosface", 0.9, 0.9, label_smoothing=0.0, scale=8.0,
             head_scale=8.0, margin=0.3, **selection)
    fake_run(runs, "c", "airbench94", "cosface", 0.95, 0.9, label_smoothing=0.2, scale=4.0,
             head_scale=4.0, margin=0.1, **selection)  # best on test, not on validation
    fake_run(runs, "a0", "airbench94", "cosface", 0.9, 0.9, label_smoothing=0.2, scale=8.0,
             head_scale=8.0, margin=0.1, **selection)  # ties b on val top-1, lower val mAP
    fake_run(runs, "a1", "airbench94", "cosface", 0.9, 0.9, label_smoothing=0.2, scale=8.0,
             head_scale=8.0, margin=0.1, **(selection | {"seed": 1}))  # a0's second seed
    for name, top1, mAP in (("a", 0.91, 0.95), ("b", 0.92, 0.95), ("c", 0.9, 0.95),
                            ("a0", 0.92, 0.94), ("a1", 0.90, 0.94)):  # validation metrics
        update_metrics(runs, name, val={"top1": top1, "mAP": mAP, "precision_at_1": 0.85,
                                        "map_at_r": 0.5})
    # b's validation calibration, and its twins on open-set split 0 (the same settings but
    # --classes, any seed): their mean AUROC on validation joins b's row; another split's
    # run does not.
    update_metrics(runs, "b", calibration={"before": {"ece": 0.1, "nll": 1, "brier": 1},
                                           "val": {"before": 0.04, "after": 0.015}})
    from sweep import split_classes

    for name, seed, split, figures in (("b-open", 0, 0, (0.81, 0.875)),
                                       ("b-open1", 1, 0, (0.83, 0.865)),
                                       ("b-split2", 0, 2, (0.5, 0.5))):
        fake_run(runs, name, "airbench94", "cosface", 0.9, 0.9, label_smoothing=0.0, scale=8.0,
                 head_scale=8.0, margin=0.3, classes=split_classes(split),
                 **(selection | {"seed": seed}))
        update_metrics(runs, name, open_set_val={"max_logit": {"auroc": figures[0]},
                                                 "feature_norm": {"auroc": figures[1]}})
    text = write_report(runs, tmp_path / "results.md")
    # Sorted by validation top-1: the cosface run first.
    setting = "cifar10-jpeg airbench94 airbench 45000x5 float32, fused GELU, fused BatchNorm"
    # One table per budget (precision included), one row per candidate over its seeds, best
    # first, under the command that runs the budget's candidates.
    assert (f"*{setting}*: `python experiments/sweep.py heads --recipe airbench --backbones "
            "airbench94 --dataset data/cifar10-jpeg --epochs 5 --no-mixed-precision --heads ... "
            "--seeds ...`") in text
    assert ("| `cosface:s=8:m=0.3:ls=0` | 0.1875 | 0 | 92.00 | 95.00 | 50.00 | 4.00 | 1.50 | - | "
            "82.00 ± 1.41 | 87.00 ± 0.71 |\n| `cosface:s=8:m=0.1` | 0.1875 | 0, 1 | 91.00 ± 1.41 | "
            "94.00 ± 0.00 | 50.00 ± 0.00 | - | - | - | - | - |\n| `cosface:s=4:m=0.1` |") in text
    assert "| `softmax` | 0.1875 | 0 | 91.00 | 95.00 |" in text.split(
        "*cifar10-jpeg airbench94 airbench 45000x5 mixed, fused GELU, fused BatchNorm*")[1]
    # The margin head chosen on validation (not the run best on test).
    assert f"| `cosface:s=8:m=0.3:ls=0` | {setting} | 0.1875 | 1 | 92.00 |" in text
    assert ("`python experiments/run.py --recipe airbench --backbone airbench94 --loss softmax "
            "--dataset data/cifar10-jpeg --epochs 5 --mixed-precision`") in text


def test_a_setting_with_several_seeds_is_chosen_by_its_mean():
    """One lucky seed does not win: m=0.3 has the single best run, m=0.1 the higher mean."""
    from tables import best_on_validation

    def run(margin, seed, top1):
        r = seed_run(f"{margin}-{seed}", "arcface", seed, 0.5, 0.5)
        r["config"]["margin"] = margin
        r["metrics"]["val"] = {"top1": top1, "mAP": 0.5}
        return r

    runs = [run(0.3, 0, 0.40), run(0.3, 1, 0.30), run(0.3, 2, 0.32),
            run(0.1, 0, 0.36), run(0.1, 1, 0.35), run(0.1, 2, 0.37)]
    best = best_on_validation(runs + [seed_run("s", "softmax", 0, 0.5, 0.5) | {
        "metrics": {"val": {"top1": 0.2, "mAP": 0.2}}}])
    assert [r["name"] for r in best["arcface"]] == ["0.1-0", "0.1-1", "0.1-2"]
    assert [r["name"] for r in best["softmax"]] == ["s"]


def test_learning_rates_are_paired_by_seed_on_validation(tmp_path):
    """Softmax at its own rate and at the margin heads' rate, the main command otherwise,
    paired by seed on validation; a setting run at one rate only stays out of it."""
    import report
    from tables import load_runs

    runs = tmp_path / "runs"
    typed = dict(epochs=5, limit_train=0, train_size=45000, val_split=0.1,
                 mixed_precision=False, validation_freq=1)
    for name, rate, seed, top1 in (("own0", 0.025, 0, 0.77), ("own1", 0.025, 1, 0.78),
                                   ("old0", 0.05, 0, 0.62), ("old1", 0.05, 1, 0.66)):
        fake_run(runs, name, "mobilenetv2", "softmax", 0.5, 0.5, learning_rate=rate,
                 seed=seed, **typed)
        update_metrics(runs, name, val={"top1": top1, "mAP": top1, "precision_at_1": 0.5,
                                        "map_at_r": 0.5})
    fake_run(runs, "short", "mobilenetv2", "softmax", 0.5, 0.5, learning_rate=0.0125,
             **typed | {"epochs": 2})
    loaded = load_runs(runs)
    assert [r["name"] for r in loaded if report.is_main_command(r)] == ["own0", "own1"]
    block = report.learning_rates(loaded)
    assert block.startswith("*cifar10-jpeg mobilenetv2 standard 45000x5 float32, fused "
                            "BatchNorm, softmax*\n")
    assert "| lr 0.025 | 0, 1 | 77.50 ± 0.71 |" in block
    # Differences 15 and 12 points: mean 13.5, s.d. 2.121, t(0.975, 1) = 12.706: +- 19.06.
    assert "| lr 0.025 | 2 | +13.50 (-5.56, +32.56) |" in block
    assert "0.0125" not in block
    assert report.learning_rates([r for r in loaded if r["name"] != "old0"
                                  and r["name"] != "old1"]) == []


def test_main_command_block_holds_the_command_as_typed_only(tmp_path):
    """The main command's answer: the runs of the command as printed, not a run of it at
    another budget; the same block opens its section of docs/results.md."""
    runs = tmp_path / "runs"
    typed = dict(epochs=5, limit_train=0, train_size=45000, val_split=0.1,
                 mixed_precision=False, validation_freq=1,
                 machine={"model": "AMD EPYC", "cores": 2})
    head = dict(scale=8.0, margin=0.1, head_scale=8.0)  # the registry's ArcFace defaults
    fake_run(runs, "m-soft", "mobilenetv2", "softmax", 0.7812, 0.8, **typed)
    fake_run(runs, "m-arc", "mobilenetv2", "arcface", 0.7698, 0.85, **typed, **head)
    fake_run(runs, "m-arc-e10", "mobilenetv2", "arcface", 0.8, 0.9, **typed | {"epochs": 10},
             **head)
    text = write_report(runs, tmp_path / "results.md")
    block = (tmp_path / "README.md").read_text().split("<!-- results:main-command -->\n")[1]
    assert block.split("\n")[:6] == [
        "**At this budget arcface s=8 m=0.1 monotonic's mean test top-1 is -1.14 points from "
        "softmax's; with 1 paired seed(s) that is an anecdote, not a comparison yet.**", "",
        "| head | seeds | top-1 | Δ top-1 | MAP@R |", "|---|---|---|---|---|",
        "| softmax | 1 | 78.12 | - | 12.50 |",
        "| arcface s=8 m=0.1 monotonic | 1 | 76.98 | -1.14 | 12.50 |"]
    assert block.split("<!-- /results:main-command -->")[0] in text.split(
        "## What does the main command give?\n\n")[1]
    fake_run(runs, "m-arc1", "mobilenetv2", "arcface", 0.7798, 0.85, seed=1, **typed, **head)
    fake_run(runs, "m-soft1", "mobilenetv2", "softmax", 0.7712, 0.8, seed=1, **typed)
    write_report(runs, tmp_path / "results.md")
    # Differences -1.14 and +0.86 points: mean -0.14, s.d. 1.4142, t(0.975, 1) = 12.706.
    assert (tmp_path / "README.md").read_text().split("<!-- results:main-command -->\n")[1] \
        .startswith("**At this budget arcface s=8 m=0.1 monotonic against softmax over 2 paired "
                    "seeds: top-1 within noise (-0.14 points, 95 % CI -12.85 to +12.57).**")
    shutil.rmtree(runs / "m-soft")
    shutil.rmtree(runs / "m-soft1")
    write_report(runs, tmp_path / "results.md")
    assert "**Only one head has a recorded run.**" in (tmp_path / "README.md").read_text()


def test_committed_documents_are_the_report_of_the_committed_ledger():
    """docs/results.md and the README's results blocks, byte for byte, from results/runs
    (a stale document fails CI)."""
    done = subprocess.run([sys.executable, "experiments/report.py", "--check"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "are the report of" in done.stdout, done.stdout + done.stderr


def test_check_fails_on_a_stale_document(tmp_path):
    runs = tmp_path / "runs"
    fake_run(runs, "a", "resnet18", "softmax", 0.41234, 0.43219)
    write_report(runs, tmp_path / "results.md", "--no-plots")
    check = [sys.executable, os.path.join(ROOT, "experiments", "report.py"), "--ledger",
             str(runs), "--output", str(tmp_path / "results.md"), "--readme",
             str(tmp_path / "README.md"), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=120).returncode == 0
    update_metrics(runs, "a", top1=0.5)
    stale = subprocess.run(check, capture_output=True, text=True, timeout=120)
    assert stale.returncode == 1 and "results.md differs from the report" in stale.stderr


def test_open_set_study_is_paired_by_split(tmp_path):
    import sweep

    runs = tmp_path / "runs"
    open_set = dict(recipe="airbench", batch_size=1024, epochs=10, val_split=0.1,
                    train_size=27000, learning_rate=0.1875, label_smoothing=0.2, tta=2,
                    mixed_precision=True)
    for split in (0, 2, 3, 4):  # list 1 is list 0's class set: one run
        classes = sweep.split_classes(split)
        for loss, auroc, top1 in (("softmax", 0.80 + split / 100, 0.95),
                                  ("arcface", 0.82 + split / 100, 0.94)):
            name = f"{loss}-{split}"
            fake_run(runs, name, "airbench94", loss, top1, 0.9, classes=classes,
                     **open_set | ({"scale": 8.0, "head_scale": 8.0, "margin": 0.1}
                                   if loss == "arcface" else {}))
            scores = {k: {"auroc": auroc - (0.0 if k == "max_logit" else 0.05), "oscr": 0.7}
                      for k in ("max_logit", "msp", "energy", "feature_norm", "knn")}
            update_metrics(runs, name, open_set=scores | {"closed_set_top1": top1},
                           reject={"unknown_rejected": 0.3, "test_rejected": 0.05},
                           calibration={"before": {"ece": 0.05, "nll": 0.3, "brier": 0.1},
                                        "after": {"ece": 0.01, "nll": 0.2, "brier": 0.09},
                                        "temperature": 1.5})
    text = write_report(runs, tmp_path / "results.md", "--no-plots")
    section = text.split("## Can the export reject images of unknown classes?")[1].split(
        "\n## ")[0]
    # Over the 4 distinct splits: softmax 80, 82, 83, 84 -> 82.25; arcface +2 on each.
    assert "| softmax | 4 | 82.25 ± 1.71 |" in section
    assert "| arcface s=8 m=0.1 monotonic | 4 | +2.00 (+2.00, +2.00) |" in section
    assert "helps" in section
    readme = (tmp_path / "README.md").read_text()
    block = readme.split("results:open-set")[1]
    assert ("| softmax | 4 | max_logit | 82.25 ± 1.71 | - | 30.00 ± 0.00 | 95.00 ± 0.00 | "
            "1.00 ± 0.00 |") in block
    assert ("| arcface s=8 m=0.1 monotonic | 4 | max_logit | 84.25 ± 1.71 | +2.00 (+2.00, "
            "+2.00) | 30.00 ± 0.00 | 94.00 ± 0.00 | 1.00 ± 0.00 |") in block
    assert ("the best head is arcface s=8 m=0.1 monotonic, at AUROC 84.25, the weakest "
            "softmax, at 82.25 (50 is chance); these runs ran before each head's score was "
            "chosen on validation") in block

    # Runs that keep per-image outputs (open_set_val) and serve each head's validated score
    # (softmax kNN at k = 10, ArcFace the norm) become the README's study once softmax and
    # another head each have two splits; the first runs are counted until then.
    for split in (0, 2, 3, 4):
        if split == 2:
            write_report(runs, tmp_path / "results.md", "--no-plots")
            block = (tmp_path / "README.md").read_text().split("results:open-set")[1]
            assert "| softmax | 4 | max_logit | 82.25 ± 1.71 |" in block
            assert ("docs/results.md. 2 runs of the study that keeps per-image outputs "
                    "(docs/results.md) are recorded; the table moves to it once softmax and "
                    "another head each have two splits.\n") in block
        for loss, score, k in (("softmax", "knn", 10), ("arcface", "feature_norm", None)):
            name = f"{loss}-{split}-seed1"
            fake_run(runs, name, "airbench94", loss, 0.9, 0.9, classes=sweep.split_classes(split),
                     seed=1, **open_set | ({"scale": 8.0, "head_scale": 8.0, "margin": 0.1}
                                           if loss == "arcface" else {}))
            served = {"knn@10" if k else score: {"auroc": 0.85 + split / 100 + (k is None) / 50}}
            update_metrics(runs, name, open_set=served | {"closed_set_top1": 0.9},
                           open_set_val={}, calibration={"after": {"ece": 0.02}},
                           reject={"score": score, "unknown_rejected": 0.5,
                                   "chosen_by": "the head's choice on validation"}
                           | ({"k": k} if k else {}))
    write_report(runs, tmp_path / "results.md", "--no-plots")
    block = (tmp_path / "README.md").read_text().split("results:open-set")[1]
    assert ("| softmax | 4 | knn (k = 10) | 87.25 ± 1.71 | - | 50.00 ± 0.00 | 90.00 ± 0.00 | "
            "2.00 ± 0.00 |") in block
    assert ("| arcface s=8 m=0.1 monotonic | 4 | feature_norm | 89.25 ± 1.71 | +2.00 (+2.00, "
            "+2.00) |") in block
    assert "at AUROC 89.25, the weakest softmax, at 87.25 (50 is chance).**" in block
    assert "runs of the study that keeps per-image outputs" not in block


def test_the_runs_table_shows_the_top1_of_the_logits_its_ece_is_of():
    """ECE is of the served logits: for a run that serves test-time augmentation the table's
    "top-1 served" is the augmented one."""
    from tables import runs_table

    run = seed_run("r", "softmax", 0, 0.90, 0.93)
    run["metrics"] |= {"tta": {"top1": 0.93, "served": True}, "epochs": 10,
                       "train_images_per_second": 1.0, "calibration": {
                           "before": {"ece": 0.05}, "after": {"ece": 0.01}, "temperature": 1.5}}
    table = runs_table([run | {"finished": "-"}])
    assert "| test top-1 | top-1 served | test mAP | test MAP@R | ECE | ECE after |" in table
    assert "| 90.00 | 93.00 | 90.00 | 80.00 | 5.00 | 1.00 | 1.500 |" in table


def test_selection_shows_the_last_epochs_angle_and_names_a_run_stuck_at_pi_minus_m(tmp_path):
    """cos(θ + m) has no slope at θ = π − m: an ArcFace run whose images end there is named
    under its table; one whose images end near its class centres, and softmax, are not."""
    from selection import selection
    from tables import load_runs

    runs = tmp_path / "runs"
    budget = dict(recipe="airbench", epochs=5, val_split=0.1, train_size=45000,
                  label_smoothing=0.2, scale=16.0, head_scale=16.0)
    for name, loss, margin, angles in (("stuck", "arcface", 0.3, (103.0, 163.0)),
                                       ("fine", "arcface", 0.1, (80.0, 31.0)),
                                       ("plain", "softmax", None, None)):
        fake_run(runs, name, "airbench94", loss, 0.9, 0.9, margin=margin, **budget)
        columns = "epoch,loss" + (",theta_y_mean" if angles else "")
        rows = [f"{epoch},{2.0 - epoch}" + (f",{angles[epoch]}" if angles else "")
                for epoch in (0, 1)]
        (runs / name / "log.csv").write_text("\n".join([columns, *rows]) + "\n")
    text = selection(load_runs(str(runs)), [], [], str(runs))
    assert "| final θ_y |" in text
    assert "| `arcface:s=16:m=0.3` | 0.05 | 0 | 50.00 | 50.00 | 50.00 | - | - | 163.00 |" in text
    assert "| `arcface:s=16:m=0.1` | 0.05 | 0 | 50.00 | 50.00 | 50.00 | - | - | 31.00 |" in text
    assert "| `softmax` | 0.025 | 0 | 50.00 | 50.00 | 50.00 | - | - | - |" in text
    assert ("Stuck where cos(θ + m) has no slope (final θ_y within 3° of π − m), so the target "
            "logit no longer pulls an image toward its class: `arcface:s=16:m=0.3` seed 0 "
            "(lr 0.05): 163.0°, π − m = 162.8°.\n") in text
    assert "m=0.1` seed" not in text


def test_plots_draws_a_runs_diagnostics_from_its_per_image_outputs_on_demand(tmp_path):
    """docs/ holds no per-run figure: plots.py draws one from the ledger's per-image outputs,
    a panel each for the confusion matrix and the target angles of a margin head."""
    import numpy as np
    from PIL import Image

    runs = tmp_path / "runs"
    fake_run(runs, "drawn", "mobilenetv2", "arcface", 0.9, 0.9, class_names=["a", "b", "c"])
    fake_run(runs, "old", "mobilenetv2", "arcface", 0.9, 0.9, class_names=["a", "b", "c"])
    np.savez(runs / "drawn" / "test_predictions.npz", labels=np.array([0, 1, 2, 2]),
             predicted=np.array([0, 1, 2, 1]), target_angle_deg=np.array([20.0, 30, 40, 95]))

    def draw(*names):
        return subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "plots.py"),
                               *names, "--ledger", str(runs), "--output-dir",
                               str(tmp_path / "out")], capture_output=True, text=True,
                              timeout=300)

    done = draw(str(runs / "drawn") + "/")  # a run's folder names it too
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == str(tmp_path / "out" / "drawn.png")
    assert Image.open(tmp_path / "out" / "drawn.png").size == (990, 414)  # 2 panels at 90 dpi
    for name, message in (("old", "plots.py: run 'old' kept no per-image outputs"),
                          ("nope", "plots.py: no finished run 'nope' in")):
        refused = draw(name)
        assert refused.returncode == 2
        assert refused.stderr.splitlines()[-1].startswith(message)
