"""A trained model's numbers: predictions of each split, then every metric of the run.

The validation split chooses (the temperature, the reject threshold); the test split
is predicted once, here, for the reported numbers.
"""

import numpy as np
import tensorflow as tf

from tfmargin import metrics as m
from tfmargin.names import TTA_LEVELS
from tfmargin.tta import tta_logits

# The export's reject option keeps this fraction of the known validation images (the score
# it thresholds is the run's --reject-score, tfmargin.names.REJECT_SCORES).
REJECT_KEEP = 0.95
# A run without test-time augmentation still reports the test top-1 with it, at this level
# (airbench's six views), beside the plain figure.
REPORTED_TTA = max(TTA_LEVELS)


def prediction_step(model, tta=0):
    """One traced function ``uint8 images -> (logits, served logits, embeddings)`` for
    every split. ``model``: ``MarginClassifier.logits_and_embeddings()``; ``served``: the
    logits the export serves, averaged over the test-time augmentation views
    (``tfmargin.tta``) when ``tta > 0``, else the plain logits."""
    size = model.input_shape[1:]

    @tf.function(input_signature=[tf.TensorSpec((None, *size), tf.uint8)])
    def step(x):
        x = tf.cast(x, tf.float32)
        logits, embedding = model(x, training=False)
        served = tta_logits(lambda v: model(v, training=False)[0], x, tta, plain=logits) \
            if tta else logits
        return logits, served, embedding

    return step


def predict_split(step, split, batch_size):
    """``{"logits", "served", "embeddings", "labels"}`` of a split (``prediction_step``),
    each batch's outputs with its own labels: a plain per-batch loop on this worker (no
    distributed ``predict``, whose gathered order need not match a separate pass over the
    labels)."""
    columns = [[], [], [], []]
    for x, y in split.batch(batch_size).prefetch(2):
        for column, value in zip(columns, (*step(x), y), strict=True):
            column.append(value.numpy())
    logits, served, embeddings, labels = (np.concatenate(c) for c in columns)
    return {"logits": logits, "served": served, "embeddings": embeddings, "labels": labels}


def split_top1(model, split, batch_size):
    """Top-1 of a ``MarginClassifier`` on a split of ``(image, label)`` pairs, in inference
    mode (the label-free logits)."""
    predicted = predict_split(prediction_step(model.logits_and_embeddings()), split,
                              batch_size)
    return float(np.mean(np.argmax(predicted["logits"], axis=1) == predicted["labels"]))


def split_metrics(predicted):
    """Classification (top-1, top-5, mAP) and self-retrieval (P@1, R-precision, MAP@R)."""
    return (m.classification_metrics(predicted["logits"], predicted["labels"])
            | m.retrieval_metrics(predicted["embeddings"], predicted["labels"]))


def calibration(test, val):
    """Calibration of the served test logits before and after temperature scaling, the
    temperature fitted by NLL on the validation split (no validation split: before only)."""
    result = {"before": m.calibration_metrics(test["served"], test["labels"]),
              "bins_before": m.reliability_bins(test["served"], test["labels"])}
    if val is not None:
        temperature = m.fit_temperature(val["served"], val["labels"])
        result |= {"temperature": temperature,
                   "after": m.calibration_metrics(test["served"], test["labels"], temperature),
                   "bins_after": m.reliability_bins(test["served"], test["labels"],
                                                    temperature)}
    return result


def reject_option(val, test, unknown=None, score_name="max_logit"):
    """The reject threshold: the served score ``score_name`` (``names.REJECT_SCORES``)
    above which ``REJECT_KEEP`` of the known validation images lie; and how many images of
    each split it rejects."""
    def score(predicted):
        return m.open_set_scores(predicted["served"], predicted["embeddings"])[score_name]

    val_scores = score(val)
    threshold = m.rejection_threshold(val_scores, REJECT_KEEP)
    result = {"score": score_name, "keep": REJECT_KEEP, "threshold": threshold,
              "chosen_on": "validation",
              "val_rejected": float(np.mean(val_scores < threshold)),
              "test_rejected": float(np.mean(score(test) < threshold))}
    if unknown is not None:
        result["unknown_rejected"] = float(np.mean(score(unknown) < threshold))
    return result


def open_set(test, unknown, gallery):
    """AUROC and OSCR of every score, known test images against the held-out classes'."""
    known = m.open_set_scores(test["served"], test["embeddings"], gallery)
    other = m.open_set_scores(unknown["served"], unknown["embeddings"], gallery)
    correct = np.argmax(test["served"], axis=1) == test["labels"]
    return m.open_set_metrics(known, correct, other) | {
        "known_test_size": int(len(test["labels"])),
        "unknown_test_size": int(len(unknown["labels"])), "closed_set_top1": float(
            np.mean(correct))}


def evaluate(model, data, batch_size, tta=0, reject_score="max_logit"):
    """Every metric of a trained model; returns ``(metrics, test predictions)``.

    Test: classification (also with test-time augmentation, ``REPORTED_TTA``
    views when the run serves none), self-retrieval, retrieval against the
    training images as the gallery, calibration, the reject option and (with held-out
    classes) open-set recognition. Validation: classification and retrieval,
    and the choices (temperature, threshold).
    """
    network = model.logits_and_embeddings()
    step = prediction_step(network, tta)
    # One pass over the test split gives the plain logits and the augmented views' logits.
    test = predict_split(prediction_step(network, tta or REPORTED_TTA), data.test, batch_size)
    augmented = test["served"]
    if not tta:  # the export serves the plain logits
        test["served"] = test["logits"]
    val = predict_split(step, data.val, batch_size) if data.val is not None else None
    # The gallery needs embeddings only: no test-time augmentation views.
    gallery = predict_split(prediction_step(network) if tta else step, data.train, batch_size)
    results = split_metrics(test) | {"test_size": int(len(test["labels"]))}
    results["tta"] = m.classification_metrics(augmented, test["labels"]) | {
        "level": tta or REPORTED_TTA, "served": bool(tta)}
    results["gallery"] = m.gallery_retrieval_metrics(
        test["embeddings"], test["labels"], gallery["embeddings"], gallery["labels"])
    results["calibration"] = calibration(test, val)
    unknown = None
    if data.unknown_test is not None:
        unknown = predict_split(step, data.unknown_test, batch_size)
        results["open_set"] = open_set(test, unknown, gallery["embeddings"])
    if val is not None:
        results["val"] = split_metrics(val)
        results["reject"] = reject_option(val, test, unknown, reject_score)
    return results, test
