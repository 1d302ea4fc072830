import json
import os
import select
import socket
import subprocess
import sys
import time
import urllib.request
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf
from synthetic import write_image_folder

from tfmargin.runner.config import RunConfig
from tfmargin.runner.recipes import SERVED_SCORES
from tfmargin.runner.train import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POINTS = "embeddings/.ATTRIBUTES/VARIABLE_VALUE"
SERVED = SERVED_SCORES["standard", "arcface"][0]  # the default run's score, chosen on validation


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    # 80 per class: 10 % (8 per class) held out for validation, the projector's sample.
    data = write_image_folder(tmp / "shapes", num_classes=3, per_class=80, test_per_class=10)
    config = RunConfig(backbone="tinycnn", dataset=data, epochs=1, batch_size=16,
                       embedding_dim=8, runs_dir=str(tmp / "runs"), export_dir=str(tmp / "sm"),
                       name="tiny", projector_samples=24)
    metrics = train(config)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    return {"tmp": tmp, "metrics": metrics, "export": tmp / "sm" / "tiny",
            "run": tmp / "runs" / "tiny", "images": images, "data": data}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def test_tensorboard_serves_the_projector(finished_run):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(finished_run["tmp"] / "runs"),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        output = ""
        while f":{port}" not in output and time.monotonic() < deadline:
            ready, _, _ = select.select([server.stdout], [], [], 5)
            if ready:
                output += server.stdout.readline()
        assert f":{port}" in output, output
        base = f"http://127.0.0.1:{port}/data/plugin/projector"
        runs = json.loads(get(f"{base}/runs"))
        assert "tiny/logs/projector" in runs
        info = json.loads(get(f"{base}/info?run=tiny/logs/projector"))
        shapes = {e["tensorName"]: e["tensorShape"] for e in info["embeddings"]}
        assert shapes[POINTS] == [24, 8]
        assert shapes["class_centres/.ATTRIBUTES/VARIABLE_VALUE"] == [3, 8]
        query = f"run=tiny/logs/projector&name={POINTS}"
        tensor = np.frombuffer(get(f"{base}/tensor?{query}"), np.float32)
        assert tensor.size == 24 * 8
        np.testing.assert_allclose(np.linalg.norm(tensor.reshape(24, 8), axis=1), 1.0, atol=1e-5)
        metadata = get(f"{base}/metadata?{query}").decode().splitlines()
        assert len(metadata) == 25
        assert metadata[0] == "class\tlabel\tpredicted\tcorrect\tangle_to_centre"
        assert sorted(row.split("\t")[0] for row in metadata[1:]).count("class_0") == 8
    finally:
        server.terminate()
        server.wait(timeout=30)


FRESH = r"""
import json, sys
import numpy as np, tensorflow as tf
assert "tfmargin" not in sys.modules
model = tf.saved_model.load(sys.argv[1])
signature = model.signatures["serving_default"]
images = np.load(sys.argv[2])
out = {k: v.numpy() for k, v in model.serve(tf.constant(images)).items()}
val = {k: v.numpy() for k, v in model.serve(tf.constant(np.load(sys.argv[3]))).items()}
embedded = model.embed(tf.constant(images))["embedding"].numpy()
print("RESULT" + json.dumps({
    "inputs": sorted(signature.structured_input_signature[1]),
    "outputs": sorted(out), "probabilities": out["probabilities"].tolist(),
    "logits": out["logits"].tolist(), "embed_matches": bool(np.allclose(
        embedded, out["embedding"], atol=1e-6)),
    "temperature": float(model.temperature[0].numpy()),
    "threshold": float(model.reject_threshold[0].numpy()),
    "val_rejected": val["rejected"].tolist(), "val_names": [n.decode() for n in
                                                            val["class_name"]],
    "val_ids": val["class_id"].tolist(),
    "names": [n.decode() for n in out["class_name"]], "loaded_tfmargin": "tfmargin" in sys.modules,
}))
"""


