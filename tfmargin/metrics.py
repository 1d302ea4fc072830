"""Exact test metrics: classification (top-k, mAP on probabilities) and retrieval
(Precision@1, MAP@R on normalised embeddings), and per-image summaries."""

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


def softmax(logits):
    """Row-wise softmax in float64, stable for any logit offset."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def mean_average_precision(probabilities, labels):
    """mAP: the mean over classes of the AP of ranking all images by P(class | image).

    On probabilities, not logits: softmax ignores a per-image offset of the
    logits (a Dense head's bias and embedding norm give it one, a cosine
    head's bounded logits do not), so ranking by raw logits would compare the
    heads on something their predictions do not depend on. This is what
    scikit-learn's ``average_precision_score`` gives on ``predict_proba``.
    Classes without a positive sample are left out (their AP is undefined).
    """
    aps = [average_precision(probabilities[:, c], labels == c)
           for c in range(probabilities.shape[1])]
    return float(np.nanmean(aps))


def top_k_accuracy(scores, labels, k):
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == labels[:, None], axis=1)))


def classification_metrics(logits, labels):
    """top-1, top-5 and mAP (all in [0, 1]) of ``logits`` (N, C) against ``labels`` (N,)."""
    labels = np.asarray(labels).reshape(-1)
    return {
        "top1": top_k_accuracy(logits, labels, 1),
        "top5": top_k_accuracy(logits, labels, 5),
        "mAP": mean_average_precision(softmax(logits), labels),
    }


def retrieval_metrics(embeddings, labels, block_size=256):
    """Precision@1 and MAP@R of each test image as a query against all the others.

    As pytorch-metric-learning's ``AccuracyCalculator`` defines them, with
    queries and references from the same set (the query itself excluded),
    cosine similarity of the L2-normalised embeddings, exact search. For a
    query with R other images of its class, MAP@R is
    ``(1/R) * sum_{i<=R} P@i * [i-th neighbour is of its class]``; queries
    whose class has no other image are left out. Computed ``block_size``
    queries at a time, so memory stays ``block_size x N``.
    """
    x = np.asarray(embeddings, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    labels = np.asarray(labels).reshape(-1)
    counts = np.bincount(labels)
    r_all = counts[labels] - 1  # other images of the query's class
    hits_at_1, map_at_r = [], []
    for start in range(0, len(x), block_size):
        rows = np.arange(start, min(start + block_size, len(x)))
        rows = rows[r_all[rows] > 0]
        if not len(rows):
            continue
        similarity = x[rows] @ x.T
        similarity[np.arange(len(rows)), rows] = -np.inf  # never retrieve the query itself
        r = r_all[rows]
        k = int(r.max())
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1,
                           kind="stable")
        neighbours = np.take_along_axis(top, order, axis=1)
        relevant = labels[neighbours] == labels[rows, None]
        within_r = np.arange(1, k + 1)[None, :] <= r[:, None]
        precision_at_i = np.cumsum(relevant, axis=1) / np.arange(1, k + 1)
        hits_at_1.append(relevant[:, 0])
        map_at_r.append(np.sum(precision_at_i * relevant * within_r, axis=1) / r)
    return {"precision_at_1": float(np.mean(np.concatenate(hits_at_1))),
            "map_at_r": float(np.mean(np.concatenate(map_at_r)))}


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
