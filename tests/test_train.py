import json
import os
import subprocess
import sys

import numpy as np
import pytest
from cli_runs import ROOT, run_cli
from synthetic import write_image_folder


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("shapes"), num_classes=4, per_class=48,
                              test_per_class=16)


def test_cli_end_to_end_writes_the_run_directory(shapes, tmp_path):
    result = run_cli("--backbone", "tinycnn", "--loss", "arcface", "--dataset", shapes,
                     "--mix", "cutmix", "--epochs", "2", "--batch-size", "32", "--far-ood", "",
                     "--reject-score", "feature_norm", "--runs-dir", str(tmp_path),
                     "--name", "smoke", "--export-dir", str(tmp_path / "exports"))
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "smoke"
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert config["backbone"] == "tinycnn" and config["num_classes"] == 4
    # The dataset as typed and its fingerprint are its provenance, not this machine's path.
    assert "data_source" not in config and config["test_split_seed"] == 0
    assert config["class_names"] == ["class_0", "class_1", "class_2", "class_3"]
    # 48 per class, 10 % (5 per class) held out for validation
    assert config["split_sizes"] == {"train": 172, "val": 20, "test": 64}
    assert config["global_batch"] == 32 and config["peak_learning_rate"] == 0.05 / 4
    assert metrics["epochs"] == 2 and metrics["test_size"] == 64
    for key in ("top1", "top5", "mAP", "precision_at_1", "map_at_r"):
        assert 0.0 <= metrics[key] <= 1.0 and 0.0 <= metrics["val"][key] <= 1.0
    assert metrics["top5"] == 1.0  # 4 classes
    assert metrics["train_images_per_second"] > 0 and metrics["wall_seconds"] > 0
    assert metrics["resumed_at_epoch"] == 0
    assert 0.0 <= metrics["cpu_share_of_other_processes"] <= 1.0
    # Served plain, and reported with airbench's six test-time views beside it.
    assert metrics["tta"]["level"] == 2 and metrics["tta"]["served"] is False
    # Far-away images: the generated sets, each scored and put to the reject option.
    assert set(metrics["far_ood"]) == {"flat", "noise", "digits"}
    rejected = metrics["far_ood"]["digits"]["rejected"]
    assert "images of no known class it rejects: flat " in result.stdout
    assert f"digits {100 * rejected:.0f} %" in result.stdout
    assert 0.0 <= metrics["tta"]["top1"] <= 1.0
    assert f"% ({100 * metrics['tta']['top1']:.2f} % with TTA)" in result.stdout
    log = (run_dir / "log.csv").read_text().splitlines()
    assert log[0].startswith("epoch") and "theta_y_mean" in log[0] and len(log) == 3
    assert os.listdir(run_dir / "logs")
    # It says what it found and is about to do before training, and why the precision.
    assert f"data: {shapes}: 4 classes (class_0, class_1, class_2, class_3); 172 training, " \
        "20 validation, 64 test images" in result.stdout
    assert "model: tinycnn with an arcface head (s=8.0, m=0.1), label smoothing 0; standard " \
        "recipe, 2 epoch(s) of 5 steps at batch 32 (10 steps)" in result.stdout
    assert "precision: float32 (auto: " in result.stdout
    assert "note: only 10 optimizer steps in all" in result.stdout
    assert "after training: choosing BatchNorm statistics and evaluating" in result.stdout
    # It says what it reached, where it wrote, and what to type next.
    assert "smoke: test top-1 " in result.stdout
    assert f"run directory: {run_dir}" in result.stdout
    assert f"export: {tmp_path / 'exports' / 'smoke'}" in result.stdout
    assert f"tensorboard --logdir {run_dir / 'logs'}" in result.stdout
    assert f"python experiments/predict.py {tmp_path / 'exports' / 'smoke'}" in result.stdout
    assert "I0000" not in result.stderr and "cuInit" not in result.stderr
    # The BatchNorm statistics were chosen on validation, and the summary says which.
    batchnorm = metrics["batchnorm"]
    assert batchnorm["chosen_on"] == "validation"
    assert batchnorm["recalibration_batches"] == 6  # all 172 training images, 32 a batch
    val = batchnorm["val_top1"]
    assert batchnorm["chosen"] == ("recalibrated" if val["recalibrated"] > val["moving"]
                                   else "moving")
    assert f"BatchNorm statistics: {batchnorm['chosen']} (validation top-1 " in result.stdout
    assert sorted(os.listdir(tmp_path / "exports" / "smoke")) == [
        "class_names.txt", "model.keras", "savedmodel", "serving.json"]
    assert os.readlink(tmp_path / "exports" / "latest") == "smoke"
    # The reject option thresholds the embedding's norm, as asked, chosen on validation, and
    # the SavedModel serves that score and rejects at the recorded threshold.
    reject = metrics["reject"]
    assert (reject["score"], reject["chosen_on"], config["reject_score"]) == (
        "feature_norm", "validation", "feature_norm")
    serving = json.loads((tmp_path / "exports" / "smoke" / "serving.json").read_text())
    assert serving["reject"]["score"] == "feature_norm"
    import tensorflow as tf

    from tfmargin.data import load_dataset

    val = np.stack([x.numpy() for x, _ in load_dataset(shapes).val])
    exported = tf.saved_model.load(str(tmp_path / "exports" / "smoke" / "savedmodel"))
    served = exported.serve(tf.constant(val))
    import tfmargin

    plain = tfmargin.load_model(tmp_path / "exports" / "smoke" / "model.keras")
    norms = np.linalg.norm(plain.embedding(val.astype("float32"), training=False), axis=1)
    np.testing.assert_allclose(served["score"].numpy(), norms, rtol=1e-4)
    np.testing.assert_array_equal(served["rejected"].numpy(),
                                  served["score"].numpy() < reject["threshold"])
    assert float(np.mean(served["rejected"].numpy())) == pytest.approx(reject["val_rejected"])
    assert config["code"]["commit"] and isinstance(config["code"]["dirty"], bool)
    assert set(config["versions"]) >= {"python", "tensorflow", "keras", "numpy"}
    assert config["machine"]["model"] and len(config["data_fingerprint"]) == 64
    assert metrics["finished_at"].endswith("Z") and "calibration" in metrics


