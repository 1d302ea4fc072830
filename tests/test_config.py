"""A run's configuration: validated with one-line messages, resolved once, named by its
identity, with each recipe's learning rate and weight decay."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "experiments", "run.py")


@pytest.mark.parametrize("changes,message", [
    (dict(loss="triplet"), "unknown loss 'triplet'"),
    (dict(scale=0.0), "scale must be a finite float > 0"),
    (dict(margin=-1.0), "margin must be >= 0"),
    (dict(embedding_dim=-3), "--embedding-dim must be >= 1"),
    (dict(strategy="tpu"), "unknown strategy 'tpu'"),
    (dict(ce_weight=1.0), "--ce-weight must be in [0, 1)"),
    (dict(far_ood="no/such/folder"), "--far-ood folder 'no/such/folder' does not exist"),
])
def test_config_validation_messages(changes, message):
    from tfmargin.runner.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        RunConfig(**changes).validate()


def test_the_learning_rate_defaults_to_the_heads_and_an_explicit_one_names_the_same_run():
    from tfmargin.runner.config import RunConfig
    from tfmargin.runner.recipes import peak_learning_rate

    assert RunConfig(loss="softmax").resolved_learning_rate() == 0.025
    for loss in ("arcface", "cosface", "sphereface", "normface", "combined"):
        assert RunConfig(loss=loss).resolved_learning_rate() == 0.05
    assert RunConfig(loss="softmax", learning_rate=0.1).resolved_learning_rate() == 0.1
    assert RunConfig.for_recipe("airbench", loss="softmax").resolved_learning_rate() == 0.1875
    assert peak_learning_rate(RunConfig(loss="softmax").resolved(), global_batch=256) == 0.05
    # A run given its head's rate is the default run (ledger runs keep their names), and
    # another rate is another run.
    assert RunConfig(loss="softmax", learning_rate=0.025).run_name() == \
        RunConfig(loss="softmax").run_name() != RunConfig(loss="softmax",
                                                        learning_rate=0.05).run_name()
    assert RunConfig(loss="softmax").identity()["learning_rate"] == 0.025


def test_learning_rate_scales_linearly_with_the_global_batch():
    from tfmargin.runner.config import RunConfig
    from tfmargin.runner.recipes import learning_rate_schedule

    config = RunConfig(learning_rate=0.05, epochs=2, warmup_epochs=1).resolved()
    peaks = [float(learning_rate_schedule(config, 10, global_batch)(10))  # end of warm-up
             for global_batch in (64, 128, 512)]
    assert peaks == pytest.approx([0.025, 0.05, 0.2])


def test_sgd_weight_decay_is_coupled_l2_as_in_pytorch():
    """Two Nesterov steps against PyTorch's SGD rule written out in NumPy."""
    import keras

    from tfmargin.optimizers import L2SGD

    lr, mu, wd = 0.1, 0.9, 0.05
    w0, b0 = np.array([[1.0, -2.0], [0.5, 3.0]]), np.array([1.0, 1.0])
    grads = [(np.array([[0.1, 0.2], [-0.3, 0.4]]), np.array([0.5, -0.5]))] * 2
    kernel, bias = keras.Variable(w0), keras.Variable(b0)
    optimizer = L2SGD(lr, l2=wd, momentum=mu, nesterov=True)
    for g, gb in grads:
        optimizer.apply([keras.ops.convert_to_tensor(g), keras.ops.convert_to_tensor(gb)],
                        [kernel, bias])
    w, b, buf_w, buf_b = w0.copy(), b0.copy(), None, None
    for g, gb in grads:  # torch.optim.SGD: d = g + wd*w; buf = mu*buf + d; d += mu*buf
        d = g + wd * w  # coupled: through the momentum; biases (rank 1) do not decay
        buf_w = d if buf_w is None else mu * buf_w + d
        buf_b = gb if buf_b is None else mu * buf_b + gb
        w = w - lr * (d + mu * buf_w)
        b = b - lr * (gb + mu * buf_b)
    np.testing.assert_allclose(kernel.numpy(), w, rtol=1e-6)
    np.testing.assert_allclose(bias.numpy(), b, rtol=1e-6)


