"""A trained model's numbers: predictions of each split, the per-image outputs the ledger
keeps, and every metric of the run computed from those outputs.

The validation split chooses (the temperature, the reject threshold); the test split
is predicted once, here, for the reported numbers. Every logit-based figure (top-1, mAP,
calibration, open set, rejection) is computed from the per-image outputs that
``test_predictions.npz`` keeps (``per_image_outputs``), so anyone can recompute it from the
ledger (``metrics_from_outputs``); retrieval needs the embeddings themselves and is computed
from them here.
"""

import numpy as np
import tensorflow as tf

from tfmargin import metrics as m
from tfmargin import scores as sc
from tfmargin.names import TTA_LEVELS
from tfmargin.tta import tta_logits

# The export's reject option keeps this fraction of the known validation images (the score
# it thresholds is the run's --reject-score, tfmargin.scores.SCORES).
REJECT_KEEP = 0.95
# A run without test-time augmentation still reports the test top-1 with it, at this level
# (airbench's six views), beside the plain figure.
REPORTED_TTA = max(TTA_LEVELS)
# The precision of the per-image outputs (logits, norms, kNN similarities): the export's, so a
# score the SavedModel computes again falls on the side of the reject threshold (chosen from
# these stored values) that the validation image's did. In float16 two neighbouring
# validation scores could round to one value, and the threshold then no longer told them
# apart.
OUTPUT_DTYPE = np.float32
# The splits of the per-image outputs in test_predictions.npz, by the prefix of their arrays
# (``<prefix>logits``, ``<prefix>embedding_norm``, ``<prefix>knn``; besides labels, predicted
# and target_angle_deg (docs/training.md, "Per-image outputs"). Splits: "" the known test
# images, "val_" the validation images, "unknown_" the held-out classes' test images,
# "unknown_val_" the held-out classes' validation images (their training images, never
# their test images), "far_" the far-away images (``far_images``; ``far_set`` gives each
# image's set, an index into ``far_set_names``). ``logits`` of the test split are the plain
# ones; ``served_logits`` (only when the run serves test-time augmentation) the served ones;
# the other splits keep the served logits as ``<split>logits``.
SPLITS = {"": "test", "val_": "val", "unknown_": "unknown_test", "unknown_val_": "unknown_val"}


def prediction_step(model, tta=0):
    """One traced function ``uint8 images -> (logits, served logits, embeddings)`` for
    every split. ``model``: ``MarginClassifier.logits_and_embeddings``; ``served``: the
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


def stored(values):
    """Per-image values as the ledger keeps them (``OUTPUT_DTYPE``)."""
    return np.asarray(values, OUTPUT_DTYPE)


def per_image_outputs(predicted, gallery):
    """The per-image outputs of each split in ``predicted`` (``{split prefix: predict_split
    output or None}``, prefixes of ``SPLITS``): served logits, the embedding's norm
    before normalisation, and the kNN similarities at each of ``scores.KNN_KS`` against
    ``gallery`` (training embeddings), all in ``OUTPUT_DTYPE``; the test split also its
    plain logits and labels."""
    outputs = {}
    for prefix, split in predicted.items():
        if split is None:
            continue
        outputs |= {f"{prefix}logits": stored(split["logits" if not prefix else "served"]),
                    f"{prefix}embedding_norm": stored(np.linalg.norm(split["embeddings"],
                                                                     axis=1)),
                    f"{prefix}knn": stored(m.knn_similarities(split["embeddings"], gallery))}
        if prefix == "val_":
            outputs["val_labels"] = split["labels"].astype(np.int32)
    test = predicted[""]
    outputs["labels"] = test["labels"].astype(np.int32)
    if not np.array_equal(test["served"], test["logits"]):
        outputs["served_logits"] = stored(test["served"])
    return outputs


def served_logits(outputs, prefix=""):
    """The served logits of one split of the per-image outputs."""
    return outputs.get("served_logits", outputs["logits"]) if not prefix \
        else outputs[f"{prefix}logits"]


def validation_reference(outputs, k):
    """What ``norm_knn`` is standardised with: the known validation images' mean and
    standard deviation of the norm and of the kNN similarity at ``k`` (None without a
    validation split)."""
    if "val_logits" not in outputs:
        return None
    return {"feature_norm": sc.standardizer(outputs["val_embedding_norm"]),
            "knn": sc.standardizer(sc.knn_column(outputs["val_knn"], k))}


def split_scores(outputs, prefix, scale=None, k=sc.LEGACY_KNN_K):
    """Every open-set score (``scores.open_set_scores``) of one split's per-image outputs,
    from its served logits; ``scale``: the cosine head's (None: softmax); ``k``: the kNN
    score's neighbour."""
    reference = validation_reference(outputs, k)
    return sc.open_set_scores(served_logits(outputs, prefix), outputs[f"{prefix}embedding_norm"],
                              sc.knn_column(outputs[f"{prefix}knn"], k), scale=scale,
                              reference=reference)


