"""Exports of the label-free inference model: SavedModel, .keras, optionally ONNX.

Everything is written under a temporary name and renamed into place, so a
crash never leaves a half-written ``saved_models/<name>/``.
"""

import json
import math
import os

import keras
import tensorflow as tf

from tfmargin.atomic import atomic_directory
from tfmargin.data import decode_image
from tfmargin.names import EXPORT_FORMATS, choices
from tfmargin.scores import GALLERY_SCORES, SCORES
from tfmargin.tta import tta_logits

UNKNOWN = "unknown"  # class_name of a rejected input; its class_id is -1


def _logits_and_cosine(model, images):
    embedding = model.embedding(images, training=False)
    head = model.head
    if hasattr(head, "cosine"):
        cosine = head.cosine(embedding)
        return head.scale * cosine, cosine, embedding
    # softmax head: logits from the Dense layer, cosine to its class weights
    weights = tf.math.l2_normalize(head.kernel, axis=0, epsilon=1e-12)
    cosine = tf.matmul(tf.math.l2_normalize(embedding, axis=-1, epsilon=1e-12), weights)
    return head(embedding), cosine, embedding


def open_set_score(name, logits, embedding, *, scale=None, gallery=None, k=None,
                   reference=None):
    """The reject option's score ``name`` (``scores.SCORES``) per image, from the served
    logits and the embedding before normalisation; higher: more likely a known class. The
    same scores as ``tfmargin.scores.open_set_scores``, in TensorFlow.

    Args:
        scale: the cosine head's scale s (None: a softmax head).
        gallery: ``(G, d)`` L2-normalised training embeddings, for ``knn`` and ``norm_knn``.
        k: the neighbour the kNN score reads.
        reference: ``{"feature_norm": (mean, sd), "knn": (mean, sd)}`` for ``norm_knn``.
    """
    if name not in SCORES:
        raise ValueError(f"unknown reject score {name!r}; choose one of {choices(SCORES)}")
    norm = tf.norm(embedding, axis=-1)
    projected = logits if scale is None else norm[:, None] * logits / scale
    if name in GALLERY_SCORES:
        if gallery is None:
            raise ValueError(f"the reject score {name!r} needs a gallery of training "
                             "embeddings")
        similarity = tf.matmul(tf.math.l2_normalize(embedding, axis=-1, epsilon=1e-12),
                               tf.cast(gallery, embedding.dtype), transpose_b=True)
        knn = tf.math.top_k(similarity, k).values[:, -1]
        if name == "knn":
            return knn
        (norm_mean, norm_sd), (knn_mean, knn_sd) = reference["feature_norm"], \
            reference["knn"]
        return (norm - norm_mean) / norm_sd + (knn - knn_mean) / knn_sd
    return {"max_logit": lambda: tf.reduce_max(logits, axis=-1),
            "msp": lambda: tf.reduce_max(tf.nn.softmax(logits), axis=-1),
            "energy": lambda: tf.reduce_logsumexp(logits, axis=-1),
            "feature_norm": lambda: norm,
            "projection": lambda: tf.reduce_max(projected, axis=-1),
            "projection_energy": lambda: tf.reduce_logsumexp(projected, axis=-1),
            "projection_msp": lambda: tf.reduce_max(tf.nn.softmax(projected), axis=-1),
            }[name]()


def serving_outputs(model, class_names, images, tta=0, temperature=1.0, reject=None,
                    gallery=None):
    """The serving dict for uint8 ``images`` (N, H, W, 3); no label input anywhere.

    ``tta > 0``: logits and cosines are averaged over the test-time
    augmentation views of ``tfmargin.tta``; the embedding is the plain image's.
    ``probabilities`` are ``softmax(logits / temperature)`` (the temperature
    fitted on the validation split). ``score`` is the reject option's score
    (``reject["score"]``, :func:`open_set_score`; the maximum logit without a reject
    option); an image scoring below ``reject["threshold"]`` is ``rejected``: ``class_id``
    -1, ``class_name`` "unknown". ``gallery``: the normalised training embeddings a kNN
    score reads.
    """
    images = tf.cast(images, tf.float32)
    logits, cosine, embedding = _logits_and_cosine(model, images)
    if tta:
        averaged = tta_logits(lambda view: tf.stack(_logits_and_cosine(model, view)[:2]),
                              images, tta, plain=tf.stack([logits, cosine]))
        logits, cosine = averaged[0], averaged[1]
    normalized = tf.math.l2_normalize(embedding, axis=-1, epsilon=1e-12)
    reject = reject or {"score": "max_logit"}
    score = open_set_score(reject["score"], logits, embedding, scale=getattr(
        model.head, "scale", None), gallery=gallery, k=reject.get("k"),
        reference=reject.get("reference"))
    rejected = score < reject["threshold"] if "threshold" in reject \
        else tf.zeros_like(score, tf.bool)
    class_id = tf.where(rejected, -1, tf.argmax(logits, axis=-1, output_type=tf.int32))
    names = tf.constant([*class_names, UNKNOWN])  # index -1 is "unknown"
    return {
        "probabilities": tf.nn.softmax(logits / temperature),
        "logits": logits,
        "cosine": cosine,
        "embedding": normalized,
        "score": score,
        "rejected": rejected,
        "class_id": class_id,
        "class_name": tf.gather(names, tf.where(rejected, len(class_names), class_id)),
    }