def test_sweep_grids_for_the_converged_study():
    sys.path.insert(0, os.path.join(ROOT, "experiments"))
    try:
        import sweep
    finally:
        sys.path.pop(0)
    heads = sweep.parse_heads("softmax,paper,arcface:s=8:m=0.3:ls=0,cosface:s=16:m=0.1:f=easy")
    assert heads == [dict(loss="softmax"), sweep.PAPER_HEAD,
                     dict(loss="arcface", scale=8.0, margin=0.3, label_smoothing=0.0),
                     dict(loss="cosface", scale=16.0, margin=0.1, fallback="easy")]
    with pytest.raises(ValueError, match="unknown head setting 'x'"):
        sweep.parse_heads("arcface:x=1")
    with pytest.raises(ValueError, match="head setting 'ls' given twice in 'cosface:ls=0:ls=0'"):
        sweep.parse_heads("softmax,cosface:ls=0:ls=0")
    selection = sweep.grid("select")
    assert selection[0] == dict(backbone="airbench94", loss="softmax")
    assert len(selection) == 1 + 2 * len(sweep.SELECT_SCALES) * len(sweep.SELECT_MARGINS)
    assert sweep.grid("heads", heads=heads[:2]) == [
        dict(backbone="airbench94", loss="softmax"), dict(backbone="airbench94",
                                                          **sweep.PAPER_HEAD)]
    # The open-set protocol's five lists, as class names; lists 0 and 1 are one class set.
    open_set = sweep.grid("open-set", heads=heads[:1])
    assert [g["classes"] for g in open_set][2] == "automobile,cat,deer,dog,horse,truck"
    assert len(open_set) == 5 and all(g["loss"] == "softmax" for g in open_set)
    from tfmargin.runner.config import RunConfig

    names = {RunConfig(**g).run_name() for g in open_set}
    assert len(names) == 4  # lists 0 and 1: the same run
    # The development runs hold out only classes known in every reporting split.
    dev = sweep.grid("reject-dev")[0]["classes"].split(",")
    assert set(sweep.CIFAR10_CLASSES) - set(dev) == set(sweep.DEVELOPMENT_UNKNOWNS) == {
        c for c in sweep.CIFAR10_CLASSES
        if all(c in sweep.split_classes(s).split(",") for s in range(5))}


def test_every_ledger_run_keeps_its_name():
    """Each run in results/runs/ is named as its own record says: a refactor of the run's
    configuration may not rename a recorded run (a sweep would train it again)."""
    from tfmargin.runner.config import RunConfig

    ledger = os.path.join(ROOT, "results", "runs")
    names = sorted(os.listdir(ledger))
    assert len(names) >= 70
    for name in names:
        with open(os.path.join(ledger, name, "config.json")) as f:
            assert RunConfig.from_record(json.load(f)).run_name() == name


def test_a_resolved_configuration_is_frozen_and_reads_back_as_the_same_run():
    import dataclasses

    from tfmargin.runner.config import RunConfig

    config = RunConfig(loss="cosface", classes="truck,airplane", dataset="d")
    resolved = config.resolved()
    assert (resolved.margin, resolved.scale, resolved.learning_rate) == (0.1, 8.0, 0.05)
    assert resolved.name == config.run_name() and resolved.classes == "airplane,truck"
    with pytest.raises(dataclasses.FrozenInstanceError):
        resolved.margin = 0.3
    record = resolved.record()
    assert record["identity_version"] == 1 and record["margin"] == 0.1
    assert RunConfig.from_record(record).run_name() == config.run_name()
    assert config.differences(record) == []
    assert RunConfig(loss="cosface", margin=0.2, dataset="d").differences(record) == [
        "margin 0.1 -> 0.2"]


def test_a_heads_defaults_under_a_recipe_come_from_one_table(monkeypatch):
    """recipes.HEAD_DEFAULTS is read by the command line (and so --help), by
    RunConfig.for_recipe (and so the sweep) and by the learning rate's resolution."""
    import argparse

    from tfmargin.runner import cli, config, recipes

    monkeypatch.setitem(recipes.HEAD_DEFAULTS, "airbench", {"arcface": {"label_smoothing": 0.0}})
    parser = argparse.ArgumentParser()
    cli.add_run_arguments(parser)
    for loss, smoothing in (("arcface", 0.0), ("softmax", 0.2)):
        args = cli.parse_run_args(parser, ["--recipe", "airbench", "--loss", loss])
        assert args.label_smoothing == smoothing
        assert config.RunConfig.for_recipe("airbench", loss=loss).label_smoothing == smoothing
    assert cli.parse_run_args(parser, ["--loss", "arcface"]).label_smoothing == 0.0
    assert cli.parse_run_args(parser, ["--loss", "softmax"]).learning_rate == 0.025
    assert config.RunConfig(loss="softmax").resolved_learning_rate() == 0.025
    assert config.RunConfig(loss="cosface").resolved_learning_rate() == 0.05
