"""The benchmark's timing tools, and one step of the benchmark itself (no timing asserted)."""

import json
import os
import subprocess
import sys
import types

import pytest
from synthetic import write_image_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def test_paired_alternates_and_reports_the_median_ratio():
    from timing import paired

    calls = []
    a = iter([10.0, 9.0, 12.0, 11.0])  # warm-up 10, then 9, 12, 11
    b = iter([5.0, 3.0, 6.0, 5.0])
    result = paired(lambda: calls.append("a") or next(a), lambda: calls.append("b") or next(b),
                    rounds=3)
    assert calls == ["a", "b"] * 4  # warm-up, then strictly alternating
    assert result == {"ratio": 2.2, "a": 11.0, "b": 5.0, "rounds": 3}  # ratios 3, 2, 2.2


def test_allocator_set_ups_alternate_in_children_and_pair_with_the_default(monkeypatch,
                                                                         tmp_path):
    """Every round starts one child per set-up in the same order; a set-up's ratio is the
    median of its per-round ratios to that round's default, not a ratio of medians."""
    import allocator

    started, rates = [], iter([10.0, 12.0, 11.0, 20.0, 30.0, 10.0])
    monkeypatch.setattr(allocator, "ALLOCATORS", {"default": {}, "other": {"X": "1"}})

    def child(backbone, batch, steps, blocks, environment):
        started.append(environment)
        return {"rate": next(rates), "faults": 100.0 * len(started)}

    monkeypatch.setattr(allocator, "child_rate", child)
    result = allocator.measure("tinycnn", 16, 2, 3, rounds=3)
    assert started == [{}, {"X": "1"}] * 3
    assert result["other"]["ratio"] == pytest.approx(1.2)  # ratios 1.2, 1.5, 0.5
    assert result["other"]["rate"] == 12.0 and result["default"]["rate"] == 11.0
    assert result["default"]["faults"] == 300.0
    (tmp_path / "thp").write_text("always [madvise] never\n")
    assert allocator.transparent_huge_pages(tmp_path / "thp") == "madvise"
    assert allocator.transparent_huge_pages(tmp_path / "missing") is None
    # The section's rows: each set-up against the default, per backbone.
    from bench import Report

    report = Report()
    monkeypatch.setattr(allocator, "measure", lambda *a, **k: {
        "default": {"ratio": 1.0, "rate": 10.0, "faults": 900.0},
        "other": {"ratio": 1.25, "rate": 12.5, "faults": 9.0}})
    allocator.bench_allocator(report, types.SimpleNamespace(
        backbones=["tinycnn"], batch_size=16, steps=2, rounds=1))
    [row] = report.rows
    assert (row["name"], row["value"], row["unit"]) == (
        "tinycnn float32 step: other / default", 1.25, "x")
    assert row["note"].startswith("12.5 vs 10.0 img/s; minor page faults per step 9 vs 900; "
                                  "batch 16, kernel huge pages: ")


@pytest.mark.slow
def test_allocator_child_times_the_step_under_the_allocator_it_was_given():
    """One child, started with TensorFlow's best-fit allocator: a rate and its faults."""
    import allocator

    result = allocator.child_rate("tinycnn", 16, 2, 2, {"TF_CPU_ALLOCATOR_USE_BFC": "true"})
    assert result["rate"] > 0 and result["faults"] >= 0


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"])
def test_batchnorm_fused_by_xla_matches_keras_batchnorm(policy):
    """Outputs, gradients (input and beta) and moving statistics as Keras's own layer."""
    import keras
    import numpy as np
    import tensorflow as tf
    from bench_airbench import XlaBatchNormalization

    x = tf.constant(np.random.default_rng(0).normal(2.0, 3.0, (6, 5, 5, 4)), tf.float32)
    upstream = tf.constant(np.random.default_rng(1).normal(size=(6, 5, 5, 4)), tf.float32)
    results = []
    keras.config.set_dtype_policy(policy)
    try:
        for layer_class in (keras.layers.BatchNormalization, XlaBatchNormalization):
            layer = layer_class(momentum=0.6, epsilon=1e-12, scale=False)
            inputs = tf.cast(x, layer.compute_dtype)
            layer.build(inputs.shape)
            layer.beta.assign([0.1, -0.2, 0.3, 0.0])
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                y = layer(inputs, training=True)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * upstream)
            dx, dbeta = tape.gradient(loss, [inputs, layer.beta])
            results.append([tf.cast(v, tf.float32).numpy() for v in (
                y, dx, dbeta, layer.moving_mean, layer.moving_variance)])
    finally:
        keras.config.set_dtype_policy("float32")
    tolerance = 1e-5 if policy == "float32" else 2e-2
    for theirs, ours in zip(*results, strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=tolerance, atol=tolerance)


