import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tfmargin.metrics import (
    average_precision,
    classification_metrics,
    retrieval_metrics,
    softmax,
)


def test_average_precision_matches_scikit_learn_including_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = np.round(rng.normal(size=200), 1)  # rounding makes many ties
        positives = rng.random(200) < 0.3
        assert average_precision(scores, positives) == pytest.approx(
            average_precision_score(positives, scores), abs=1e-12)


def test_map_is_the_mean_of_per_class_ap_on_fixed_inputs():
    scores = np.log([[0.9, 0.1, 0.0001], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4]])
    labels = np.array([0, 1, 1, 2])
    probabilities = softmax(scores)
    expected = np.mean([average_precision_score(labels == c, probabilities[:, c])
                        for c in range(3)])
    metrics = classification_metrics(scores, labels)
    assert metrics["mAP"] == pytest.approx(expected)
    assert metrics["mAP"] == pytest.approx((1.0 + (1 + 2 / 3) / 2 + 1.0) / 3)
    assert metrics["top1"] == pytest.approx(0.5)
    assert metrics["top5"] == 1.0


def test_map_ignores_a_per_image_logit_offset_and_equals_scikit_learn_on_probabilities():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 500)
    logits = rng.normal(size=(500, 10)) + 3.0 * np.eye(10)[labels]
    shifted = logits + rng.normal(scale=20.0, size=(500, 1))  # a Dense head's bias / norm
    got = classification_metrics(shifted, labels)["mAP"]
    assert got == pytest.approx(classification_metrics(logits, labels)["mAP"], abs=1e-12)
    probabilities = softmax(logits)
    expected = np.mean([average_precision_score(labels == c, probabilities[:, c])
                        for c in range(10)])
    assert got == pytest.approx(expected, abs=1e-9)
    # On raw logits the offset would have changed the ranking (what the fix removes):
    raw = np.mean([average_precision_score(labels == c, shifted[:, c]) for c in range(10)])
    assert abs(raw - got) > 0.1


def average_precision_within(relevant, r):
    """MAP@R of one query: precision at each relevant rank among the first r, over r."""
    hits, total = 0, 0.0
    for rank in range(r):
        if relevant[rank]:
            hits += 1
            total += hits / (rank + 1)
    return total / r


def brute_force_retrieval(embeddings, labels):
    """Every query against every other image, full sort, definitions spelled out."""
    x = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    p_at_1, map_at_r = [], []
    for q in range(len(x)):
        others = [i for i in range(len(x)) if i != q]
        r = sum(labels[i] == labels[q] for i in others)
        if r == 0:
            continue
        ranked = sorted(others, key=lambda i: -float(x[q] @ x[i]))
        relevant = [labels[i] == labels[q] for i in ranked]
        p_at_1.append(float(relevant[0]))
        map_at_r.append(average_precision_within(relevant, r))
    return np.mean(p_at_1), np.mean(map_at_r)


@pytest.mark.parametrize("block_size", [1, 7, 1000])
def test_retrieval_metrics_match_brute_force(block_size):
    rng = np.random.default_rng(1)
    labels = np.concatenate([rng.integers(0, 5, 60), [7]])  # class 7: one image, no query
    embeddings = rng.normal(size=(61, 8)) + 2.0 * np.eye(8)[labels]
    got = retrieval_metrics(embeddings * rng.uniform(0.5, 3, (61, 1)), labels, block_size)
    p_at_1, map_at_r = brute_force_retrieval(embeddings, labels)
    assert got["precision_at_1"] == pytest.approx(p_at_1, abs=1e-12)
    assert got["map_at_r"] == pytest.approx(map_at_r, abs=1e-12)
    assert 0.2 < got["map_at_r"] < 0.99  # neither trivial nor chance


