import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from tfmargin.metrics import average_precision, classification_metrics


def test_average_precision_matches_scikit_learn_including_ties():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scores = np.round(rng.normal(size=200), 1)  # rounding makes many ties
        positives = rng.random(200) < 0.3
        assert average_precision(scores, positives) == pytest.approx(
            average_precision_score(positives, scores), abs=1e-12)


def test_map_is_the_mean_of_per_class_ap_on_fixed_inputs():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.5, 0.4]])
    labels = np.array([0, 1, 1, 2])
    expected = np.mean([average_precision_score(labels == c, scores[:, c]) for c in range(3)])
    metrics = classification_metrics(scores, labels)
    assert metrics["mAP"] == pytest.approx(expected)
    assert metrics["mAP"] == pytest.approx((1.0 + (1 + 2 / 3) / 2 + 1.0) / 3)
    assert metrics["top1"] == pytest.approx(0.5)
    assert metrics["top5"] == 1.0
