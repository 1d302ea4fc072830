"""Exact test metrics: classification (top-k, mAP on probabilities) and retrieval
(Precision@1, MAP@R on normalised embeddings), and per-image summaries."""

import os

import numpy as np

from tfmargin.atomic import atomic_file
from tfmargin.scores import KNN_KS, softmax

# Per image: label, prediction, target angle, and the per-image outputs of every split
# (tfmargin.runner.evaluation.per_image_outputs).
PREDICTIONS_FILE = "test_predictions.npz"


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


def nearest(queries, reference, depth, exclude_self=False, block_size=256):
    """The ``depth`` nearest reference rows of each query by cosine similarity (exact,
    ties in index order), yielded ``block_size`` queries at a time as ``(rows, indices,
    similarities)``, the last two ``(len(rows), depth)``, so memory stays ``block_size x
    len(reference)``. ``exclude_self``: the queries are the reference rows themselves, and a
    query never retrieves itself. The one neighbour search of every retrieval and kNN
    figure."""
    q, r = normalize(queries), normalize(reference)
    depth = min(depth, len(r) - int(exclude_self))
    for start in range(0, len(q), block_size):
        rows = np.arange(start, min(start + block_size, len(q)))
        similarity = q[rows] @ r.T
        if exclude_self:
            similarity[np.arange(len(rows)), rows] = -np.inf
        top = np.argpartition(-similarity, depth - 1, axis=1)[:, :depth]
        order = np.argsort(-np.take_along_axis(similarity, top, axis=1), axis=1,
                           kind="stable")
        indices = np.take_along_axis(top, order, axis=1)
        yield rows, indices, np.take_along_axis(similarity, indices, axis=1)


def ranking_metrics(relevant, r):
    """Per query: hit at 1, R-precision and MAP@R, from ``relevant`` ``(N, depth)``
    (whether each ranked neighbour shares the query's class) and ``r`` ``(N,)`` (how many
    reference rows do). Queries with ``r == 0`` (a class with no other reference row) are
    left out, as pytorch-metric-learning leaves out lone queries."""
    keep = r > 0
    relevant, r = relevant[keep], r[keep]
    ranks = np.arange(1, relevant.shape[1] + 1)
    within_r = ranks[None, :] <= r[:, None]
    precision_at_i = np.cumsum(relevant, axis=1) / ranks
    return np.stack([relevant[:, 0], np.sum(relevant * within_r, axis=1) / r,
                     np.sum(precision_at_i * relevant * within_r, axis=1) / r], axis=1)


def mean_ranking(per_query):
    """``precision_at_1``, ``r_precision``, ``map_at_r``: the means of
    :func:`ranking_metrics`' per-query rows."""
    means = np.concatenate(per_query).mean(axis=0)
    return dict(zip(("precision_at_1", "r_precision", "map_at_r"), map(float, means),
                    strict=True))


def retrieval_metrics(embeddings, labels, block_size=256):
    """Precision@1, R-precision and MAP@R of each test image as a query against all the
    others.

    As pytorch-metric-learning's ``AccuracyCalculator`` defines them, with
    queries and references from the same set (the query itself excluded),
    cosine similarity of the L2-normalised embeddings, exact search. For a
    query with R other images of its class, R-precision is the fraction of its
    R nearest that share its class and MAP@R is
    ``(1/R) * sum_{i<=R} P@i * [i-th neighbour is of its class]``; queries
    whose class has no other image are left out.
    """
    labels = np.asarray(labels).reshape(-1)
    r = np.bincount(labels)[labels] - 1  # other images of the query's class
    return mean_ranking([
        ranking_metrics(labels[found] == labels[rows, None], r[rows])
        for rows, found, _ in nearest(embeddings, embeddings, max(int(r.max()), 1),
                                      exclude_self=True, block_size=block_size)])


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


def save_predictions(run_dir, outputs, scale=None):
    """Write the per-image ``outputs`` (arrays by name; ``logits`` and ``labels`` of the
    test images among them) and their :func:`prediction_summary` to
    ``run_dir/test_predictions.npz`` atomically."""
    with atomic_file(os.path.join(run_dir, PREDICTIONS_FILE)) as tmp:
        np.savez_compressed(tmp, **{**outputs, **prediction_summary(
            outputs["logits"].astype(np.float32), outputs["labels"], scale)})