def export_models(model, class_names, export_path, *, formats=("savedmodel", "keras"),
                  image_size=32, tta=0, temperature=1.0, reject=None, gallery=None):
    """Write ``export_path/{savedmodel/, model.keras, model.onnx, class_names.txt,
    serving.json}``.

    The SavedModel has three endpoints: ``serve`` (uint8 images ``(N,
    image_size, image_size, 3)``) and ``serve_encoded`` (JPEG/PNG/BMP/GIF
    bytes ``(N,)`` of any size, decoded and resized by
    ``tfmargin.data.decode_image``, the function training decoded with) return
    the outputs of :func:`serving_outputs`; ``embed`` returns only the
    L2-normalised embedding of uint8 images (retrieval). With ``tta`` > 0 the
    first two average over test-time augmentation views. The SavedModel's
    variable collections hold what it was made with: ``tta_level``,
    ``temperature``, ``reject_threshold`` (-inf without a reject option) and, for a kNN
    score, the ``gallery``; ``serving.json`` says the same for people. ``model.keras`` is
    the plain classifier (logits only).

    Args:
        reject: ``{"score": name, "threshold": t, ...}`` as chosen on the validation
            split (``tfmargin.runner.evaluation.reject_option``; ``name`` one of
            ``scores.SCORES``), or None.
        gallery: ``(G, d)`` training embeddings; shipped (normalised) only when the reject
            score reads them (``scores.GALLERY_SCORES``).
    """
    unknown = set(formats) - set(EXPORT_FORMATS)
    if unknown:
        raise ValueError(f"Unknown export format(s) {sorted(unknown)}; choose from "
                         f"{choices(EXPORT_FORMATS)}.")
    if reject is not None and reject.get("score") not in SCORES:
        raise ValueError(f"unknown reject score {reject.get('score')!r}; choose one of "
                         f"{choices(SCORES)}")
    threshold = None if reject is None else float(reject["threshold"])
    ships_gallery = reject is not None and reject["score"] in GALLERY_SCORES
    serving = {"tta_level": tta, "temperature": float(temperature), "reject": reject,
               "image_size": image_size, "outputs": ["probabilities", "logits", "cosine",
                                                      "embedding", "score", "rejected",
                                                      "class_id", "class_name"]}
    signature = tf.TensorSpec((None, image_size, image_size, 3), tf.uint8, name="images")
    with atomic_directory(export_path) as tmp:
        with open(os.path.join(tmp, "class_names.txt"), "w") as f:
            f.write("".join(f"{name}\n" for name in class_names))
        with open(os.path.join(tmp, "serving.json"), "w") as f:
            json.dump(serving, f, indent=2)
        if "savedmodel" in formats or "onnx" in formats:
            archive = keras.export.ExportArchive()
            kept = None
            if ships_gallery:
                kept = tf.Variable(tf.math.l2_normalize(tf.constant(gallery, tf.float32),
                                                        axis=-1, epsilon=1e-12), trainable=False)
                archive.add_variable_collection("gallery", [kept])

            def outputs(images):
                return serving_outputs(model, class_names, images, tta, temperature, reject,
                                       kept)

            archive.track(model)
            archive.add_endpoint("serve", outputs, input_signature=[signature])
            archive.add_endpoint(
                "serve_encoded", lambda encoded: outputs(tf.map_fn(
                    lambda e: decode_image(e, image_size), encoded,
                    fn_output_signature=tf.TensorSpec((image_size, image_size, 3), tf.uint8))),
                input_signature=[tf.TensorSpec((None,), tf.string, name="encoded")])
            archive.add_endpoint(
                "embed", lambda images: {"embedding": tf.math.l2_normalize(
                    model.embedding(tf.cast(images, tf.float32), training=False), axis=-1,
                    epsilon=1e-12)}, input_signature=[signature])
            for name, value in (("tta_level", tta), ("temperature", float(temperature)),
                                ("reject_threshold", -math.inf if threshold is None
                                 else threshold)):
                archive.add_variable_collection(name, [tf.Variable(value, trainable=False)])
            archive.write_out(os.path.join(tmp, "savedmodel"), verbose=False)
        if "keras" in formats:
            model.save(os.path.join(tmp, "model.keras"))
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
