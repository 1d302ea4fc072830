"""The airbench port: whitening, dirac init, optimizer, schedule, lookahead, augmentation,
test-time augmentation, and the recipe end to end on tiny data."""

import dataclasses
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from synthetic import write_image_folder

from tfmargin.airbench import PartialDirac, PatchWhitening, airbench93
from tfmargin.optimizers import L2SGD, WarmupLinearDecay
from tfmargin.pipeline import alternating_flip_translate
from tfmargin.runner.lookahead import Lookahead
from tfmargin.tta import tta_logits, tta_views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def correlated_images(n=64, size=12, seed=0):
    """Smooth, channel-correlated images: a patch covariance far from the identity."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(n, size + 1, size + 1, 1))
    smooth = (base[:, 1:, 1:] + base[:, :-1, :-1] + base[:, 1:, :-1]) / 3
    colour = np.array([1.0, 0.8, 0.5])
    return smooth * colour + 0.1 * rng.normal(size=(n, size, size, 3))


def test_whitened_patches_of_the_init_images_have_identity_covariance():
    images = correlated_images()
    layer = PatchWhitening(eps=5e-4)
    layer.adapt(images)
    out = keras.ops.convert_to_numpy(layer(images.astype("float32"))).astype(np.float64)
    assert out.shape == (64, 11, 11, 24)
    whitened = out[..., :12].reshape(-1, 12)
    second_moment = whitened.T @ whitened / len(whitened)
    # Independent of the layer: eigenvalues of the raw patches' second moment, by brute force.
    patches = np.stack([images[:, i:i + 11, j:j + 11].reshape(-1, 3)
                        for i in (0, 1) for j in (0, 1)], axis=1).reshape(-1, 12)
    eigenvalues = np.sort(np.linalg.eigvalsh(patches.T @ patches / len(patches)))[::-1]
    assert eigenvalues[0] / eigenvalues[-1] > 100  # far from white to start with
    np.testing.assert_allclose(second_moment, np.diag(eigenvalues / (eigenvalues + 5e-4)),
                               atol=2e-5)
    assert np.all(np.abs(np.diag(second_moment) - 1) <= 5e-4 / eigenvalues + 2e-5)
    np.testing.assert_allclose(out[..., 12:], -out[..., :12], atol=1e-5)  # the negated half
    assert layer.kernel.trainable is False and layer.bias.trainable is True


def test_partial_dirac_passes_the_first_channels_through():
    x = np.random.default_rng(0).normal(size=(2, 6, 6, 4)).astype("float32")
    same = keras.layers.Conv2D(4, 3, padding="same", use_bias=False,
                               kernel_initializer=PartialDirac(seed=1))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(same(x)), x, atol=1e-6)
    wider = keras.layers.Conv2D(10, 3, padding="same", use_bias=False,
                                kernel_initializer=PartialDirac(seed=1))
    y = keras.ops.convert_to_numpy(wider(x))
    np.testing.assert_allclose(y[..., :4], x, atol=1e-6)
    rest = keras.ops.convert_to_numpy(wider.kernel)[..., 4:]
    bound = 1 / np.sqrt(3 * 3 * 4)
    assert np.abs(rest).max() <= bound and np.abs(rest).max() > 0.8 * bound


def test_airbench93_shapes_and_parameters():
    model = airbench93()
    assert model.output_shape == (None, 128)
    assert model.get_layer("block3_bn2").output.shape[1:] == (3, 3, 128)
    bn = model.get_layer("block1_bn1")
    assert bn.momentum == 0.6 and bn.epsilon == 1e-12 and bn.scale is False


def test_fused_gelu_network_computes_the_keras_gelu_network_and_reloads(tmp_path):
    """airbench93(gelu="fused") has a FusedGELU at each of the seven GELUs; with the Keras
    network's weights it gives the same features (float32), and a .keras file of it
    reloads with identical outputs."""
    from tfmargin.activations import FusedGELU

    stock, fused = airbench93(), airbench93(gelu="fused")
    acts = [layer.name for layer in fused.layers if isinstance(layer, FusedGELU)]
    assert len(acts) == 7 and acts[0] == "whiten_act"
    assert not any(isinstance(layer, FusedGELU) for layer in stock.layers)
    fused.set_weights(stock.get_weights())
    images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(fused.predict(images, verbose=0),
                               stock.predict(images, verbose=0), rtol=1e-5, atol=1e-5)
    fused.save(tmp_path / "fused.keras")
    reloaded = keras.saving.load_model(tmp_path / "fused.keras")
    np.testing.assert_array_equal(reloaded.predict(images, verbose=0),
                                  fused.predict(images, verbose=0))


def test_offset_learning_rate_decay_and_freezing():
    """Momentum 0 makes each step readable: w <- w - lr * k * (g + l2 / k * w)."""
    beta = keras.Variable(np.ones(3), name="beta")
    frozen = keras.Variable(np.ones(3), name="whitening_bias")
    kernel = keras.Variable(np.ones((2, 2)), name="kernel")
    optimizer = L2SGD(0.1, l2=0.01, decay_all=True, offset_lr_scale=64.0,
                      frozen_after={"whitening_bias": 2})
    grads = [np.full(3, 0.5), np.full(3, 0.5), np.full((2, 2), 0.5)]
    expected = {"beta": np.ones(3), "whitening_bias": np.ones(3), "kernel": np.ones((2, 2))}
    for step in range(3):
        optimizer.apply([keras.ops.convert_to_tensor(g) for g in grads], [beta, frozen, kernel])
        expected["beta"] = expected["beta"] - 0.1 * 64 * (0.5 + 0.01 / 64 * expected["beta"])
        if step < 2:  # trains for steps 0 and 1, then frozen
            expected["whitening_bias"] -= 0.1 * (0.5 + 0.01 * expected["whitening_bias"])
        expected["kernel"] = expected["kernel"] - 0.1 * (0.5 + 0.01 * expected["kernel"])
    for variable in (beta, frozen, kernel):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(variable),
                                   expected[variable.name], rtol=1e-6)


def test_warmup_linear_decay_endpoints():
    schedule = WarmupLinearDecay(2.0, 100, warmup=0.23, start=0.2, end=0.07)
    values = [float(schedule(step)) for step in (0, 23, 100, 200)]
    assert values == pytest.approx([0.4, 2.0, 0.14, 0.14])
    assert float(schedule(61)) == pytest.approx(2.0 * (1 - 0.93 * 38 / 77))


def test_lookahead_on_a_tiny_model_matches_numpy():
    """Dense weights and BatchNorm statistics, both lookahead-averaged every 2 steps."""
    rng = np.random.default_rng(0)
    x = rng.normal(2.0, 3.0, size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    inputs = keras.Input((3,))
    bn = keras.layers.BatchNormalization(momentum=0.6, center=False, scale=False, epsilon=1e-3)
    dense = keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")
    model = keras.Model(inputs, dense(bn(inputs)))
    lr, total, every = 0.05, 8, 2
    model.compile(keras.optimizers.SGD(lr), "mse")
    callback = Lookahead(total, every=every, base=0.9)
    model.fit(x, y, batch_size=16, epochs=total, shuffle=False, verbose=0, callbacks=[callback])

    # NumPy: the normalised input is fixed (one fixed batch), so this is linear regression.
    mean, var = x.mean(0), x.var(0)
    xn = (x - mean) / np.sqrt(var + 1e-3)
    w, moving_mean = np.ones((3, 1)), np.zeros(3)
    slow_w, slow_mean = w.copy(), moving_mean.copy()
    for step in range(1, total + 1):
        w = w - lr * 2 * xn.T @ (xn @ w - y) / len(x)
        moving_mean = 0.6 * moving_mean + 0.4 * mean
        if step % every == 0:
            decay = 0.9**every * (step / total) ** 3
            slow_w = decay * slow_w + (1 - decay) * w
            slow_mean = decay * slow_mean + (1 - decay) * moving_mean
            w, moving_mean = slow_w.copy(), slow_mean.copy()
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense.kernel), w, rtol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(bn.moving_mean), moving_mean,
                               rtol=1e-4)
    assert not np.allclose(w, np.ones((3, 1)))


@pytest.mark.parametrize("steps_per_execution", [1, 2, 3])
def test_lookahead_updates_once_per_multiple_of_every_under_steps_per_execution(
        steps_per_execution):
    """Keras calls batch callbacks once per execution; the updates still come once for each
    multiple of ``every`` (at 3 steps per call and every 5: after steps 6, 12, 15, ...)."""
    x = np.ones((4, 2), "float32")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.0), "mse", steps_per_execution=steps_per_execution)
    callback = Lookahead(30, every=5)
    decays = []
    callback.update = decays.append  # record the decay of each update
    model.fit(x, x[:, :1], batch_size=1, epochs=30 // 4 + 1, steps_per_epoch=4, verbose=0,
              callbacks=[callback])
    steps = int(model.optimizer.iterations.numpy())
    expected = [callback.decay(5 * k) for k in range(1, steps // 5 + 1)]
    assert decays[:-1] == pytest.approx(expected) and decays[-1] == 1.0  # then the end's


def augmented(images, epoch, seed, shift):
    fn = alternating_flip_translate(epoch, seed, shift)
    return np.stack([fn(tf.constant(i, tf.int64), (tf.constant(image), 0))[0].numpy()
                     for i, image in enumerate(images)])


def test_alternating_flip_mirrors_each_image_in_every_other_epoch():
    images = np.random.default_rng(0).integers(0, 255, (200, 8, 8, 3)).astype(np.uint8)
    epochs = [augmented(images, e, seed=3, shift=0) for e in range(3)]
    np.testing.assert_array_equal(epochs[1], epochs[0][:, :, ::-1])
    np.testing.assert_array_equal(epochs[2], epochs[0])
    flipped = np.mean([not np.array_equal(a, b) for a, b in zip(epochs[0], images,
                                                                 strict=True)])
    assert 0.35 < flipped < 0.65
    assert not np.array_equal(augmented(images, 0, seed=4, shift=0), epochs[0])


def test_translation_is_a_crop_of_the_reflect_padded_image_over_all_offsets():
    images = np.random.default_rng(1).integers(0, 255, (300, 8, 8, 3)).astype(np.uint8)
    out = augmented(images, 0, seed=0, shift=2)
    offsets = set()
    for image, result in zip(images, out, strict=True):
        found = [(mirror, i, j) for mirror in (0, 1)
                 for i in range(5) for j in range(5)
                 if np.array_equal(np.pad(image[:, ::-1] if mirror else image,
                                          ((2, 2), (2, 2), (0, 0)), mode="reflect")
                                   [i:i + 8, j:j + 8], result)]
        assert found, "not a crop of the reflect-padded image"
        offsets.add(found[0][1:])
    assert len(offsets) == 25


def test_tta_views_match_numpy_reflect_shifts_and_weights():
    images = np.random.default_rng(0).normal(size=(2, 6, 6, 3)).astype("float32")
    assert [w for _, w in tta_views(images, 2)] == [0.25, 0.25] + [0.125] * 4
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    views = [images, padded[:, :6, :6], padded[:, 2:, 2:]]
    expected = sum(w * (v + v[:, :, ::-1]) / 2
                   for v, w in zip(views, (0.5, 0.25, 0.25), strict=True))
    got = keras.ops.convert_to_numpy(tta_logits(lambda v: v, images, 2))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    mirrored = keras.ops.convert_to_numpy(tta_logits(lambda v: v, images, 1))
    calls = []
    tta_logits(lambda v: calls.append(v) or v, images, 2, plain=images)
    assert len(calls) == 5  # the image itself is not computed again
    np.testing.assert_allclose(mirrored, (images + images[:, :, ::-1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="TTA level"):
        tta_views(images, 3)


FRESH = r"""
import sys, numpy as np, tensorflow as tf
model = tf.saved_model.load(sys.argv[1])
images = np.load(sys.argv[2])
out = model.serve(tf.constant(images))
print("TTA", int(model.tta_level[0].numpy()), out["logits"].shape)
np.save(sys.argv[3], out["logits"].numpy())
"""


@pytest.mark.slow
def test_airbench_recipe_end_to_end_with_tta_export(tmp_path):
    """run.py --recipe airbench --gelu fused on tiny data: recipe defaults, lookahead state,
    TTA metrics, and a SavedModel that applies (and states) TTA level 2, in a fresh process
    (the fused GELU's XLA kernels served by plain TensorFlow)."""
    data = write_image_folder(tmp_path / "data", num_classes=3, per_class=40,
                              test_per_class=8)
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "experiments", "run.py"), "--recipe", "airbench",
         "--backbone", "airbench93", "--loss", "softmax", "--dataset", data, "--epochs", "2",
         "--batch-size", "32", "--gelu", "fused", "--runs-dir", str(tmp_path / "runs"),
         "--name", "ab", "--far-ood", "none",  # far-away images: test_train's runs
         "--export-dir", str(tmp_path / "exports")],
        capture_output=True, text=True, env={**os.environ, "CI": "1"}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ab"
    config = json.loads((run_dir / "config.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert config["recipe"] == "airbench" and config["tta"] == 2 and config["gelu"] == "fused"
    assert config["label_smoothing"] == 0.2 and config["augment"] == "airbench"
    # 10 % held out for validation: the export has a temperature and a reject option.
    assert config["split_sizes"] == {"train": 108, "val": 12, "test": 24}
    assert "val" in metrics and metrics["tta"]["level"] == 2
    serving = json.loads((tmp_path / "exports" / "ab" / "serving.json").read_text())
    assert serving["reject"]["threshold"] == metrics["reject"]["threshold"]
    assert serving["temperature"] == metrics["calibration"]["temperature"]
    # The head's score chosen on validation under its recipe, said and served.
    from tfmargin.runner.recipes import DEFAULT_SERVED_SCORE, SERVED_SCORES

    score, k = SERVED_SCORES.get(("airbench", "softmax"), DEFAULT_SERVED_SCORE)
    assert serving["reject"]["score"] == metrics["reject"]["score"] == score
    assert f"reject option: {score} (the head's choice on validation)" in result.stdout
    assert metrics["tta"]["served"] is True
    assert 0 <= metrics["tta"]["top1"] <= 1 and metrics["test_size"] == 24
    assert not (run_dir / "checkpoints").exists()  # the export holds the model

    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype(np.uint8)
    np.save(tmp_path / "images.npy", images)
    export = tmp_path / "exports" / "ab"
    fresh = subprocess.run([sys.executable, "-c", FRESH, str(export / "savedmodel"),
                            str(tmp_path / "images.npy"), str(tmp_path / "logits.npy")],
                           capture_output=True, text=True, timeout=300)
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert "TTA 2" in fresh.stdout
    import tfmargin

    plain = tfmargin.load_model(export / "model.keras")
    expected = keras.ops.convert_to_numpy(tta_logits(
        lambda v: plain(v, training=False), images.astype("float32"), 2))
    # Under bfloat16 (the default where the CPU has bf16 instructions) the SavedModel's graph
    # and the eager model round differently; bfloat16 keeps about three significant digits.
    atol = 1e-4 if config["precision_policy"] == "float32" else 1e-2
    np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=atol)


def test_docstring_example_runs():
    import doctest

    import tfmargin.airbench

    result = doctest.testmod(tfmargin.airbench)
    assert result.attempted >= 3 and result.failed == 0


def test_recipe_defaults_and_explicit_flags():
    """--recipe airbench sets its defaults (shown by --help); a flag given explicitly wins."""
    from tfmargin.runner.cli import (
        OneLineParser,
        add_run_arguments,
        config_from_args,
        parse_run_args,
    )
    from tfmargin.runner.config import RunConfig

    parser = OneLineParser()
    add_run_arguments(parser)
    config = config_from_args(parser, parse_run_args(parser, ["--recipe", "airbench",
                                                             "--epochs", "3"]))
    assert (config.batch_size, config.epochs, config.tta, config.val_split) == (1024, 3, 2, 0.1)
    assert config.learning_rate == pytest.approx(1.5 * 128 / 1024)
    assert config == RunConfig.for_recipe("airbench", epochs=3)
    standard = config_from_args(parser, parse_run_args(parser, []))  # same parser again
    assert standard == RunConfig() and "airbench" not in standard.run_name()
    assert "-airbench-" in config.run_name()
    mixed = dataclasses.replace(config, mixed_precision=True).run_name()  # its own run
    full = dataclasses.replace(config, mixed_precision=False).run_name()
    assert "-airbench-mixed-e3-" in mixed and mixed[-8:] != full[-8:]
    assert "-mixed" not in full
    # auto resolves to one of the two, by the hardware, and is named as what it resolved to.
    assert config.run_name() in (mixed, full)
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", "run.py"),
                                "--recipe", "airbench", "--help"], capture_output=True,
                               text=True, timeout=60).stdout
    assert "(default: 1024)" in help_text and "(default: airbench94)" in help_text


