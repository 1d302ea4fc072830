"""Test metrics computed exactly from scores (top-k accuracy, mAP) and per-image summaries."""

import os

import numpy as np

from tfmargin.atomic import atomic_file

PREDICTIONS_FILE = "test_predictions.npz"  # per test image: label, prediction, target angle


def average_precision(scores, positives):
    """Non-interpolated AP of one ranking, ties grouped as in scikit-learn.

    ``AP = sum_n (R_n - R_{n-1}) * P_n`` over the distinct score thresholds,
    highest first.
    """
    order = np.argsort(-scores, kind="mergesort")
    scores, positives = scores[order], positives[order].astype(np.float64)
    total = positives.sum()
    if total == 0:
        return float("nan")
    # Last index of each run of equal scores: one threshold per distinct score.
    last = np.r_[np.nonzero(np.diff(scores))[0], len(scores) - 1]
    true_pos = np.cumsum(positives)[last]
    precision = true_pos / (last + 1)
    recall = true_pos / total
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores, labels):
    """mAP: the mean over classes of the AP of that class's score ranking.

    Classes without a positive sample are left out (their AP is undefined).
    """
    aps = [average_precision(scores[:, c], labels == c) for c in range(scores.shape[1])]
    return float(np.nanmean(aps))


def top_k_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def classification_metrics(scores, labels):
    """top-1, top-5 and mAP (all in [0, 1]) of ``scores`` (N, C) against ``labels`` (N,)."""
    labels = np.asarray(labels).reshape(-1)
    return {
        "top1": top_k_accuracy(scores, labels, 1),
        "top5": top_k_accuracy(scores, labels, 5),
        "mAP": mean_average_precision(scores, labels),
    }


def prediction_summary(scores, labels, scale=None):
    """What a confusion matrix and an angle histogram need, per test image.

    ``target_angle_deg`` is the angle between the embedding and its class's
    centre, ``arccos(logit_y / s)``, for margin heads (whose logits are
    ``s cos theta``); NaN for a softmax head (``scale=None``).
    """
    labels = np.asarray(labels).reshape(-1)
    target = scores[np.arange(len(labels)), labels]
    angle = (np.degrees(np.arccos(np.clip(target / scale, -1.0, 1.0))) if scale
             else np.full(len(labels), np.nan))
    return {"labels": labels.astype(np.int32),
            "predicted": np.argmax(scores, axis=1).astype(np.int32),
            "target_angle_deg": angle.astype(np.float32)}


def save_prediction_summary(run_dir, scores, labels, scale=None):
    """Write :func:`prediction_summary` to ``run_dir/test_predictions.npz`` atomically."""
    with atomic_file(os.path.join(run_dir, PREDICTIONS_FILE)) as tmp:
        np.savez_compressed(tmp, **prediction_summary(scores, labels, scale))