def test_full_run_row_is_fit_time_over_the_flop_bound_of_its_precision(tmp_path, monkeypatch):
    """--full-run: wall / (FLOPs per image x images / the day's peak of the run's
    precision), with the network built as the run built it (its GELU and BatchNorm: a run
    recorded before --batchnorm existed trained with Keras's)."""
    import bench
    import bench_airbench

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "mixed_precision": True, "train_size": 50000, "gelu": "fused",
        "machine": {"model": "Some CPU", "family": "6/167"}}))
    (run / "metrics.json").write_text(json.dumps({
        "epochs": 10, "wall_seconds": 1500.0, "top1": 0.9, "tta": {"top1": 0.91}}))
    peaks, built = [], []
    monkeypatch.setattr(bench_airbench, "machine_peak",
                        lambda report, dtype: peaks.append(dtype) or 500.0)
    monkeypatch.setattr(bench_airbench, "airbench_setup", lambda data, args, steps, **kw:
                        built.append(kw) or types.SimpleNamespace(model="network"))
    monkeypatch.setattr(bench_airbench, "training_flops_per_image",
                        lambda model: 0.5e9 if model == "network" else None)
    report = bench.Report()
    bench_airbench.bench_full_run(report, None, None, str(run))
    assert peaks == [bench_airbench.tf.bfloat16]
    assert built == [{"mixed_precision": True, "gelu": "fused", "batchnorm": "keras"}]
    (row,) = report.rows
    # 0.5 GFLOP x 500,000 images / 500 GFLOP/s = 500 s; 1,500 s / 500 s = 3.
    assert row["value"] == pytest.approx(3.0) and row["passed"] is False
    assert row["note"].startswith("1500 s fit vs 500 s bound (0.500 GFLOP/image x 500000")
    assert "with TTA 91.00 %" in row["note"] and "Some CPU family 6/167" in row["note"]


def test_conv_peak_times_distinct_convolutions_in_either_precision():
    import tensorflow as tf
    from timing import conv_peak

    for dtype in (tf.float32, tf.bfloat16):
        rate = conv_peak(dtype, batch=2, size=5, channels=(4, 8), repeats=2, trials=1)
        assert 0 < rate < 1e6  # GFLOP/s: finite, positive


def test_training_flops_of_a_dense_layer_are_counted_forward_and_backward():
    import keras
    from timing import training_flops_per_image

    inputs = keras.Input((8,))
    model = keras.Model(inputs, keras.layers.Dense(4, use_bias=False)(inputs))
    flops = training_flops_per_image(model, batch_size=2)
    # Forward x @ W: 2 * 8 * 4 per image; the kernel's gradient x^T @ g: the same again.
    assert 128 <= flops <= 160