@pytest.mark.slow
def test_arcface_learns_shapes_and_inference_mode_holds_up(shapes, tmp_path):
    """MobileNetV2 with its real BatchNorms: test accuracy far above chance (25%).

    Without PreciseBatchNorm this run tested at 50% while training at 96%.
    """
    result = run_cli("--backbone", "mobilenetv2", "--dataset", shapes, "--epochs", "5",
                     "--batch-size", "32", "--runs-dir", str(tmp_path), "--name", "learn",
                     "--export", "none",
                     "--learning-rate", "0.05")
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "learn" / "metrics.json").read_text())
    assert metrics["top1"] >= 0.8, metrics
    assert metrics["mAP"] >= 0.8, metrics
    assert metrics["top1"] >= metrics["train_accuracy_last_epoch"] - 0.15, metrics


MIRRORED = r"""
import csv, json, sys, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
from tfmargin.runner.config import RunConfig
from tfmargin.runner.train import train
results, loss = {}, sys.argv[3]
for strategy, batch in (("default", 16), ("mirrored", 8)):
    name = f"{loss}-{strategy}"
    config = RunConfig(backbone="tinycnn", loss=loss, dataset=sys.argv[1], epochs=2,
                       batch_size=batch, strategy=strategy, augment="none",
                       runs_dir=sys.argv[2], name=name, embedding_dim=0,
                       learning_rate=0.05, export="none", projector_samples=0)
    metrics = train(config)
    model = keras.saving.load_model(f"{sys.argv[2]}/{name}/inference.keras")
    probe = np.random.default_rng(0).uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    log = list(csv.DictReader(open(f"{sys.argv[2]}/{name}/log.csv")))
    results[name] = {"metrics": metrics, "logits": model.predict(probe, verbose=0).tolist(),
                     "first_epoch_loss": float(log[0]["loss"]),
                     "replicas": json.load(open(f"{sys.argv[2]}/{name}/config.json"))
                     ["replicas"]}
print("RESULT" + json.dumps(results))
"""


