"""Open-set scores: how much an image looks like one of the known classes (higher: more).

Each score is a function of what a run keeps per image (``test_predictions.npz``): the
served logits, the embedding's norm before normalisation and its kNN similarities to a
gallery of training embeddings, with the head's scale. So every open-set figure can be
recomputed from the ledger, and a new score needs no retraining. The export computes the
same scores in TensorFlow (``tfmargin.export.open_set_score``; tested equal).

A cosine head's logits are ``s cos(theta_j)``: they discard the embedding's norm, which is
where much of the known/unknown signal of a normalised head lies (the *projection* scores
and ``feature_norm``); label smoothing pins the maximum cosine of confident images to a band
(``docs/heads.md``, "Rejecting unknown images").
"""

import numpy as np

# The neighbours whose similarity the kNN score reads (Sun et al. 2022 use k = 50 on
# CIFAR-10 with the whole training set); each run keeps all of them, k is chosen on
# validation.
KNN_KS = (1, 5, 10, 20, 50)
# The kNN gallery: this many training embeddings (the first of the training split), the
# same in the reported figures and in an export that serves a kNN score.
GALLERY_SIZE = 5000
# k of the ``knn`` column of runs recorded before KNN_KS (one column: the whole training
# set as the gallery).
LEGACY_KNN_K = 50

SCORES = {
    "max_logit": "the maximum logit; for a cosine head, s times the maximum cosine",
    "msp": "the maximum softmax probability",
    "energy": "logsumexp of the logits",
    "feature_norm": "the embedding's norm before normalisation",
    "projection": "the largest projection of the embedding on a normalised class centre, "
                  "norm x cosine (a softmax head: its maximum logit)",
    "projection_energy": "logsumexp of the projections",
    "projection_msp": "the maximum softmax probability of the projections",
    "knn": "the cosine similarity of the k-th nearest gallery embedding (k chosen on "
           "validation)",
    "norm_knn": "the norm and the kNN similarity, each standardised on the known validation "
                "images, summed",
}
# The scores that need a gallery of training embeddings.
GALLERY_SCORES = ("knn", "norm_knn")


def softmax(logits):
    """Row-wise softmax in float64, stable for any logit offset."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def energy(logits, temperature=1.0):
    """``T * logsumexp(logits / T)``: the negative free energy (Liu et al. 2020); higher for
    images the model knows."""
    z = np.asarray(logits, np.float64) / temperature
    top = z.max(axis=1)
    return temperature * (top + np.log(np.exp(z - top[:, None]).sum(axis=1)))


def projections(logits, embedding_norm, scale=None):
    """Each class's projection of the embedding on its normalised centre, ``||f|| cos
    theta_j = ||f|| logit_j / s`` for a cosine head (``scale`` s); a softmax head's logits
    (``scale`` None) already are projections, on unnormalised centres, and stay as they
    are."""
    logits = np.asarray(logits, np.float64)
    if scale is None:
        return logits
    return np.asarray(embedding_norm, np.float64)[:, None] * logits / scale


def knn_column(knn, k):
    """The similarities at ``k`` from a run's ``knn`` array (one column per ``KNN_KS``, or
    the single k = ``LEGACY_KNN_K`` column of an older run)."""
    knn = np.asarray(knn, np.float64)
    if knn.ndim == 1:
        if k != LEGACY_KNN_K:
            raise ValueError(f"this run kept the kNN score at k = {LEGACY_KNN_K} only")
        return knn
    return knn[:, KNN_KS.index(k)]


def standardizer(values):
    """``(mean, standard deviation)`` of known validation images' values."""
    values = np.asarray(values, np.float64)
    return float(values.mean()), float(max(values.std(), 1e-12))


def open_set_scores(logits, embedding_norm, knn=None, *, scale=None, reference=None):
    """Every score of ``SCORES`` per image (``knn`` and ``norm_knn`` only given ``knn``,
    the second only with ``reference``: ``{"feature_norm": (mean, sd), "knn": (mean, sd)}``
    of the known validation images, ``standardizer``).

    Args:
        logits: the served logits ``(N, C)``.
        embedding_norm: ``(N,)``, the embedding's norm before normalisation.
        knn: ``(N,)`` kNN similarities at one k (``knn_column``), or None.
        scale: the cosine head's scale s (None: a softmax head).
    """
    norm = np.asarray(embedding_norm, np.float64)
    projected = projections(logits, norm, scale)
    scores = {"max_logit": np.asarray(logits, np.float64).max(axis=1),
              "msp": softmax(logits).max(axis=1),
              "energy": energy(logits),
              "feature_norm": norm,
              "projection": projected.max(axis=1),
              "projection_energy": energy(projected),
              "projection_msp": softmax(projected).max(axis=1)}
    if knn is not None:
        scores["knn"] = np.asarray(knn, np.float64)
        if reference is not None:
            (norm_mean, norm_sd), (knn_mean, knn_sd) = reference["feature_norm"], \
                reference["knn"]
            scores["norm_knn"] = (norm - norm_mean) / norm_sd + \
                (scores["knn"] - knn_mean) / knn_sd
    return scores