def test_profiled_ops_are_attributed_to_layer_kinds_the_optimizer_or_the_rest():
    import bench
    import bench_profile
    import keras

    conv, norm = keras.layers.Conv2D(4, 3, name="block1_conv1"), keras.layers.ReLU(name="act")
    model = types.SimpleNamespace(backbone=types.SimpleNamespace(layers=[conv, norm]),
                                  optimizer=types.SimpleNamespace(name="l2sgd_1"))
    owner = bench_profile.op_owners(model)
    assert owner("StatefulPartitionedCall/gradient_tape/margin_classifier_1/airbench94_1/"
                 "block1_conv1_1/convolution/Conv2DBackpropFilter") == "layer Conv2D"
    assert owner("StatefulPartitionedCall/margin_classifier/airbench94/act/Relu") == "layer ReLU"
    assert owner("StatefulPartitionedCall/l2sgd/Mul_50") == "optimizer"
    assert owner("StatefulPartitionedCall/margin_classifier_1/normalize_1/truediv") == \
        "the rest (input normalisation, head, loss)"
    assert owner("") == "XLA-compiled functions (FusedGELU)"
    report = bench.Report()
    bench_profile.add_op_rows(report, "x", {"Conv2D": 30.0, "Mul": 10.0, "Cast": 5.0,
                                            "Sub": 5.0}, 2, top=2)
    assert [(r["name"], r["value"]) for r in report.rows] == [("x: Conv2D", 15.0),
                                                              ("x: Mul", 5.0)]
    assert report.rows[0]["note"] == "60% of 25 ms of op time per step"


def test_onednn_verbose_lines_after_the_marker_are_summed_per_step_and_problem():
    import bench_profile
    from onednn import MARKER, build, primitive_times, wall_ms

    problem = "mb8_ic4oc16_ih7oh7kh3sh1dh0ph1_iw7ow7kw3sw1dw0pw1"
    formats = "src:bf16::blocked:acdb::f0 wei:bf16:a:blocked:ABcd16b16a::f0"
    conv = (f"onednn_verbose,v1,primitive,exec,cpu,convolution,jit_bf16:avx512_core_bf16,"
            f"backward_weights,{formats},,alg:convolution_direct,{problem},")
    text = "\n".join([
        "onednn_verbose,v1,info,oneDNN v3.7.3 (commit N/A)",
        "onednn_verbose,v1,info,cpu,runtime:threadpool,nthr:2",
        conv + "9.0",  # warm-up, before the marker: not counted
        MARKER,
        conv + "2.0",
        "onednn_verbose,v1,primitive,create:cache_miss,cpu,convolution,x,y,z,,,p,0.5",
        conv + "4.0",
        "onednn_verbose,exec,cpu,reorder,jit:uni,undef,src:f32 dst:bf16,,,4x4x3x3,0.5",
        "an unrelated line, with commas",
        "wall ms per step: 12.5"])
    times = primitive_times(text, steps=2)
    assert set(times) == {("convolution", "backward_weights", problem),
                          ("reorder", "undef", "4x4x3x3")}
    entry = times[("convolution", "backward_weights", problem)]
    assert entry["ms"] == 3.0 and entry["count"] == 1.0
    assert entry["impls"] == {("jit_bf16:avx512_core_bf16", formats)}
    assert times[("reorder", "undef", "4x4x3x3")]["ms"] == 0.25
    assert wall_ms(text) == 12.5 and wall_ms("no timing") is None
    assert build(text) == "oneDNN v3.7.3, threadpool runtime, 2 threads"
    assert build("onednn_verbose,info,oneDNN v3.12.0 (commit 80afa71)\n"
                 "onednn_verbose,info,cpu,runtime:OpenMP,nthr:16") == \
        "oneDNN v3.12.0, OpenMP runtime, 16 threads"
    assert build(conv + "1.0") is None
    assert bench_profile.conv_label(problem) == "3x3 4->16 at 7x7"