def torch_reference(keras_backbone, keras_head, lr, l2, momentum, offset_scale):
    """The airbench network and optimizer written in PyTorch from the published description
    (not from this port), with the port's initial weights."""
    import torch
    from torch import nn

    def conv_weight(layer):
        return torch.tensor(keras.ops.convert_to_numpy(layer.kernel)).permute(3, 2, 0, 1)

    whiten = keras_backbone.get_layer("whiten")
    layers = [nn.Conv2d(3, 24, 2), nn.GELU()]
    layers[0].weight.data = conv_weight(whiten)
    layers[0].weight.requires_grad = False
    layers[0].bias.data.zero_()
    channels = 24
    for block in (1, 2, 3):
        for i in (1, 2):
            conv = keras_backbone.get_layer(f"block{block}_conv{i}")
            torch_conv = nn.Conv2d(channels, conv.filters, 3, padding="same", bias=False)
            torch_conv.weight.data = conv_weight(conv)
            channels = conv.filters
            norm = nn.BatchNorm2d(channels, eps=1e-12, momentum=0.4)  # keeps 0.6
            norm.weight.requires_grad = False
            layers += [torch_conv, *([nn.MaxPool2d(2)] if i == 1 else []), norm, nn.GELU()]
    head = nn.Linear(channels, 10)
    head.weight.data = torch.tensor(keras.ops.convert_to_numpy(keras_head.kernel)).T
    head.bias.data.zero_()

    class Temperature(nn.Module):
        def forward(self, x):
            return x / 9

    net = nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), Temperature(), head)
    offsets = [m.bias for m in net if isinstance(m, nn.BatchNorm2d)]
    others = [p for p in net.parameters() if p.requires_grad and all(p is not q for q in offsets)]
    optimizer = torch.optim.SGD(
        [dict(params=offsets, lr=lr * offset_scale, weight_decay=l2 / offset_scale),
         dict(params=others, lr=lr, weight_decay=l2)], momentum=momentum, nesterov=True)
    return net, optimizer


