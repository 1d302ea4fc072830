"""The one training path (``MarginClassifier.compute_loss``) against the one it replaced.

Until this switch the runner trained a functional graph with the label as a second input
and two outputs, ``margin`` (the head called with the label) and ``plain`` (the label-free
logits), compiled with the losses ``{"margin": ce, "plain": ce}`` weighted ``1 - lambda``
and ``lambda``, on targets duplicated for both. That graph is rebuilt here from the
classifier's own layers, so both paths share every weight; on the same batch their losses
and gradients must agree to float32 round-off for every head type, with label smoothing,
MixUp-style soft targets and lambda > 0.
"""

import keras
import numpy as np
import pytest

from tfmargin.classifier import MarginClassifier, target_classes

HEADS = [("softmax", {}), ("arcface", dict(margin=0.3, scale=8.0)),
         ("cosface", dict(margin=0.2, scale=8.0)), ("sphereface", dict(margin=1.5, scale=8.0)),
         ("combined", dict(margin=(1.0, 0.3, 0.2), scale=8.0)), ("normface", dict(scale=8.0))]


def legacy_graph(model):
    """The replaced training model: {image, label} -> {margin, plain}, sharing ``model``'s
    layers."""
    label = keras.Input((), dtype="int32", name="label")
    embedding = model.get_layer("embedding").output
    outputs = {"plain": keras.layers.Identity(name="plain", dtype="float32")(model.output)}
    if model.uses_margin:
        outputs["margin"] = keras.layers.Identity(name="margin", dtype="float32")(
            model.head(embedding, labels=label))
    return keras.Model({"image": model.input, "label": label}, outputs)


def batch(num_classes, soft):
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, num_classes, 8)
    if soft == "none":
        return images, labels, labels
    one_hot = np.eye(num_classes, dtype="float32")[labels]
    if soft == "mixup":  # a MixUp of each image with the next one, lambda 0.7
        mix = 0.7 * one_hot + 0.3 * np.roll(one_hot, 1, axis=0)
        return images, mix, np.argmax(mix, axis=1)
    return images, one_hot, labels  # one-hot, smoothed by the loss


def loss_and_gradients(model, compute):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        loss = compute()
    grads = tape.gradient(loss, model.trainable_variables)
    return float(loss), [g.numpy() for g in grads]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow",
                    reason="the replaced path was the TensorFlow runner's")
@pytest.mark.parametrize("soft,smoothing,ce_weight", [
    ("none", 0.0, 0.0), ("onehot", 0.2, 0.0), ("mixup", 0.0, 0.0), ("onehot", 0.1, 0.4)])
@pytest.mark.parametrize("head,settings", HEADS, ids=[h for h, _ in HEADS])
def test_old_and_new_path_agree_on_loss_and_gradients(head, settings, soft, smoothing,
                                                      ce_weight):
    num_classes = 5
    if head == "softmax" and ce_weight:
        pytest.skip("lambda mixes margin and plain logits: a softmax head has one")
    model = MarginClassifier("tinycnn", num_classes, margin_type=head, embedding_dim=8,
                             ce_weight=ce_weight, **settings)
    if soft == "none":
        loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        loss = keras.losses.CategoricalCrossentropy(from_logits=True,
                                                    label_smoothing=smoothing)
    model.compile("sgd", loss)
    old = legacy_graph(model)
    names = list(old.output)
    old.compile("sgd", {n: loss for n in names},
                loss_weights={"margin": 1.0 - ce_weight, "plain": ce_weight}
                if model.uses_margin else None)
    images, y, dominant = batch(num_classes, soft)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(target_classes(
        keras.ops.convert_to_tensor(y), num_classes)), dominant)

    new_loss, new_grads = loss_and_gradients(model, lambda: model.compute_loss(
        images, y, model(images, training=True), training=True))
    inputs = {"image": images, "label": dominant.astype("int32")}
    old_loss, old_grads = loss_and_gradients(model, lambda: old.compute_loss(
        inputs, {n: y for n in names}, old(inputs, training=True), training=True))

    assert new_loss == pytest.approx(old_loss, rel=1e-6, abs=1e-7)
    assert len(new_grads) == len(old_grads) > 0
    for new, previous in zip(new_grads, old_grads, strict=True):
        # float32 round-off: the two graphs sum the same terms in other orders. SphereFace's
        # ψ(θ) = (-1)^k cos(mθ) - 2k reaches the embedding through dθ/dcos θ = -1/sin θ,
        # which magnifies that round-off (seen: 1.7e-4 relative on one of 128 weights, on a
        # CPU with AVX2 kernels only); a wrong path differs by orders of magnitude more.
        scale = float(np.abs(previous).max()) + 1e-12
        tolerance = 2e-4 if head == "sphereface" else 2e-5
        np.testing.assert_allclose(new, previous, rtol=1e-5, atol=tolerance * scale)
    if model.uses_margin and head != "normface":  # the margin entered: not the plain CE
        plain = float(loss(y, model(images, training=True)))
        assert abs(new_loss - plain) > 1e-3