@pytest.mark.slow
def test_benchmark_runs_its_sections_for_one_round(tmp_path):
    data = write_image_folder(tmp_path / "data", num_classes=3, per_class=48, test_per_class=8)
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "bench.py"), "--sections",
         "targets,budget,accuracy,peer,profile,primitives", "--dataset", data,
         "--backbones", "tinycnn",
         "--plain-backbone", "tinycnn", "--steps", "2", "--peer-steps", "2", "--rounds", "1",
         "--batch-size", "16", "--airbench-batch", "32", "--accuracy-train", "64",
         "--accuracy-epochs", "1", "--json", str(out), "--markdown", str(tmp_path / "b.md"),
         "--peer-python", sys.executable],  # the same PyTorch again, as another build's path
        capture_output=True, text=True, timeout=1200, env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    # Whether the machine was shared while it ran, in the record and its Markdown.
    others = report["cpu_share_of_other_processes"]
    assert 0.0 <= others <= 1.0
    assert f"other processes used {100 * others:.0f} % of the CPU meanwhile)" in \
        (tmp_path / "b.md").read_text()
    sections = {row["section"] for row in report["rows"]}
    assert {"head", "input", "machine", "utilization", "vs plain", "peer"} <= sections
    budget = {r["name"]: r for r in report["rows"] if r["section"] == "budget"}
    hours = budget["tinycnn: one main-command run's training, 45,000 x 5 epochs"]
    step = budget["tinycnn: bfloat16 / float32 training step"]
    rate = float(hours["note"].split(", ")[1].split(" img/s")[0])
    assert hours["value"] == pytest.approx(45_000 * 5 / rate / 3600, rel=0.01)
    assert step["unit"] == "x" and "img/s, batch 128" in step["note"]
    accuracy = [r for r in report["rows"] if r["name"].startswith("tinycnn test top-1")]
    assert len(accuracy) == 1 and "64 train images x 1 epochs, 24 test images" in \
        accuracy[0]["note"]
    peer = [r for r in report["rows"] if r["section"] == "peer"]
    try:
        import torch  # noqa: F401
    except ImportError:
        assert len(peer) == 1 and peer[0]["note"].startswith("skipped: PyTorch is not")
    else:
        from tfmargin.runner.config import RunConfig

        recipe, main = RunConfig.for_recipe("airbench"), RunConfig()
        other = {"keras": "fused", "fused": "keras"}
        airbench = f"--gelu {recipe.gelu} --batchnorm"
        assert [r["name"].split(":")[0] for r in peer] == [
            f"airbench94 float32, {airbench} {recipe.batchnorm}",
            f"airbench94 bfloat16, {airbench} {recipe.batchnorm}",
            f"airbench94 bfloat16, {airbench} {other[recipe.batchnorm]}",
            f"mobilenetv2 float32, --batchnorm {main.batchnorm}",
            f"mobilenetv2 float32, --batchnorm {other[main.batchnorm]}"]
        assert all(r["value"] > 0 and r["target"] for r in peer)
        layers = [r["name"] for r in report["rows"] if r["section"] == "peer layer"]
        assert "GELU fused by XLA at 15x15x64 bfloat16: Keras / PyTorch, forward+backward" \
            in layers
    profile = [r["name"] for r in report["rows"] if r["section"] == "profile"]
    assert "airbench94 bfloat16, --batchnorm fused: wall time per step, profiled" in profile
    assert "airbench94 bfloat16, --batchnorm keras: layer BatchNormalization" in profile
    assert "airbench94 bfloat16, --batchnorm fused: layer FusedBatchNormalization" in profile
    assert report["machine"]["model"] and "| peer |" in (tmp_path / "b.md").read_text()
    primitives = {r["name"]: r for r in report["rows"] if r["section"] == "primitives"}
    if len(primitives) == 1:  # no PyTorch, or oneDNN not in use: a stated reason
        assert next(iter(primitives.values()))["note"].startswith("skipped: ")
    else:
        for propagation in ("forward_training", "backward_data", "backward_weights", "all"):
            assert primitives[f"convolutions, {propagation}: Keras / PyTorch speed"]["value"] > 0
            other = primitives[f"convolutions, {propagation}: Keras / the other PyTorch speed"]
            assert other["value"] > 0 and " ms per step (PyTorch " in other["note"]
        assert primitives["airbench94 bfloat16 step, wall time: the other PyTorch"][
            "note"].startswith(f"{sys.executable}; oneDNN v")
        assert "backward_weights 3x3 256->256 at 3x3: Keras / PyTorch speed" in primitives
        assert primitives["Keras / PyTorch step speed with PyTorch's convolution times"][
            "target"] == ">= 1.2"