def test_retrieval_metrics_of_perfect_and_hand_computed_embeddings():
    labels = np.array([0, 0, 1, 1])
    perfect = np.array([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0], [0.01, 1.0]])
    assert retrieval_metrics(perfect, labels) == {"precision_at_1": 1.0, "r_precision": 1.0,
                                                  "map_at_r": 1.0}
    # Every query's nearest neighbour is of the other class: P@1 = 0, MAP@R (R = 1) = 0.
    mixed = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert retrieval_metrics(mixed, labels) == {"precision_at_1": 0.0, "r_precision": 0.0,
                                                "map_at_r": 0.0}


def test_auroc_matches_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    from tfmargin.metrics import auroc

    rng = np.random.default_rng(0)
    known = np.round(rng.normal(1.0, 1.0, 300), 1)  # rounded: many ties
    unknown = np.round(rng.normal(0.0, 1.0, 200), 1)
    expected = roc_auc_score(np.r_[np.ones(300), np.zeros(200)], np.r_[known, unknown])
    assert auroc(known, unknown) == pytest.approx(expected, abs=1e-12)
    assert auroc([2.0, 3.0], [0.0, 1.0]) == 1.0 and auroc([1.0], [1.0]) == 0.5


def brute_force_oscr(known, correct, unknown):
    """Every threshold (accept score >= t) from the top, the curve's points by counting."""
    points = [(0.0, 0.0)]
    for t in sorted(set(known) | set(unknown), reverse=True):
        fpr = sum(u >= t for u in unknown) / len(unknown)
        ccr = sum(k >= t and c for k, c in zip(known, correct, strict=True)) / len(known)
        points.append((fpr, ccr))
    return sum((b[0] - a[0]) * (a[1] + b[1]) / 2 for a, b in zip(points, points[1:], strict=False))


def test_oscr_matches_a_brute_force_curve():
    from tfmargin.metrics import oscr

    rng = np.random.default_rng(1)
    known = np.round(rng.normal(1.0, 1.0, 120), 1)
    correct = rng.uniform(size=120) < 0.8
    unknown = np.round(rng.normal(0.0, 1.0, 80), 1)
    expected = brute_force_oscr(known.tolist(), correct.tolist(), unknown.tolist())
    assert oscr(known, correct, unknown) == pytest.approx(expected, abs=1e-12)
    # Perfect separation: the area is the closed-set accuracy.
    assert oscr([5.0, 6.0, 7.0], [True, True, False], [0.0, 1.0]) == pytest.approx(2 / 3)


def test_calibration_metrics_against_a_direct_computation():
    from tfmargin.metrics import calibration_metrics

    rng = np.random.default_rng(2)
    logits = rng.normal(size=(500, 4)) * 3
    labels = rng.integers(0, 4, 500)
    p = np.exp(logits / 2.0) / np.exp(logits / 2.0).sum(1, keepdims=True)
    confidence, predicted = p.max(1), p.argmax(1)
    ece = 0.0
    for low in np.arange(15) / 15:  # bins (low, low + 1/15]
        inside = (confidence > low) & (confidence <= low + 1 / 15)
        if inside.any():
            ece += inside.sum() / 500 * abs((predicted[inside] == labels[inside]).mean()
                                            - confidence[inside].mean())
    got = calibration_metrics(logits, labels, temperature=2.0)
    assert got["ece"] == pytest.approx(ece, abs=1e-12)
    assert got["nll"] == pytest.approx(-np.log(p[np.arange(500), labels]).mean(), abs=1e-10)
    assert got["brier"] == pytest.approx(((p - np.eye(4)[labels]) ** 2).sum(1).mean(), abs=1e-12)


def test_temperature_fit_finds_the_nll_minimum():
    from scipy.optimize import minimize_scalar

    from tfmargin.metrics import fit_temperature, negative_log_likelihood

    rng = np.random.default_rng(3)
    labels = rng.integers(0, 10, 2000)
    logits = rng.normal(size=(2000, 10)) + 2.0 * np.eye(10)[labels]
    logits *= 4.0  # over-confident: the best temperature is above 1
    best = minimize_scalar(lambda t: negative_log_likelihood(logits, labels, t),
                           bounds=(0.05, 50), method="bounded", options={"xatol": 1e-8}).x
    got = fit_temperature(logits, labels)
    assert got == pytest.approx(best, rel=1e-4) and got > 1.5