def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def negative_log_likelihood(logits, labels, temperature=1.0):
    """Mean ``-log p(y | x)`` of ``softmax(logits / temperature)``."""
    labels = np.asarray(labels).reshape(-1)
    return float(-np.mean(log_softmax(np.asarray(logits, np.float64) / temperature)[
        np.arange(len(labels)), labels]))


# The temperatures fit_temperature searches between.
TEMPERATURE_RANGE = (0.01, 100.0)


def fit_temperature(logits, labels, low=TEMPERATURE_RANGE[0], high=TEMPERATURE_RANGE[1],
                    iterations=200):
    """The temperature T > 0 minimising the NLL of ``softmax(logits / T)`` (Guo et al. 2017).

    The NLL is convex in ``1 / T``, so a golden-section search over ``1 / T``
    in ``[1 / high, 1 / low]`` finds the minimum. For a cosine head this is
    choosing the inference scale ``s / T``.
    """
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = 1.0 / high, 1.0 / low

    def nll(beta):
        return negative_log_likelihood(logits, labels, 1.0 / beta)

    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = nll(d)
    return float(2.0 / (a + b))


def calibration_metrics(logits, labels, temperature=1.0, bins=15):
    """ECE (``bins`` equal-width confidence bins), NLL and Brier score of
    ``softmax(logits / temperature)``.

    ECE = sum over bins of (bin size / N) * |accuracy - mean confidence|, the
    confidence being the top probability (Guo et al. 2017). Brier = mean over
    images of the squared distance between the probability vector and the
    one-hot label (summed over classes).
    """
    labels = np.asarray(labels).reshape(-1)
    probabilities = softmax(np.asarray(logits, np.float64) / temperature)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    # Bin b holds confidences in (b/bins, (b+1)/bins]; confidence 1/C > 0 always.
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    one_hot = np.eye(probabilities.shape[1])[labels]
    return {"ece": float(ece), "nll": negative_log_likelihood(logits, labels, temperature),
            "brier": float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))}


def ece_before_after(logits, labels, temperature):
    """``{"before": ECE, "after": ECE at temperature}``: what scaling by ``temperature`` (fitted
    on these images or others) does to the expected calibration error of ``logits``."""
    return {when: calibration_metrics(logits, labels, t)["ece"]
            for when, t in (("before", 1.0), ("after", temperature))}


def reliability_bins(logits, labels, temperature=1.0, bins=15):
    """Per confidence bin: ``[count, accuracy, mean confidence]`` (None for an empty bin);
    what a reliability diagram draws."""
    labels = np.asarray(labels).reshape(-1)
    probabilities = softmax(np.asarray(logits, np.float64) / temperature)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        rows.append([int(members.sum()), float(correct[members].mean()) if members.any()
                     else None, float(confidence[members].mean()) if members.any() else None])
    return rows