def test_port_trains_as_a_pytorch_reference_of_the_recipe():
    """Six steps of the airbench optimizer (Nesterov 0.85, coupled L2 on everything,
    BatchNorm offsets at 64x lr, whitening bias frozen after step 3), label smoothing 0.2 and
    lookahead every 2 steps (BatchNorm statistics included): the Keras port and a PyTorch
    reference end on the same weights and statistics."""
    torch = pytest.importorskip("torch", reason="the reference is written in PyTorch: pip "
                                "install torch (a CPU build: see README, Install)")

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(6 * 16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 6 * 16)
    from tfmargin.airbench import airbench

    backbone = airbench(widths=(8, 16, 16), name="tiny")
    backbone.get_layer("whiten").adapt(x[:32])
    head = keras.layers.Dense(10, kernel_initializer="glorot_uniform")
    model = keras.Sequential([backbone, head])
    model.build((None, 32, 32, 3))
    lr, l2, momentum, steps = 0.05, 1e-2, 0.85, 6
    net, optimizer = torch_reference(backbone, head, lr, l2, momentum, 64.0)

    model.compile(L2SGD(lr, l2=l2, momentum=momentum, nesterov=True, decay_all=True,
                        offset_lr_scale=64.0, frozen_after={"whitening_bias": 3}),
                  keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.2))
    model.fit(x, np.eye(10)[y], batch_size=16, epochs=1, shuffle=False, verbose=0,
              callbacks=[Lookahead(steps, every=2, base=0.95)])

    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.2)
    slow = {k: v.clone() for k, v in net.state_dict().items() if v.dtype.is_floating_point}
    for step in range(steps):
        net[0].bias.requires_grad = step < 3
        batch = torch.tensor(x[16 * step:16 * (step + 1)]).permute(0, 3, 1, 2)
        loss = loss_fn(net(batch), torch.tensor(y[16 * step:16 * (step + 1)]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 2 == 0:
            decay = 0.95**2 * ((step + 1) / steps) ** 3
            with torch.no_grad():
                for key, value in net.state_dict().items():
                    if key in slow:
                        slow[key].lerp_(value, 1 - decay)
                        value.copy_(slow[key])

    def close(keras_value, torch_value, rtol=2e-4):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(keras_value),
                                   torch_value.detach().numpy(), rtol=rtol, atol=2e-5)

    close(backbone.get_layer("whiten").bias, net[0].bias)
    assert not np.allclose(keras.ops.convert_to_numpy(backbone.get_layer("whiten").bias), 0)
    torch_layers = iter(m for m in net if isinstance(m, (torch.nn.Conv2d, torch.nn.BatchNorm2d)))
    next(torch_layers)  # the whitening conv
    for block in (1, 2, 3):
        for i in (1, 2):
            conv, norm = next(torch_layers), next(torch_layers)
            close(backbone.get_layer(f"block{block}_conv{i}").kernel,
                  conv.weight.permute(2, 3, 1, 0))
            bn = backbone.get_layer(f"block{block}_bn{i}")
            close(bn.beta, norm.bias)
            close(bn.moving_mean, norm.running_mean)
            # PyTorch keeps the unbiased batch variance, Keras the biased one: a factor
            # n / (n - 1), 0.7 % at block 3's n = 16 x 3 x 3 (0.01 % at batch 1,024).
            close(bn.moving_variance, norm.running_var, rtol=1e-2)
    close(head.kernel, net[-1].weight.T)
    close(head.bias, net[-1].bias)