@pytest.fixture(scope="module")
def fresh(finished_run):
    """The SavedModel served in a fresh process with plain TensorFlow: the random images
    and the run's own known validation images."""
    from tfmargin.data import load_dataset

    npy = finished_run["tmp"] / "images.npy"
    np.save(npy, finished_run["images"])
    val = load_dataset(finished_run["data"]).val  # the run's split: same folder and seed
    val_images = np.stack([x.numpy() for x, _ in val])
    np.save(finished_run["tmp"] / "val.npy", val_images)
    result = subprocess.run(
        [sys.executable, "-c", FRESH, str(finished_run["export"] / "savedmodel"), str(npy),
         str(finished_run["tmp"] / "val.npy")],
        capture_output=True, text=True, timeout=300, cwd=str(finished_run["tmp"]))
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.split("RESULT", 1)[1]) | {"val_images": val_images}


def test_saved_model_in_a_fresh_process_matches_keras(finished_run, fresh):
    out = fresh
    assert out["inputs"] == ["images"] and not out["loaded_tfmargin"]
    assert out["outputs"] == ["class_id", "class_name", "cosine", "embedding", "logits",
                              "probabilities", "rejected", "score"]
    model = keras.saving.load_model(finished_run["export"] / "model.keras")
    logits = model.predict(finished_run["images"].astype("float32"), verbose=0)
    np.testing.assert_allclose(out["logits"], logits, atol=1e-4)
    temperature = finished_run["metrics"]["calibration"]["temperature"]
    assert out["temperature"] == pytest.approx(temperature, rel=1e-6) and temperature != 1.0
    expected = keras.ops.softmax(np.asarray(out["logits"]) / temperature).numpy()
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    assert out["embed_matches"]


def test_saved_model_rejects_known_validation_images_at_the_recorded_rate(finished_run,
                                                                         fresh):
    reject = finished_run["metrics"]["reject"]
    assert reject["score"] == SERVED and reject["chosen_on"] == "validation"
    assert fresh["threshold"] == pytest.approx(reject["threshold"], rel=1e-6)
    rejected = np.array(fresh["val_rejected"])
    assert len(rejected) == 24 and rejected.sum() == 1  # floor(5 % of 24)
    assert rejected.mean() == pytest.approx(reject["val_rejected"])
    assert [n for n, r in zip(fresh["val_names"], rejected, strict=True) if r] == ["unknown"]
    assert [i for i, r in zip(fresh["val_ids"], rejected, strict=True) if r] == [-1]
    serving = json.loads((finished_run["export"] / "serving.json").read_text())
    assert serving["reject"] == reject and serving["temperature"] == pytest.approx(
        finished_run["metrics"]["calibration"]["temperature"])


def test_keras_file_reloads_with_identical_outputs(finished_run):
    model = keras.saving.load_model(finished_run["export"] / "model.keras")
    exported = tf.saved_model.load(str(finished_run["export"] / "savedmodel"))
    x = finished_run["images"]
    np.testing.assert_allclose(model.predict(x.astype("float32"), verbose=0),
                               exported.serve(tf.constant(x))["logits"].numpy(), atol=1e-5)
    # One copy of the model per format: the run directory keeps no checkpoint of it.
    assert not (finished_run["run"] / "inference.keras").exists()
    assert not (finished_run["run"] / "checkpoints").exists()
    assert [i.name for i in model.inputs] == ["image"]  # no label input


def test_onnx_export_agrees(finished_run, tmp_path):
    pytest.importorskip("tf2onnx", reason="optional dependency: pip install -e '.[onnx]'")
    ort = pytest.importorskip("onnxruntime", reason="optional dependency: pip install -e '.[onnx]'")

    from tfmargin.export import _to_onnx

    path = str(tmp_path / "model.onnx")
    _to_onnx(str(finished_run["export"] / "savedmodel"), path)
    session = ort.InferenceSession(path)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, {"images": finished_run["images"]}), strict=True))
    loaded = tf.saved_model.load(str(finished_run["export"] / "savedmodel"))
    expected = loaded.serve(tf.constant(finished_run["images"]))["probabilities"].numpy()
    np.testing.assert_allclose(got["probabilities"], expected, atol=1e-4)