@pytest.mark.slow
def test_mirrored_over_two_cpus_matches_one_device(shapes, tmp_path):
    """Same data order, labels and updates with two replicas as with one device.

    Softmax logits agree tightly after two epochs. A margin head's training is
    too sensitive for that (arccos gradients near cos = 1 are ~1e3 * s, so a
    float32 reduction-order difference can move the end point); its label
    input through the distributed pipeline is checked on the first epoch's
    loss and on the test top-1.
    """
    out = {}
    for loss in ("softmax", "arcface"):  # (TF's collective keys clash across models)
        result = subprocess.run([sys.executable, "-c", MIRRORED, shapes, str(tmp_path), loss],
                                capture_output=True, text=True, cwd=ROOT, timeout=600,
                                env={**os.environ, "CI": "1"})
        assert result.returncode == 0, result.stderr[-3000:]
        out |= json.loads(result.stdout.split("RESULT", 1)[1])
    for loss in ("softmax", "arcface"):
        one, two = out[f"{loss}-default"], out[f"{loss}-mirrored"]
        assert one["replicas"] == 1 and two["replicas"] == 2
        assert two["first_epoch_loss"] == pytest.approx(one["first_epoch_loss"], rel=2e-3)
        assert two["metrics"]["top1"] == pytest.approx(one["metrics"]["top1"], abs=1 / 64)
    np.testing.assert_allclose(out["softmax-mirrored"]["logits"],
                               out["softmax-default"]["logits"], atol=1e-3)


def test_nan_loss_stops_with_advice_and_keeps_no_bad_checkpoint(shapes, tmp_path):
    result = run_cli("--backbone", "tinycnn", "--dataset", shapes, "--epochs", "3",
                     "--batch-size", "32", "--learning-rate", "1e12", "--runs-dir",
                     str(tmp_path), "--name", "nan", "--export", "none")
    assert result.returncode == 3
    error = [line for line in result.stderr.splitlines() if line.startswith("run.py: error:")]
    assert len(error) == 1 and "loss became NaN in epoch 1" in error[0]
    assert "Try a smaller --learning-rate or --scale" in error[0]
    assert "no weights are kept" in error[0]
    assert not (tmp_path / "nan" / "checkpoints" / "trained.weights.h5").exists()
    assert not (tmp_path / "nan" / "metrics.json").exists()
    assert not (tmp_path / "nan" / "backup").exists()  # a rerun starts afresh


def test_finished_run_is_not_overwritten_silently(shapes, tmp_path):
    args = ["--backbone", "tinycnn", "--dataset", shapes, "--epochs", "1", "--batch-size", "32",
            "--runs-dir", str(tmp_path), "--name", "once", "--export", "none",
            "--projector-samples", "0"]
    assert run_cli(*args).returncode == 0
    metrics = (tmp_path / "once" / "metrics.json").read_text()
    # The same command (with or without --resume) reports the finished run again.
    for again in (run_cli(*args), run_cli(*args, "--resume")):
        assert again.returncode == 0, again.stderr[-2000:]
        assert "finished at " in again.stdout and "its recorded result follows" in again.stdout
        assert "once: test top-1 " in again.stdout and "Epoch 1/1" not in again.stdout
        assert (tmp_path / "once" / "metrics.json").read_text() == metrics
    # --overwrite with data that fails keeps the finished run
    broken = run_cli(*[a if a != shapes else shapes + "-missing/" for a in args], "--overwrite")
    assert broken.returncode == 2 and "does not exist" in broken.stderr
    assert (tmp_path / "once" / "metrics.json").read_text() == metrics