def calibration(outputs):
    """Calibration of the served test logits before and after temperature scaling, the
    temperature fitted by NLL on the validation split (no validation split: before only);
    ``val``: the expected calibration error of the validation logits themselves, before and
    after, for choices made on validation."""
    logits, labels = served_logits(outputs), outputs["labels"]
    result = {"before": m.calibration_metrics(logits, labels),
              "bins_before": m.reliability_bins(logits, labels)}
    if "val_logits" in outputs:
        temperature = m.fit_temperature(outputs["val_logits"], outputs["val_labels"])
        low, high = m.TEMPERATURE_RANGE
        result |= {"temperature": temperature,
                   # At the floor: the validation images are separated so cleanly that the
                   # NLL falls without end as the logits sharpen; the probabilities then say
                   # little beyond the class.
                   "temperature_at_bound": not low * 1.01 < temperature < high / 1.01,
                   "after": m.calibration_metrics(logits, labels, temperature),
                   "bins_after": m.reliability_bins(logits, labels, temperature),
                   "val": m.ece_before_after(outputs["val_logits"], outputs["val_labels"],
                                             temperature)}
    return result


def reject_option(outputs, score_name="max_logit", scale=None, k=sc.LEGACY_KNN_K):
    """The reject threshold: the served score ``score_name`` (``scores.SCORES``) above
    which ``REJECT_KEEP`` of the known validation images lie; how many images of each split
    it rejects; and what the export needs to compute the score again (``k`` and the
    standardisation of ``norm_knn``)."""
    val_scores = split_scores(outputs, "val_", scale, k)[score_name]
    threshold = m.rejection_threshold(val_scores, REJECT_KEEP)
    result = {"score": score_name, "keep": REJECT_KEEP, "threshold": threshold,
              "chosen_on": "validation",
              "val_rejected": float(np.mean(val_scores < threshold)),
              "test_rejected": float(np.mean(split_scores(outputs, "", scale, k)[score_name]
                                             < threshold))}
    if score_name in sc.GALLERY_SCORES:
        result["k"] = k
    if score_name == "norm_knn":
        result["reference"] = validation_reference(outputs, k)
    for prefix, split in (("unknown_", "unknown"), ("unknown_val_", "unknown_val")):
        if f"{prefix}logits" in outputs:
            result[f"{split}_rejected"] = float(np.mean(
                split_scores(outputs, prefix, scale, k)[score_name] < threshold))
    return result


def open_set(outputs, known="", unknown="unknown_", scale=None):
    """AUROC and OSCR of every score (the kNN score at each of ``scores.KNN_KS`` as
    ``knn@k``), the known images of split ``known`` against the held-out classes' of split
    ``unknown``."""
    labels = outputs["labels"] if not known else outputs[f"{known}labels"]
    correct = np.argmax(served_logits(outputs, known), axis=1) == labels
    figures = m.open_set_metrics(split_scores(outputs, known, scale),
                                 correct, split_scores(outputs, unknown, scale))
    if np.ndim(outputs[f"{known}knn"]) == 2:
        for k in sc.KNN_KS:
            figures[f"knn@{k}"] = m.open_set_metrics(
                {"knn": sc.knn_column(outputs[f"{known}knn"], k)}, correct,
                {"knn": sc.knn_column(outputs[f"{unknown}knn"], k)})["knn"]
    return figures | {
        "known_size": int(len(labels)),
        "unknown_size": int(len(outputs[f"{unknown}logits"])),
        "closed_set_top1": float(np.mean(correct))}


def far_away(outputs, scale=None, reject=None, k=sc.LEGACY_KNN_K):
    """Per far-away set (``far_set_names``): its size, the AUROC of every score with the
    known test images against the set's, and the share of the set the reject option
    (``reject_option``'s result) rejects."""
    known, far = (split_scores(outputs, prefix, scale, k) for prefix in ("", "far_"))
    result = {}
    for index, name in enumerate(outputs["far_set_names"]):
        chosen = outputs["far_set"] == index
        result[str(name)] = {"size": int(chosen.sum()), "auroc": {
            score: m.auroc(known[score], far[score][chosen]) for score in known}}
        if reject:
            result[str(name)]["rejected"] = float(np.mean(far[reject["score"]][chosen]
                                                          < reject["threshold"]))
    return result


