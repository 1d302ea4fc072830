import importlib

import keras
import numpy as np
import pytest

from tfmargin.backbones import build_backbone
from tfmargin.classifier import MarginClassifier
from tfmargin.names import BACKBONES


def builder(name):
    module, function = BACKBONES[name][0].split(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("name,size,channels", [
    ("resnet18", 4, 512), ("mobilenetv2", 4, 1280), ("efficientnetb0", 4, 1280),
    ("tinycnn", 8, 128), ("airbench94", 1, 256), ("airbench93", 1, 128)])
def test_backbone_feature_map_matches_its_docstring(name, size, channels):
    model = build_backbone(name)
    if name.startswith("airbench"):  # pooled inside the backbone
        assert tuple(model.output.shape[1:]) == (channels,)
        assert f"{channels}" in builder(name).__doc__
        return
    assert tuple(model.output.shape[1:]) == (size, size, channels)
    assert f"{size}x{size}x{channels}" in builder(name).__doc__


@pytest.mark.parametrize("name", ["resnet18", "mobilenetv2", "efficientnetb0"])
def test_backbone_trains_a_step_with_a_margin_head(name):
    model = MarginClassifier(name, 3, embedding_dim=16, scale=8.0, margin=0.3)
    model.compile("sgd")
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = np.array([0, 1, 2, 0])
    before = [w.numpy().copy() for w in model.head.weights]
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.0 < logs["theta_y_mean"] < 180.0
    assert not np.allclose(before[0], model.head.weights[0].numpy())
    assert model.predict(images, verbose=0).shape == (4, 3)


def test_batchnorm_momentum_is_lowered_everywhere():
    for name in ("mobilenetv2", "efficientnetb0", "resnet18"):
        momenta = {layer.momentum for layer in build_backbone(name).layers
                   if isinstance(layer, keras.layers.BatchNormalization)}
        assert momenta == {0.9}, (name, momenta)


def test_unknown_backbone_names_the_choices():
    with pytest.raises(ValueError, match="Unknown backbone 'vgg'; choose one of resnet18"):
        build_backbone("vgg")


def test_efficientnet_is_adapted_however_many_are_built():
    from tfmargin.backbones import efficientnetb0

    for _ in range(3):  # auto-named layers become rescaling_1, rescaling_2, ...
        model = efficientnetb0()
        assert len([layer for layer in model.layers if isinstance(
            layer, (keras.layers.Rescaling, keras.layers.Normalization))]) == 2
        # Its built-in x/255 and normalisation are identities: the stem sees the input.
        x = np.random.default_rng(0).normal(size=(1, 32, 32, 3)).astype("float32")
        stem = keras.Model(model.input, model.get_layer("stem_conv").input)(x)
        np.testing.assert_allclose(stem.numpy()[0, 1:-1, 1:-1], x[0], atol=1e-5)
        assert model.get_layer("stem_conv").strides == (1, 1)


def test_adaptation_that_matches_no_layer_fails_loudly():
    from tfmargin.backbones import _adapt_application

    base = keras.applications.MobileNetV2(input_shape=(32, 32, 3), include_top=False,
                                          weights=None)
    with pytest.raises(ValueError, match=r"no layer matches \['Conv9'\]"):
        _adapt_application(base, "mobilenetv2", {"Conv9": {"strides": (1, 1)}})


@pytest.mark.parametrize("ce_weight", [0.0, 0.3])
def test_mixed_objective_weights_margin_and_plain_cross_entropy(ce_weight):
    from tfmargin.runner.config import RunConfig
    from tfmargin.runner.train import compile_model

    model = MarginClassifier("tinycnn", 4, margin=0.5, scale=8.0, embedding_dim=8,
                             ce_weight=ce_weight)
    compile_model(model, RunConfig(ce_weight=ce_weight, learning_rate=1e-9, epochs=1,
                                   warmup_epochs=0).resolved(), steps_per_epoch=1,
                  global_batch=6)
    images = np.random.default_rng(1).uniform(0, 255, (6, 32, 32, 3)).astype("float32")
    labels = np.array([0, 1, 2, 3, 0, 1])
    ce = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    embedding = model.embed(images, training=True)
    margin = model.head(embedding, labels=labels, training=True)
    plain = model.head(embedding)
    expected = (1 - ce_weight) * float(ce(labels, margin)) + ce_weight * float(ce(labels, plain))
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert logs["loss"] == pytest.approx(expected, rel=1e-4)
    assert float(ce(labels, margin)) > float(ce(labels, plain))  # the margin makes it harder


def test_mixed_precision_model_gives_losses_and_metrics_float32():
    from tfmargin.runner.config import RunConfig
    from tfmargin.runner.train import compile_model

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = MarginClassifier("tinycnn", 6, scale=8.0, embedding_dim=8)
        compile_model(model, RunConfig(backbone="tinycnn").resolved(), steps_per_epoch=2,
                      global_batch=4)
    finally:
        keras.config.set_dtype_policy("float32")
    assert model.output.dtype == "float32"
    assert model.get_layer("projection").compute_dtype == "bfloat16"
    images = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    labels = np.array([0, 1, 2, 5])
    logs = model.train_on_batch(images, labels, return_dict=True)
    assert np.isfinite(logs["loss"]) and 0.0 <= logs["top5"] <= 1.0