def test_rejection_threshold_keeps_the_asked_fraction_with_a_margin():
    from tfmargin.metrics import rejection_threshold

    scores = np.arange(40, dtype=float)  # floor(5 % of 40) = 2 rejected
    threshold = rejection_threshold(scores, keep=0.95)
    assert threshold == 1.5 and np.mean(scores >= threshold) == 0.95
    assert rejection_threshold([3.0, 4.0], keep=0.95) < 3.0  # none to reject


def brute_force_gallery(queries, query_labels, gallery, gallery_labels, k):
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    votes, p1, rp, mapr = [], [], [], []
    for i in range(len(q)):
        order = sorted(range(len(g)), key=lambda j: -float(q[i] @ g[j]))
        relevant = [gallery_labels[j] == query_labels[i] for j in order]
        r = int(np.sum(gallery_labels == query_labels[i]))
        nearest = [gallery_labels[j] for j in order[:k]]
        counts = {c: nearest.count(c) for c in set(nearest)}
        top = max(counts.values())
        tied = [c for c in counts if counts[c] == top]
        strength = {c: sum(float(q[i] @ g[j]) for j in order[:k] if gallery_labels[j] == c)
                    for c in tied}
        votes.append(max(tied, key=lambda c: strength[c]) == query_labels[i])
        p1.append(relevant[0])
        rp.append(sum(relevant[:r]) / r)
        mapr.append(average_precision_within(relevant, r))
    return {"knn_top1": np.mean(votes), "precision_at_1": np.mean(p1),
            "r_precision": np.mean(rp), "map_at_r": np.mean(mapr)}


@pytest.mark.parametrize("block_size", [3, 256])
def test_gallery_retrieval_matches_brute_force(block_size):
    from tfmargin.metrics import gallery_retrieval_metrics

    rng = np.random.default_rng(4)
    gallery_labels = rng.integers(0, 4, 90)
    query_labels = rng.integers(0, 4, 25)
    gallery = rng.normal(size=(90, 6)) + 1.5 * np.eye(6)[gallery_labels]
    queries = rng.normal(size=(25, 6)) + 1.5 * np.eye(6)[query_labels]
    got = gallery_retrieval_metrics(queries, query_labels, gallery, gallery_labels, k=5,
                                    block_size=block_size)
    expected = brute_force_gallery(queries, query_labels, gallery, gallery_labels, 5)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key
    assert 0.3 < got["map_at_r"] < 0.95


def test_open_set_scores_rank_known_images_higher():
    from tfmargin.metrics import knn_similarities
    from tfmargin.scores import energy, open_set_scores

    logits = np.array([[4.0, 0.0, 0.0], [0.5, 0.4, 0.3]])
    embeddings = np.array([[3.0, 0.0], [0.0, 0.5]])
    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [1.0, 0.05]])
    knn = knn_similarities(embeddings, gallery, ks=(1, 2))
    scores = open_set_scores(logits, np.linalg.norm(embeddings, axis=1), knn[:, 1],
                             reference={"feature_norm": (1.0, 1.0), "knn": (0.5, 0.5)})
    assert set(scores) == {"msp", "max_logit", "energy", "feature_norm", "projection",
                           "projection_energy", "projection_msp", "knn", "norm_knn"}
    assert all(scores[name][0] > scores[name][1] for name in scores)
    assert scores["feature_norm"].tolist() == [3.0, 0.5]
    np.testing.assert_allclose(energy(logits), np.log(np.exp(logits).sum(1)))
    # k-th nearest: the second most similar gallery embedding's cosine.
    np.testing.assert_allclose(knn_similarities(np.array([[1.0, 0.0]]), gallery, ks=(2,)),
                               [[1.0 / np.sqrt(1 + 0.05**2)]])