def test_crash_during_export_leaves_nothing(finished_run, tmp_path):
    from tfmargin.classifier import MarginClassifier
    from tfmargin.export import export_models

    model = MarginClassifier("tinycnn", 3, embedding_dim=4, scale=4.0)
    target = tmp_path / "sm" / "crashed"
    # Fails after the SavedModel is already in the temporary folder.
    with mock.patch.object(model, "save", side_effect=OSError("disk full")):
        with pytest.raises(OSError, match="disk full"):
            export_models(model, ["a", "b", "c"], str(target))
    assert os.listdir(tmp_path / "sm") == []


def test_predict_script_prints_class_names(finished_run, fresh, tmp_path):
    from PIL import Image

    image = str(tmp_path / "accepted.png")  # a known image the reject option keeps
    Image.fromarray(fresh["val_images"][fresh["val_rejected"].index(False)]).save(image)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "predict.py"),
                             str(finished_run["export"]), image, "--top-k", "2"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(image + ": class_")
    assert line.split(": ", 1)[1].count("class_") == 2
    assert "I0000" not in result.stderr and "cuInit" not in result.stderr


def test_predict_script_prints_unknown_for_a_rejected_image(finished_run, fresh, tmp_path):
    from PIL import Image

    index = fresh["val_rejected"].index(True)
    path = tmp_path / "rejected.png"  # PNG: the same pixels, so the same score
    Image.fromarray(fresh["val_images"][index]).save(path)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "predict.py"),
                             str(finished_run["export"]), str(path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    line = result.stdout.strip().splitlines()[-1]
    assert line.startswith(f"{path}: unknown (") and "below the threshold" in line
    assert "chosen on validation; were it one of the known classes: " in line
    assert f"{path}: unknown ({SERVED} " in line  # the score it thresholds, named


def test_hparams_and_metrics_are_logged(finished_run):
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(str(finished_run["run"] / "logs" / "hparams"))
    events.Reload()
    tags = events.Tags()["tensors"]
    assert {f"{split}/{key}" for split in ("test", "val") for key in (
        "top1", "top5", "mAP", "precision_at_1", "map_at_r")} <= set(tags)
    top1 = events.Tensors("test/top1")[0]
    value = float(tf.make_ndarray(top1.tensor_proto))
    assert value == pytest.approx(finished_run["metrics"]["top1"], abs=1e-6)
    assert "_hparams_/session_start_info" in tags


def test_encoded_endpoint_decodes_as_training_did(finished_run, tmp_path):
    """Any-size image bytes through ``serve_encoded`` == training's decode, then ``serve``."""
    from PIL import Image

    from tfmargin.data import decode_image

    path = tmp_path / "big.png"
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (48, 40, 3), dtype=np.uint8)).save(
        path)
    encoded = path.read_bytes()
    loaded = tf.saved_model.load(str(finished_run["export"] / "savedmodel"))
    got = loaded.serve_encoded(tf.constant([encoded, encoded]))["probabilities"].numpy()
    images = tf.stack([decode_image(tf.constant(encoded), 32)] * 2)
    expected = loaded.serve(images)["probabilities"].numpy()
    np.testing.assert_array_equal(got, expected)


def test_projector_angle_uses_the_nearest_sub_centre():
    from tfmargin.projector import angle_to_nearest_centre, normalize_rows

    centres = normalize_rows(np.array([[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
                                       [[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]]))
    embeddings = normalize_rows(np.array([[0.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, -1.0, 0.0]]))
    angles = angle_to_nearest_centre(embeddings, centres, np.array([0, 0, 1]))
    np.testing.assert_allclose(angles, [0.0, 45.0, 0.0], atol=1e-6)  # sub-centre 0 says 90