def auroc(known_scores, unknown_scores):
    """Area under the ROC curve of telling known (positive, higher score) from unknown
    images: the probability that a random known image scores above a random unknown one,
    ties counting one half (Mann-Whitney U / (n_known n_unknown))."""
    known = np.asarray(known_scores, np.float64)
    unknown = np.asarray(unknown_scores, np.float64)
    scores = np.concatenate([known, unknown])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (1-based).
    starts = np.r_[0, np.nonzero(np.diff(sorted_scores))[0] + 1]
    ends = np.r_[starts[1:], len(scores)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0
    u = ranks[:len(known)].sum() - len(known) * (len(known) + 1) / 2.0
    return float(u / (len(known) * len(unknown)))


def oscr(known_scores, known_correct, unknown_scores):
    """Open-Set Classification Rate (Dhamija et al. 2018): the area under the curve of the
    correct classification rate against the false positive rate as the acceptance
    threshold falls.

    At threshold t (accept when score >= t): CCR(t) = fraction of known images
    that are accepted and classified correctly, FPR(t) = fraction of unknown
    images accepted. The curve runs from (0, 0) to (1, closed-set accuracy)
    through one point per distinct score; the area is taken by trapezoids.
    """
    known = np.asarray(known_scores, np.float64)
    unknown = np.asarray(unknown_scores, np.float64)
    correct = np.asarray(known_correct, bool)
    thresholds = np.unique(np.concatenate([known, unknown]))[::-1]  # high to low
    order_k, order_u = np.sort(known), np.sort(unknown)
    # Accepted at t: scores >= t, i.e. n - (number below t).
    accepted_unknown = len(unknown) - np.searchsorted(order_u, thresholds, side="left")
    correct_scores = np.sort(known[correct])
    accepted_correct = len(correct_scores) - np.searchsorted(correct_scores, thresholds,
                                                             side="left")
    fpr = np.r_[0.0, accepted_unknown / len(unknown)]
    ccr = np.r_[0.0, accepted_correct / len(order_k)]
    return float(np.sum(np.diff(fpr) * (ccr[1:] + ccr[:-1]) / 2.0))


def normalize(x):
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_similarities(queries, gallery, ks=KNN_KS, block_size=512):
    """``(N, len(ks))``: the cosine similarity of each query's k-th nearest gallery
    embedding for each k (Sun et al. 2022's kNN out-of-distribution score), on
    L2-normalised embeddings, from one neighbour search."""
    return np.concatenate([
        similarity[:, [min(k, similarity.shape[1]) - 1 for k in ks]]
        for _, _, similarity in nearest(queries, gallery, max(ks), block_size=block_size)]
    ).astype(np.float64)


def open_set_metrics(known_scores, known_correct, unknown_scores):
    """AUROC and OSCR of each score. ``known_scores``/``unknown_scores``: ``{name: per-image
    scores}`` (``tfmargin.scores.open_set_scores``) of the known and the unknown images;
    ``known_correct``: whether each known image's closed-set prediction is right."""
    return {name: {"auroc": auroc(known_scores[name], unknown_scores[name]),
                   "oscr": oscr(known_scores[name], known_correct, unknown_scores[name])}
            for name in known_scores}


def rejection_threshold(scores, keep=0.95):
    """A threshold that accepts (``score >= threshold``) at least a fraction ``keep`` of
    ``scores`` (known validation images) and rejects the ``floor((1 - keep) N)`` lowest:
    midway between the last rejected score and the first kept one, so a score computed
    again elsewhere (an export, another process) falls on the same side."""
    ordered = np.sort(np.asarray(scores, np.float64))
    rejected = int(np.floor((1.0 - keep) * len(ordered) + 1e-9))
    if rejected == 0:
        return float(ordered[0] - 1e-3 * (1.0 + abs(ordered[0])))
    return float((ordered[rejected - 1] + ordered[rejected]) / 2.0)


def gallery_retrieval_metrics(queries, query_labels, gallery, gallery_labels, k=10,
                              block_size=256):
    """Test images as queries against a gallery (the training images), cosine similarity
    of L2-normalised embeddings, exact search.

    ``knn_top1``: accuracy of a majority vote of the ``k`` nearest gallery
    images (ties to the class of larger summed similarity); ``precision_at_1``;
    ``r_precision``: the fraction of the R nearest that share the query's class,
    R = the gallery images of that class; ``map_at_r`` as in
    :func:`retrieval_metrics` (queries of a class the gallery lacks are left out of these
    three; the vote counts them, as wrong).
    """
    query_labels = np.asarray(query_labels).reshape(-1)
    gallery_labels = np.asarray(gallery_labels).reshape(-1)
    num_classes = int(max(query_labels.max(), gallery_labels.max())) + 1
    r_all = np.bincount(gallery_labels, minlength=num_classes)[query_labels]
    votes_right, per_query = [], []
    for rows, found, similarity in nearest(queries, gallery, max(int(r_all.max()), k),
                                           block_size=block_size):
        labels, neighbour_labels = query_labels[rows], gallery_labels[found]
        # kNN vote, ties broken by the summed similarity of each class's votes.
        nearest_k, weights = neighbour_labels[:, :k], similarity[:, :k]
        index = np.arange(len(rows))[:, None]
        tally = np.zeros((len(rows), num_classes))
        strength = np.zeros((len(rows), num_classes))
        np.add.at(tally, (index, nearest_k), 1.0)
        np.add.at(strength, (index, nearest_k), weights)
        votes_right.append(np.argmax(tally + 1e-6 * strength / k, axis=1) == labels)
        per_query.append(ranking_metrics(neighbour_labels == labels[:, None], r_all[rows]))
    return {"knn_top1": float(np.mean(np.concatenate(votes_right))), **mean_ranking(per_query)}