def reference_scores(logits, norm, knn, scale, reference):
    """Each score of one image at a time, with ``math`` (independent of tfmargin.scores)."""
    rows = {name: [] for name in ("max_logit", "msp", "energy", "feature_norm", "projection",
                                  "projection_energy", "projection_msp", "knn", "norm_knn")}
    for row, n, similarity in zip(logits.tolist(), norm.tolist(), knn.tolist(), strict=True):
        projected = row if scale is None else [n * value / scale for value in row]
        for name, values in (("", row), ("projection_", projected)):
            total = sum(math.exp(v) for v in values)
            rows["max_logit" if not name else "projection"].append(max(values))
            rows[name + "energy"].append(math.log(total))
            rows[name + "msp"].append(max(math.exp(v) for v in values) / total)
        rows["feature_norm"].append(n)
        rows["knn"].append(similarity)
        rows["norm_knn"].append((n - reference["feature_norm"][0]) / reference["feature_norm"][1]
                                + (similarity - reference["knn"][0]) / reference["knn"][1])
    return {name: np.array(values) for name, values in rows.items()}


@pytest.mark.parametrize("scale", [None, 8.0])
def test_every_score_matches_a_per_image_reference_in_numpy_and_in_the_export(scale):
    """scores.open_set_scores (NumPy) and export.open_set_score (TensorFlow, what the
    SavedModel serves) against a per-image computation, for a softmax and a cosine head."""
    from tfmargin.export import open_set_score
    from tfmargin.metrics import knn_similarities
    from tfmargin.scores import SCORES, open_set_scores

    rng = np.random.default_rng(3)
    embeddings = rng.normal(size=(12, 6)).astype("float32") * rng.uniform(0.5, 4, (12, 1))
    centres = rng.normal(size=(6, 4)).astype("float32")
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = unit @ (centres / np.linalg.norm(centres, axis=0))
    logits = (embeddings @ centres if scale is None else scale * cosine).astype("float32")
    gallery = rng.normal(size=(30, 6)).astype("float32")
    norm = np.linalg.norm(embeddings, axis=1)
    knn = knn_similarities(embeddings, gallery, ks=(3,))[:, 0]
    reference = {"feature_norm": (2.0, 0.7), "knn": (0.3, 0.2)}
    expected = reference_scores(logits.astype(np.float64), norm, knn, scale, reference)
    got = open_set_scores(logits, norm, knn, scale=scale, reference=reference)
    assert set(got) == set(SCORES) == set(expected)
    for name in SCORES:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-6, err_msg=name)
        served = open_set_score(name, logits, embeddings, scale=scale,
                                gallery=gallery / np.linalg.norm(gallery, axis=1,
                                                                 keepdims=True),
                                k=3, reference=reference).numpy()
        np.testing.assert_allclose(served, expected[name], rtol=2e-5, atol=2e-5,
                                   err_msg=name)


def outputs_of(logits, embeddings, labels, val=slice(0, 40), test=slice(40, None)):
    """Per-image outputs (``tfmargin.runner.evaluation.per_image_outputs``'s layout) of made-up
    predictions: the first rows as the validation split, the rest as the test split."""
    from tfmargin.runner.evaluation import stored

    norm = np.linalg.norm(embeddings, axis=1)
    return {"logits": stored(logits[test]), "embedding_norm": norm[test],
            "knn": norm[test] * 0, "labels": labels[test],
            "val_logits": stored(logits[val]), "val_embedding_norm": norm[val],
            "val_knn": norm[val] * 0, "val_labels": labels[val]}


