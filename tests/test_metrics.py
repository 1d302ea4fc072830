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
        hits, total = 0, 0.0
        for i in range(r):
            if relevant[i]:
                hits += 1
                total += hits / (i + 1)
        map_at_r.append(total / r)
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
    assert retrieval_metrics(perfect, labels) == {"precision_at_1": 1.0, "map_at_r": 1.0}
    # Every query's nearest neighbour is of the other class: P@1 = 0, MAP@R (R = 1) = 0.
    mixed = np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])
    assert retrieval_metrics(mixed, labels) == {"precision_at_1": 0.0, "map_at_r": 0.0}
