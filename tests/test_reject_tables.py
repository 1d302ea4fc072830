"""What the documents show of the reject option: each head's served score, chosen on the
development runs' validation AUROC, and the far-away images each run rejects."""

import pytest
from fake_runs import fake_run, seed_run, update_metrics


def test_far_away_images_are_shown_with_each_runs_served_score():
    from readme_blocks import far_away

    run = seed_run("r", "arcface", 0, 0.9, 0.9)
    run["config"]["classes"] = "cat,dog"
    run["metrics"] |= {"reject": {"score": "feature_norm"}, "far_ood": {
        "noise": {"auroc": {"max_logit": 0.5, "feature_norm": 0.987}, "rejected": 0.95},
        "digits": {"auroc": {"max_logit": 0.4, "feature_norm": 0.75}, "rejected": 0.3}}}
    text = far_away([run, seed_run("old", "softmax", 0, 0.9, 0.9)])
    assert text.startswith("**Over 1 run, the reject option turns away between 30 % and "
                           "95 % of a set of far-away images.**")
    assert "| head | known classes | served score | digits: AUROC / rejected | noise: AUROC / " \
        "rejected |" in text
    assert "| arcface s=8 m=0.3 monotonic | 2 | feature_norm | 75.0 / 30 % | 98.7 / 95 % |" \
        in text
    assert far_away([]).startswith("**No run records far-away images yet.**")


def test_each_heads_served_score_is_its_best_on_validation_over_seeds(tmp_path):
    """The development runs (automobile, horse and truck held out; or horse alone, the first
    protocol's) at the head's recipe defaults choose its served score by mean validation
    AUROC; a run at another setting, or holding out a class some reporting split has as an
    unknown, has no say."""
    import served_scores
    from tables import load_runs

    runs = tmp_path / "runs"
    dev = dict(recipe="airbench", batch_size=1024, epochs=10, val_split=0.1, train_size=40500,
               learning_rate=0.1875, label_smoothing=0.2, tta=2, mixed_precision=True,
               weight_decay=0.0153 / 11.5, augment="airbench", embedding_dim=0,
               precise_bn_batches=0, gelu="fused", scale=8.0, head_scale=8.0, margin=0.1,
               classes=served_scores.KNOWN, limit_train=0)
    # Seed 0 (7 classes) prefers the norm, seed 1 (horse alone held out) kNN at k = 5; their
    # mean prefers the norm.
    for seed, norm, knn5 in ((0, 0.90, 0.80), (1, 0.84, 0.86)):
        classes = served_scores.KNOWN if seed == 0 else "airplane,automobile,bird,cat,deer," \
            "dog,frog,ship,truck"
        fake_run(runs, f"a{seed}", "airbench94", "arcface", 0.9, 0.9, seed=seed,
                 **dev | {"classes": classes})
        figures = {name: {"auroc": 0.5} for name in ("max_logit", "msp", "energy",
                                                     "projection", "projection_energy",
                                                     "projection_msp", "knn", "norm_knn")}
        figures |= {"feature_norm": {"auroc": norm}, "knn@5": {"auroc": knn5}} | {
            f"knn@{k}": {"auroc": 0.6} for k in (1, 10, 20, 50)}
        update_metrics(runs, f"a{seed}", open_set_val=figures)
    fake_run(runs, "other", "airbench94", "arcface", 0.9, 0.9, **dev | {"margin": 0.3})
    update_metrics(runs, "other", open_set_val={"knn@5": {"auroc": 0.99}})
    from sweep import split_classes

    fake_run(runs, "split0", "airbench94", "arcface", 0.9, 0.9, **dev | {
        "classes": split_classes(0)})  # its unknowns include reporting unknowns
    update_metrics(runs, "split0", open_set_val={"knn@5": {"auroc": 0.99}})
    loaded = load_runs(runs)
    best, means = served_scores.choices(loaded)[("airbench", "arcface")]
    assert best == ("feature_norm", 50) and means[("knn", 5)] == pytest.approx(0.83)
    table = served_scores.table(loaded)
    assert "| airbench | arcface s=8 m=0.1 monotonic | 2 | 50.00 |" in table
    assert "| knn (k = 5) |" in table.splitlines()[0]
    assert table.splitlines()[2].endswith("| 87.00 | 50.00 | 50.00 | 50.00 | 50.00 | 60.00 | "
                                          "83.00 | 60.00 | 60.00 | 60.00 | feature_norm |")


def test_a_run_recorded_before_its_validation_ece_gets_it_from_its_own_logits(tmp_path):
    """The selection table's validation ECE of a run whose metrics.json predates the figure
    is what the runner computes now from the same per-image validation logits."""
    import numpy as np
    from selection import with_validation_ece
    from tables import load_runs

    from tfmargin.runner.evaluation import calibration

    runs = tmp_path / "runs"
    fake_run(runs, "old", "airbench94", "softmax", 0.9, 0.9)
    rng = np.random.default_rng(0)
    outputs = {"labels": rng.integers(0, 10, 200), "logits": rng.normal(size=(200, 10)) * 3,
               "val_labels": rng.integers(0, 10, 100),
               "val_logits": (rng.normal(size=(100, 10)) * 3).astype(np.float16)}
    outputs["val_logits"][np.arange(100), outputs["val_labels"]] += 4  # mostly right
    np.savez(runs / "old" / "test_predictions.npz", **outputs)
    (run,) = load_runs(str(runs))
    filled = with_validation_ece(run, str(runs))["metrics"]["calibration"]["val"]
    assert filled == calibration(outputs)["val"] and filled["before"] > 0.0
    assert "calibration" not in run["metrics"]  # the record itself is not changed
    update_metrics(runs, "old", calibration={"val": {"before": 0.5, "after": 0.25}})
    (recorded,) = load_runs(str(runs))
    assert with_validation_ece(recorded, str(runs)) is recorded  # a recorded figure stands