@pytest.mark.parametrize("name", ["max_logit", "msp", "energy", "feature_norm"])
def test_the_exports_reject_scores_are_the_reported_ones(name):
    """The export's score (TensorFlow) per image equals the open-set score the metrics
    report (NumPy), and the reject option thresholds that score at the validation quantile."""
    from tfmargin.export import open_set_score
    from tfmargin.metrics import rejection_threshold
    from tfmargin.runner.evaluation import REJECT_KEEP, reject_option
    from tfmargin.scores import open_set_scores

    rng = np.random.default_rng(0)
    logits = rng.normal(scale=4.0, size=(60, 5)).astype("float16").astype("float32")
    embeddings = rng.normal(size=(60, 8)).astype("float32")
    served = open_set_score(name, logits, embeddings).numpy()
    reported = open_set_scores(logits, np.linalg.norm(embeddings, axis=1))[name]
    np.testing.assert_allclose(served, reported, rtol=1e-5)
    outputs = outputs_of(logits, embeddings, rng.integers(0, 5, 60))
    option = reject_option(outputs, score_name=name)
    kept = open_set_scores(outputs["val_logits"], outputs["val_embedding_norm"])[name]
    assert option["score"] == name and option["keep"] == REJECT_KEEP
    assert option["threshold"] == rejection_threshold(kept, REJECT_KEEP)
    assert option["val_rejected"] == 0.05  # floor(5 % of 40) = 2 of 40
    tested = open_set_scores(outputs["logits"], outputs["embedding_norm"])[name]
    assert option["test_rejected"] == np.mean(tested < option["threshold"])


def test_the_reject_threshold_parts_validation_scores_closer_than_half_precision():
    """Two neighbouring validation scores 0.001 apart (float16 keeps one value for both near
    7): the stored outputs keep them apart, so the export's float32 score rejects exactly the
    recorded images."""
    from tfmargin.export import open_set_score
    from tfmargin.runner.evaluation import reject_option

    rng = np.random.default_rng(1)
    logits = np.concatenate([np.full((40, 1), 7.0) + np.arange(40)[:, None] * 0.05,
                             rng.normal(size=(40, 4))], axis=1).astype("float32")
    logits[1, 0], logits[2, 0] = 7.0501, 7.0511  # the 2nd and 3rd lowest maximum logits
    embeddings = rng.normal(size=(40, 8)).astype("float32")
    option = reject_option(outputs_of(logits, embeddings, np.zeros(40, int),
                                      val=slice(0, 40), test=slice(0, 40)), "max_logit")
    served = open_set_score("max_logit", logits, embeddings).numpy()
    assert option["val_rejected"] == 0.05  # floor(5 % of 40) = 2 of 40
    assert np.flatnonzero(served < option["threshold"]).tolist() == [0, 1]


def test_an_unknown_reject_score_is_refused_with_the_choices():
    from tfmargin.export import open_set_score
    from tfmargin.runner.config import ConfigError, RunConfig

    with pytest.raises(ConfigError, match="unknown reject score 'kNN'; choose one of "
                                          "auto, max_logit, msp, energy, feature_norm, "):
        RunConfig(reject_score="kNN").validate()
    with pytest.raises(ValueError, match="unknown reject score 'kNN'"):
        open_set_score("kNN", np.zeros((1, 2)), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="'knn' needs a gallery of training embeddings"):
        open_set_score("knn", np.zeros((1, 2)), np.zeros((1, 2)))


def test_gallery_retrieval_leaves_out_queries_of_a_class_the_gallery_lacks():
    """A query whose class has no gallery image has no R: it is left out of P@1, R-precision
    and MAP@R (no division by zero) and counted wrong by the vote; a gallery smaller than
    k votes with what it has."""
    from tfmargin.metrics import gallery_retrieval_metrics

    gallery = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    queries = np.array([[1.0, 0.05], [0.05, 1.0], [-1.0, -1.0]])
    with np.errstate(all="raise"):
        got = gallery_retrieval_metrics(queries, np.array([0, 1, 2]), gallery,
                                        np.array([0, 0, 1]), k=10)
    assert got["precision_at_1"] == 1.0 and got["map_at_r"] == 1.0
    assert got["knn_top1"] == pytest.approx(1 / 3)  # 3 gallery images: every vote is class 0
