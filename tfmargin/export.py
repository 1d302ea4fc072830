"""Exports of the label-free inference model: SavedModel, .keras, optionally ONNX.

Everything is written under a temporary name and renamed into place, so a
crash never leaves a half-written ``saved_models/<name>/``.
"""

import os

import keras
import tensorflow as tf

from tfmargin.atomic import atomic_directory
from tfmargin.config import EXPORT_FORMATS
from tfmargin.data import decode_image
from tfmargin.tta import tta_logits


def _logits_and_cosine(models, images):
    embedding = models.embedding(images, training=False)
    head = models.head
    if hasattr(head, "cosine"):
        cosine = head.cosine(embedding)
        return head.scale * cosine, cosine, embedding
    # softmax head: logits from the Dense layer, cosine to its class weights
    weights = tf.math.l2_normalize(head.kernel, axis=0, epsilon=1e-12)
    cosine = tf.matmul(tf.math.l2_normalize(embedding, axis=-1, epsilon=1e-12), weights)
    return head(embedding), cosine, embedding


def serving_outputs(models, class_names, images, tta=0):
    """The serving dict for uint8 ``images`` (N, H, W, 3); no label input anywhere.

    ``tta > 0``: logits and cosines are averaged over the test-time
    augmentation views of ``tfmargin.tta``; the embedding is the plain image's.
    """
    images = tf.cast(images, tf.float32)
    logits, cosine, embedding = _logits_and_cosine(models, images)
    if tta:
        averaged = tta_logits(lambda view: tf.stack(_logits_and_cosine(models, view)[:2]),
                              images, tta, plain=tf.stack([logits, cosine]))
        logits, cosine = averaged[0], averaged[1]
    normalized = tf.math.l2_normalize(embedding, axis=-1, epsilon=1e-12)
    class_id = tf.argmax(logits, axis=-1, output_type=tf.int32)
    return {
        "probabilities": tf.nn.softmax(logits),
        "logits": logits,
        "cosine": cosine,
        "embedding": normalized,
        "class_id": class_id,
        "class_name": tf.gather(tf.constant(class_names), class_id),
    }


def export_models(models, class_names, export_path, formats=("savedmodel", "keras"),
                  image_size=32, tta=0):
    """Write ``export_path/{savedmodel/, model.keras, model.onnx, class_names.txt}``.

    The SavedModel has two endpoints with the same outputs: ``serve``
    (uint8 images ``(N, image_size, image_size, 3)``) and ``serve_encoded``
    (JPEG/PNG/BMP/GIF bytes ``(N,)`` of any size, decoded and resized by
    ``tfmargin.data.decode_image``, the function training decoded with).
    With ``tta`` > 0 both average over test-time augmentation views, and the
    SavedModel says so: its variable collection ``tta_level`` holds the
    level (0: none). ``model.keras`` is always the plain model.
    """
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown:
        raise ValueError(f"Unknown export format(s) {sorted(unknown)}; choose from "
                         f"{', '.join(EXPORT_FORMATS)}.")
    signature = tf.TensorSpec((None, image_size, image_size, 3), tf.uint8, name="images")
    with atomic_directory(export_path) as tmp:
        with open(os.path.join(tmp, "class_names.txt"), "w") as f:
            f.write("".join(f"{name}\n" for name in class_names))
        if "savedmodel" in formats or "onnx" in formats:
            archive = keras.export.ExportArchive()
            archive.track(models.embedding)
            archive.track(models.inference)
            archive.add_endpoint(
                "serve", lambda images: serving_outputs(models, class_names, images, tta),
                input_signature=[signature])
            archive.add_endpoint(
                "serve_encoded", lambda encoded: serving_outputs(
                    models, class_names, tf.map_fn(
                        lambda e: decode_image(e, image_size), encoded,
                        fn_output_signature=tf.TensorSpec((image_size, image_size, 3),
                                                          tf.uint8)), tta),
                input_signature=[tf.TensorSpec((None,), tf.string, name="encoded")])
            archive.add_variable_collection("tta_level", [tf.Variable(tta, trainable=False)])
            archive.write_out(os.path.join(tmp, "savedmodel"), verbose=False)
        if "keras" in formats:
            models.inference.save(os.path.join(tmp, "model.keras"))
        if "onnx" in formats:
            _to_onnx(os.path.join(tmp, "savedmodel"), os.path.join(tmp, "model.onnx"))
    return export_path


def _to_onnx(saved_model_dir, onnx_path):
    """tf2onnx's own SavedModel converter (it freezes the variables)."""
    import importlib.util
    import subprocess
    import sys

    if importlib.util.find_spec("tf2onnx") is None:
        raise ValueError("--export onnx needs the optional dependency: "
                         "pip install -e '.[onnx]'")
    done = subprocess.run(
        [sys.executable, "-m", "tf2onnx.convert", "--saved-model", saved_model_dir,
         "--signature_def", "serve", "--opset", "17", "--output", onnx_path],
        capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"tf2onnx failed: {done.stderr.strip().splitlines()[-1]}")