EVERY_LOSS = r"""
import runpy, sys
from tfmargin.names import HEADS
dataset, runs = sys.argv[1:3]
for loss in HEADS:  # no head flag: each loss with its registry defaults
    sys.argv = ["run.py", "--loss", loss, "--backbone", "tinycnn", "--dataset", dataset,
                "--epochs", "1", "--batch-size", "32", "--embedding-dim", "8", "--export", "none",
                "--projector-samples", "0", "--runs-dir", runs]
    runpy.run_path("experiments/run.py", run_name="__main__")
"""


@pytest.mark.slow
def test_every_loss_runs_with_its_defaults(shapes, tmp_path):
    done = subprocess.run([sys.executable, "-c", EVERY_LOSS, shapes, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    names = sorted(os.listdir(tmp_path))
    assert len(names) == 6 and all((tmp_path / n / "metrics.json").exists() for n in names)
    margins = {json.loads((tmp_path / n / "config.json").read_text())["loss"]:
               json.loads((tmp_path / n / "config.json").read_text())["margin"] for n in names}
    assert margins == {"softmax": None, "arcface": 0.1, "cosface": 0.1, "sphereface": 1.35,
                       "combined": [1.0, 0.3, 0.2], "normface": 0.0}


@pytest.mark.slow
def test_a_sweep_at_another_learning_rate_trains_new_runs_and_a_name_clash_is_refused(
        shapes, tmp_path):
    sweep = os.path.join(ROOT, "experiments", "sweep.py")
    common = ["heads", "--heads", "softmax,arcface", "--dataset", shapes, "--backbones",
              "tinycnn", "--epochs", "1", "--runs-dir", str(tmp_path), "--batch-size", "32",
              "--far-ood", "none"]
    env = {**os.environ, "CI": "1"}
    first = subprocess.run([sys.executable, sweep, *common], capture_output=True, text=True,
                           env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    before = set(os.listdir(tmp_path))
    again = subprocess.run([sys.executable, sweep, *common, "--learning-rate", "0.01"],
                           capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 runs in grid heads (0 already finished)" in again.stdout
    new = set(os.listdir(tmp_path)) - before
    assert len(new) == 2 and {json.loads((tmp_path / n / "config.json").read_text())
                              ["learning_rate"] for n in new} == {0.01}
    # The same --name with another setting: refused, naming the setting, nothing changed.
    args = ["--backbone", "tinycnn", "--dataset", shapes, "--epochs", "1", "--batch-size", "32",
            "--runs-dir", str(tmp_path), "--name", "fixed", "--export", "none",
            "--projector-samples", "0"]
    assert run_cli(*args).returncode == 0
    metrics = (tmp_path / "fixed" / "metrics.json").read_text()
    clash = run_cli(*args, "--learning-rate", "0.2", "--resume")
    assert clash.returncode == 2
    error = [line for line in clash.stderr.splitlines() if line.startswith("run.py: error:")]
    assert len(error) == 1 and "was made with other settings (learning_rate 0.05 -> 0.2)" \
        in error[0], clash.stderr[-2000:]
    assert (tmp_path / "fixed" / "metrics.json").read_text() == metrics


FRESH_64 = r"""
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
spec = model.serve.concrete_functions[0].structured_input_signature[0][0]
images = np.load(sys.argv[2])
classes = model.serve(tf.constant(images))["class_id"].numpy().tolist()
print("SHAPE", tuple(spec.shape), "CLASSES", classes)
"""


@pytest.mark.slow
def test_a_64_pixel_folder_end_to_end_with_statistics_from_its_images(tmp_path):
    """--image-size 64: the model, its normalisation (from the training images, not
    CIFAR-10's) and the SavedModel all at 64x64."""
    data = write_image_folder(tmp_path / "data", num_classes=3, per_class=30, size=64,
                              test_per_class=6)
    result = run_cli("--backbone", "tinycnn", "--loss", "cosface", "--dataset", data,
                     "--image-size", "64", "--epochs", "2", "--batch-size", "16",
                     "--runs-dir", str(tmp_path / "runs"), "--name", "px64",
                     "--export-dir", str(tmp_path / "exports"), "--projector-samples", "12")
    assert result.returncode == 0, result.stderr[-3000:]
    import tfmargin

    # The export's model.keras is the run's one copy of the model (no inference.keras).
    assert not (tmp_path / "runs" / "px64" / "inference.keras").exists()
    model = tfmargin.load_model(tmp_path / "exports" / "px64" / "model.keras")
    assert model.input_shape == (None, 64, 64, 3)
    normalize = model.get_layer("normalize")
    from tfmargin.data import channel_statistics, load_dataset

    train = load_dataset(data, image_size=64).train
    mean, variance = channel_statistics(train)
    np.testing.assert_allclose(np.ravel(normalize.mean), mean, rtol=1e-5)
    np.testing.assert_allclose(np.ravel(normalize.variance), variance, rtol=1e-5)
    assert abs(mean[0] - 125.3) > 5  # not CIFAR-10's red mean

    images = np.stack([x.numpy() for x, _ in load_dataset(data, image_size=64).test.take(4)])
    np.save(tmp_path / "images.npy", images)
    fresh = subprocess.run([sys.executable, "-c", FRESH_64,
                            str(tmp_path / "exports" / "px64" / "savedmodel"),
                            str(tmp_path / "images.npy")], capture_output=True, text=True,
                           timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "SHAPE (None, 64, 64, 3)" in fresh.stdout
    expected = np.argmax(model.predict(images.astype("float32"), verbose=0), axis=1)
    assert f"CLASSES {expected.tolist()}" in fresh.stdout


MIRRORED_BN = r"""
import json, sys, tensorflow as tf
tf.config.set_logical_device_configuration(tf.config.list_physical_devices("CPU")[0],
    [tf.config.LogicalDeviceConfiguration()] * 2)
import keras, numpy as np
import tfmargin
from tfmargin.runner.config import RunConfig
from tfmargin.data import load_dataset
from tfmargin.runner.train import train
config = RunConfig(backbone="tinycnn", dataset=sys.argv[1], epochs=1, batch_size=8,
                   embedding_dim=8, precise_bn_batches=2, runs_dir=sys.argv[2], name="bn",
                   export="none", projector_samples=0, val_split=0.0)  # always recalibrated
metrics = train(config)  # the default strategy: mirrored, here over two logical CPUs
model = tfmargin.load_model(f"{sys.argv[2]}/bn/inference.keras")
projection = keras.Model(model.input, model.get_layer("projection").output)
batches = [x.numpy().astype("float32")
           for x, _ in load_dataset(sys.argv[1], val_split=0.0).train.batch(16)]
stats = [projection(b, training=True).numpy() for b in batches[:2]]
bn = model.get_layer("embedding_bn")
print("RESULT", json.dumps({
    "replicas": json.load(open(f"{sys.argv[2]}/bn/config.json"))["replicas"],
    "mean": bool(np.allclose(bn.moving_mean.numpy(), np.mean([s.mean(0) for s in stats], 0),
                             rtol=1e-4, atol=1e-5)),
    "variance": bool(np.allclose(bn.moving_variance.numpy(),
                                 np.mean([s.var(0) for s in stats], 0), rtol=1e-3, atol=1e-5)),
    "chosen": metrics["batchnorm"]["chosen"], "top1": metrics["top1"]}))
"""


@pytest.mark.slow
def test_default_mirrored_run_with_batchnorm_recalibrates_exactly(shapes, tmp_path):
    """The default configuration's path: a BatchNorm network under MirroredStrategy with two
    replicas, then precise BatchNorm over whole global batches of training images."""
    done = subprocess.run([sys.executable, "-c", MIRRORED_BN, shapes, str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "CI": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT", 1)[1])
    assert result["replicas"] == 2 and result["mean"] and result["variance"], result
    assert result["chosen"] == "recalibrated"


def test_an_open_set_run_keeps_per_image_outputs_that_give_its_figures(shapes, tmp_path):
    """Classes typed in any order, trained, then resumed as finished; its
    test_predictions.npz holds the per-image outputs of every split, and the figures of
    metrics.json follow from them alone."""
    from PIL import Image

    from tfmargin.runner.evaluation import metrics_from_outputs
    from tfmargin.scores import LEGACY_KNN_K

    far = tmp_path / "far" / "clothes"  # a --far-ood folder: 7 images of no class
    far.mkdir(parents=True)
    for i in range(7):
        Image.new("RGB", (28, 28), (30 * i, 0, 0)).save(far / f"{i}.png")
    args = ["--backbone", "tinycnn", "--dataset", shapes, "--epochs", "1", "--batch-size",
            "32", "--runs-dir", str(tmp_path), "--name", "open", "--export", "none",
            "--projector-samples", "0", "--classes", "class_2,class_0,class_1",
            "--far-ood", str(far)]
    assert run_cli(*args).returncode == 0
    run = tmp_path / "open"
    config = json.loads((run / "config.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert config["classes"] == "class_0,class_1,class_2"
    resumed = run_cli(*args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text()) == metrics
    # 48 per class: 5 of class_3's training images are validation unknowns, never a test one.
    assert config["split_sizes"] == {"train": 129, "val": 15, "test": 48,
                                     "unknown_test": 16, "unknown_val": 5}
    outputs = dict(np.load(run / "test_predictions.npz"))
    shapes_of = {key: value.shape for key, value in outputs.items()}
    assert shapes_of == {
        "labels": (48,), "predicted": (48,), "target_angle_deg": (48,), "logits": (48, 3),
        "embedding_norm": (48,), "knn": (48, 5), "val_labels": (15,), "val_logits": (15, 3),
        "val_embedding_norm": (15,), "val_knn": (15, 5), "unknown_logits": (16, 3),
        "unknown_embedding_norm": (16,), "unknown_knn": (16, 5), "unknown_val_logits": (5, 3),
        "unknown_val_embedding_norm": (5,), "unknown_val_knn": (5, 5),
        "far_logits": (907, 3), "far_embedding_norm": (907,), "far_knn": (907, 5),
        "far_set": (907,), "far_set_names": (4,)}
    assert outputs["far_set_names"].tolist() == ["flat", "noise", "digits", "clothes"]
    assert np.bincount(outputs["far_set"]).tolist() == [300, 300, 300, 7]
    assert outputs["logits"].dtype == np.float32  # the export's precision (evaluation.OUTPUT_DTYPE)
    # The served score is the run's setting; a kNN score's k is recorded with it.
    again = metrics_from_outputs(outputs, tta_level=0, scale=config["head_scale"],
                                 reject_score=config["reject_score"],
                                 knn_k=metrics["reject"].get("k", LEGACY_KNN_K))
    metrics["reject"].pop("chosen_by")  # what chose the score: the run's settings
    assert metrics["far_ood"]["clothes"]["size"] == 7
    assert 0 <= metrics["far_ood"]["digits"]["auroc"]["max_logit"] <= 1
    for key in ("top1", "top5", "mAP", "calibration", "open_set", "open_set_val", "reject",
                "far_ood"):
        assert again[key] == metrics[key], key
    assert set(metrics["open_set_val"]) >= {"max_logit", "feature_norm", "projection", "knn",
                                            "knn@1", "knn@50"}


@pytest.mark.parametrize("verbose", [1, 2])
def test_the_estimated_end_starts_its_own_line_after_a_progress_bar(verbose):
    """Keras's progress bar (verbose 1) holds the current line without a newline: the
    estimate must not be glued to it; one line per epoch (verbose 2) needs no blank line."""
    from tfmargin.runner.progress import Throughput

    printed = []
    meter = Throughput(64, epochs=4, printer=lambda text, flush: printed.append(text))
    meter.set_params({"verbose": verbose, "epochs": 4, "steps": 10})
    meter.on_train_begin()
    meter.on_epoch_begin(0)
    meter.on_epoch_end(0)
    assert printed[0].startswith("\nrun: 1.0/4 epochs" if verbose == 1 else "run: 1.0/4 epochs")