def metrics_from_outputs(outputs, *, tta_level, scale=None, reject_score="max_logit",
                         knn_k=sc.LEGACY_KNN_K):
    """Every logit-based figure of a run from its per-image outputs (``per_image_outputs``,
    or a ledger run's ``test_predictions.npz``): classification of the plain and (when
    served) the augmented test logits, calibration, open set on the test split and on the
    validation split (``open_set_val``: the held-out classes' training images), the reject
    option. ``scale``: the cosine head's (None: softmax); ``knn_k``: the served kNN score's
    neighbour."""
    labels = outputs["labels"]
    results = m.classification_metrics(outputs["logits"], labels)
    if "served_logits" in outputs:
        results["tta"] = m.classification_metrics(outputs["served_logits"], labels) | {
            "level": tta_level, "served": True}
    results["calibration"] = calibration(outputs)
    if "unknown_logits" in outputs:
        results["open_set"] = open_set(outputs, scale=scale)
    if "unknown_val_logits" in outputs:
        results["open_set_val"] = open_set(outputs, "val_", "unknown_val_", scale)
    if "val_logits" in outputs:
        results["reject"] = reject_option(outputs, reject_score, scale, knn_k)
    if "far_logits" in outputs:
        results["far_ood"] = far_away(outputs, scale, results.get("reject"), knn_k)
    return results


def evaluate(model, data, batch_size, tta=0, reject_score="max_logit", knn_k=sc.LEGACY_KNN_K,
             far_sets=None):
    """Every metric of a trained model; returns ``(metrics, per-image outputs, gallery)``,
    the gallery being the training embeddings a kNN score reads; ``far_sets``: ``{name:
    uint8 images}`` of no known class (``far_images.far_image_sets``).

    Test: classification (also with test-time augmentation, ``REPORTED_TTA``
    views when the run serves none), self-retrieval, retrieval against the
    training images as the gallery, calibration, the reject option and (with held-out
    classes) open-set recognition; the far-away images against the known test images.
    Validation: classification and retrieval,
    the choices (temperature, threshold), and (with held-out classes) open-set
    recognition against the held-out classes' validation images.
    """
    network = model.logits_and_embeddings()
    step = prediction_step(network, tta)
    # One pass over the test split gives the plain logits and the augmented views' logits.
    test = predict_split(prediction_step(network, tta or REPORTED_TTA), data.test, batch_size)
    augmented = test["served"]
    if not tta:  # the export serves the plain logits
        test["served"] = test["logits"]
    # The gallery needs embeddings only: no test-time augmentation views.
    train = predict_split(prediction_step(network), data.train, batch_size)
    gallery = train["embeddings"][:sc.GALLERY_SIZE]
    predicted = {"": test}
    for prefix, split in SPLITS.items():
        if prefix and getattr(data, split, None) is not None:
            predicted[prefix] = predict_split(step, getattr(data, split), batch_size)
    if far_sets:
        images = np.concatenate(list(far_sets.values()))
        predicted["far_"] = predict_split(step, tf.data.Dataset.from_tensor_slices(
            (images, np.full(len(images), -1, np.int32))), batch_size)
    outputs = per_image_outputs(predicted, gallery)
    if far_sets:
        outputs |= {"far_set": np.repeat(np.arange(len(far_sets), dtype=np.int8),
                                         [len(images) for images in far_sets.values()]),
                    "far_set_names": np.array(list(far_sets))}
    results = metrics_from_outputs(outputs, tta_level=tta, scale=getattr(model.head, "scale",
                                                                        None),
                                   reject_score=reject_score, knn_k=knn_k)
    results |= m.retrieval_metrics(test["embeddings"], test["labels"])
    results["test_size"] = int(len(test["labels"]))
    if not tta:  # reported beside the plain figure, not served: not in the outputs
        results["tta"] = m.classification_metrics(augmented, test["labels"]) | {
            "level": REPORTED_TTA, "served": False}
    results["gallery"] = m.gallery_retrieval_metrics(
        test["embeddings"], test["labels"], train["embeddings"], train["labels"])
    if "val_" in predicted:
        val = predicted["val_"]
        # The plain logits, as the test split's top-1 (the outputs keep the served ones).
        results["val"] = (m.classification_metrics(val["logits"], val["labels"])
                          | m.retrieval_metrics(val["embeddings"], val["labels"]))
    return results, outputs, gallery
