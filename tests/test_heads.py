import math

import keras
import numpy as np
import pytest
from reference import margin_logits, psi_slope

from tfmargin import ArcMarginLayer, auto_scale


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def make_head(num_classes, dim, seed=0, **kwargs):
    head = ArcMarginLayer(num_classes, **kwargs)
    head.build((None, dim))
    rng = np.random.default_rng(seed)
    head.kernel.assign(rng.normal(size=(dim, num_classes * head.sub_centers)).astype("float32"))
    return head


def embeddings_with_angles(head, labels, thetas, dim, seed=1):
    """Embeddings whose angle to their label's (single) centre is exactly theta."""
    rng = np.random.default_rng(seed)
    w = head.kernel.numpy()
    w = w / np.linalg.norm(w, axis=0)
    out = []
    for label, theta in zip(labels, thetas, strict=True):
        c = w[:, label]
        r = rng.normal(size=dim)
        r -= r.dot(c) * c
        r /= np.linalg.norm(r)
        out.append(math.cos(theta) * c + math.sin(theta) * r)
    return np.array(out, dtype="float32")


CASES = [
    ("arcface", 0.1, 1.0, 10),
    ("arcface", 0.5, 30.0, 10),
    ("arcface", 2.0, 4.0, 100),
    ("arcface", 3.0, 2.0, 7),
    ("cosface", 0.35, 30.0, 10),
    ("cosface", 0.1, 1.0, 100),
    ("sphereface", 1.35, 16.0, 10),
    ("sphereface", 4.0, 1.0, 3),
    ("combined", (1.0, 0.3, 0.2), 64.0, 10),
    ("combined", (1.5, 0.5, 0.1), 8.0, 50),
    ("normface", 0.0, 10.0, 2),
]


@pytest.mark.parametrize("fallback", ["monotonic", "easy", "none"])
@pytest.mark.parametrize("margin_type,margin,scale,classes", CASES)
def test_logits_match_numpy_reference(margin_type, margin, scale, classes, fallback):
    dim = 16
    head = make_head(classes, dim, margin_type=margin_type, margin=margin, scale=scale,
                     fallback=fallback)
    labels = np.arange(12) % classes
    # Angles spread over [0, pi], so many samples have theta + m > pi.
    thetas = np.linspace(0.0, math.pi, 12)
    x = embeddings_with_angles(head, labels, thetas, dim)
    expected = margin_logits(x, head.kernel.numpy(), labels, margin_type, margin, scale, fallback)
    got = to_numpy(head(x, labels=labels, training=True))
    # A float32 cosine is off by a few 1e-7; near cos = +-1 arccos magnifies that by
    # |d psi / d cos|, so each target's tolerance carries its condition number.
    slope = np.array([psi_slope(np.cos(t), margin_type, margin, fallback) for t in thetas])
    atol = scale * (1e-5 + 4e-7 * slope)
    target = (np.arange(len(labels)), labels)
    error = np.abs(got[target] - expected[target])
    assert np.all(error <= atol), (error, atol)
    others = np.ones_like(got, dtype=bool)
    others[target] = False
    np.testing.assert_allclose(got[others], expected[others], atol=1e-5 * max(1.0, scale), rtol=0)
    plain = margin_logits(x, head.kernel.numpy(), None, margin_type, margin, scale)
    np.testing.assert_allclose(to_numpy(head(x)), plain, atol=1e-5 * max(1.0, scale), rtol=0)


def test_sub_centers_take_the_max_over_centres():
    head = make_head(5, 8, margin_type="arcface", margin=0.3, scale=2.0, sub_centers=3)
    x = np.random.default_rng(3).normal(size=(6, 8)).astype("float32")
    labels = np.array([0, 1, 2, 3, 4, 0])
    expected = margin_logits(x, head.kernel.numpy(), labels, "arcface", 0.3, 2.0, sub_centers=3)
    np.testing.assert_allclose(to_numpy(head(x, labels=labels, training=True)), expected, atol=1e-5)
    assert head.kernel.shape == (8, 15)


def target_curve(fallback, margin=2.0):
    head = make_head(4, 8, margin_type="arcface", margin=margin, scale=1.0, fallback=fallback)
    thetas = np.linspace(0.0, math.pi, 400)
    labels = np.zeros(len(thetas), dtype="int32")
    x = embeddings_with_angles(head, labels, thetas, 8)
    return to_numpy(head(x, labels=labels, training=True))[:, 0]


@pytest.mark.parametrize("margin", [0.5, 2.0, 2.5, 3.0])
def test_monotonic_fallback_target_logit_never_increases(margin):
    curve = target_curve("monotonic", margin)
    assert np.all(np.diff(curve) <= 1e-6), np.diff(curve).max()


def test_raw_arcface_turns_back_up_past_pi_minus_m():
    # The paper's failure at m >= 2: cos(theta + m) rises again for theta > pi - m,
    # so pushing a sample *away* from its class raises its target logit.
    curve = target_curve("none", 2.0)
    assert np.diff(curve).max() > 1e-3
    assert curve[-1] > curve.min() + 0.5


def test_monotonic_fallback_is_insightface_formula_at_m_2():
    head = make_head(4, 8, margin_type="arcface", margin=2.0, scale=1.0)
    theta = 2.5  # > pi - 2
    x = embeddings_with_angles(head, [0], [theta], 8)
    got = to_numpy(head(x, labels=np.array([0]), training=True))[0, 0]
    assert got == pytest.approx(math.cos(theta) - 2.0 * math.sin(2.0), abs=1e-5)


@pytest.mark.parametrize("margin_type,margin", [("arcface", 0.5), ("arcface", 2.5),
                                                ("sphereface", 4.0), ("cosface", 0.3),
                                                ("combined", (1.2, 0.4, 0.1))])
@pytest.mark.parametrize("fallback", ["monotonic", "none"])
def test_gradients_finite_at_cos_plus_minus_one_and_past_the_turn(margin_type, margin, fallback):
    head = make_head(3, 8, margin_type=margin_type, margin=margin, scale=4.0, fallback=fallback)
    w = head.kernel.numpy() / np.linalg.norm(head.kernel.numpy(), axis=0)
    # cos = +1, cos = -1 exactly, and an angle past pi - m.
    x = np.stack([w[:, 0], -w[:, 0], embeddings_with_angles(head, [0], [3.0], 8)[0]])
    gx, gw = gradients_of_sum(head, x.astype("float32"), np.zeros(3, dtype="int32"))
    assert np.all(np.isfinite(gx)) and np.all(np.isfinite(gw))


def gradients_of_sum(head, x, labels):
    """d sum(logits) / d (embeddings, kernel) with the backend's own autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(head(x, labels=labels, training=True))
        return [g.numpy() for g in tape.gradient(loss, [x, head.kernel])]
    if backend == "jax":
        import jax

        def total(kernel, x):
            logits, _ = head.stateless_call([kernel], [v.value for v in
                                                       head.non_trainable_variables],
                                            x, labels=labels, training=True)
            return logits.sum()

        gw, gx = jax.grad(total, argnums=(0, 1))(head.kernel.value, x)
        return np.asarray(gx), np.asarray(gw)
    import torch

    x = torch.tensor(x, requires_grad=True)
    head(x, labels=torch.tensor(labels), training=True).sum().backward()
    return x.grad.numpy(), head.kernel.value.grad.numpy()


def test_paper_setting_is_exact():
    head = ArcMarginLayer(10, margin_type="arcface", margin=0.1, scale=1.0)
    assert (head.scale, head.m1, head.m2, head.m3) == (1.0, 1.0, 0.1, 0.0)


def test_auto_scale_is_adacos_fixed_scale():
    assert auto_scale(10) == pytest.approx(3.107, abs=1e-3)
    assert auto_scale(100) == pytest.approx(6.498, abs=1e-3)
    head = ArcMarginLayer(100, scale="auto")
    assert head.scale == pytest.approx(math.sqrt(2) * math.log(99))
    assert ArcMarginLayer.from_config(head.get_config()).scale == head.scale


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_classes=1), "num_classes must be an integer >= 2"),
    (dict(num_classes=10, scale=0.0), "scale must be a finite float > 0 or 'auto'"),
    (dict(num_classes=10, scale=-1.0), "scale must be a finite float > 0"),
    (dict(num_classes=10, scale="big"), "scale must be a finite float > 0 or 'auto'"),
    (dict(num_classes=2, scale="auto"), "scale='auto' needs num_classes >= 3"),
    (dict(num_classes=10, margin=-0.1), "margin must be >= 0"),
    (dict(num_classes=10, margin=math.pi), "margin for 'arcface' must be in [0, pi)"),
    (dict(num_classes=10, margin_type="sphereface", margin=0.5), "must be >= 1"),
    (dict(num_classes=10, margin_type="combined", margin=0.5), "must be a triple"),
    (dict(num_classes=10, margin_type="combined", margin=(1, 4, 0)), "m2 must be in [0, pi)"),
    (dict(num_classes=10, sub_centers=0), "sub_centers must be an integer >= 1"),
    (dict(num_classes=10, margin_type="magface"), "Unknown margin_type 'magface'; choose one of"),
    (dict(num_classes=10, fallback="clip"), "Unknown fallback 'clip'; choose one of"),
])
def test_bad_arguments_raise_with_the_allowed_range(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        ArcMarginLayer(**kwargs)


def test_out_of_range_labels_fail_the_step_with_a_clear_error():
    head = make_head(10, 8)
    x = np.ones((2, 8), dtype="float32")
    with pytest.raises(Exception, match=r"labels must lie in \[0, 10\)"):
        head(x, labels=np.array([3, 10]), training=True)
    with pytest.raises(Exception, match=r"labels must lie in \[0, 10\)"):
        head(x, labels=np.array([-1, 0]), training=True)


def labelled_model(head, dim):
    x = keras.Input((dim,), name="embedding")
    y = keras.Input((), dtype="int32", name="label")
    return keras.Model([x, y], head(x, labels=y))


def test_labels_never_change_the_evaluation_path():
    head = make_head(10, 16, margin=0.5, scale=8.0)
    x = np.random.default_rng(0).normal(size=(32, 16)).astype("float32")
    y = np.arange(32) % 10
    no_labels = to_numpy(head(x))
    np.testing.assert_array_equal(to_numpy(head(x, labels=y, training=False)), no_labels)
    assert not np.allclose(to_numpy(head(x, labels=y, training=True)), no_labels)

    model = labelled_model(head, 16)
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    scrambled = (y + 3) % 10
    true_metrics = model.evaluate([x, y], y, return_dict=True, verbose=0)
    scrambled_metrics = model.evaluate([x, scrambled], y, return_dict=True, verbose=0)
    assert true_metrics["accuracy"] == scrambled_metrics["accuracy"]
    assert true_metrics["loss"] == scrambled_metrics["loss"]
    predicted = model.predict([x, scrambled], verbose=0)
    np.testing.assert_array_equal(predicted, model.predict([x, y], verbose=0))
    np.testing.assert_allclose(predicted, no_labels, rtol=1e-6, atol=1e-6)  # XLA vs eager


def test_serialization_round_trips(tmp_path):
    head = make_head(10, 16, margin_type="combined", margin=(1.0, 0.3, 0.2), scale=16.0,
                     sub_centers=2, fallback="easy")
    clone = ArcMarginLayer.from_config(head.get_config())
    clone.build((None, 16))
    clone.set_weights(head.get_weights())
    x = np.random.default_rng(0).normal(size=(8, 16)).astype("float32")
    y = np.arange(8)
    np.testing.assert_array_equal(to_numpy(clone(x, labels=y, training=True)),
                                  to_numpy(head(x, labels=y, training=True)))
    model = labelled_model(head, 16)
    path = tmp_path / "head.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_array_equal(loaded.predict([x, y], verbose=0),
                                  model.predict([x, y], verbose=0))
    assert loaded.layers[-1].get_config()["margin"] == [1.0, 0.3, 0.2]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_head_computes_in_float32_under_mixed_precision(policy):
    x = np.random.default_rng(0).normal(size=(16, 32)).astype("float32")
    y = np.arange(16) % 10
    reference_head = make_head(10, 32, margin=0.5, scale=30.0)
    reference = to_numpy(reference_head(x, labels=y, training=True))
    keras.config.set_dtype_policy(policy)
    try:
        head = make_head(10, 32, margin=0.5, scale=30.0)
        low = keras.ops.cast(x, policy.split("_")[1])  # embeddings arrive in half precision
        out = head(low, labels=y, training=True)
    finally:
        keras.config.set_dtype_policy("float32")
    assert keras.backend.standardize_dtype(out.dtype) == "float32"
    tol = 30.0 * (2e-3 if policy == "mixed_float16" else 1.6e-2)
    np.testing.assert_allclose(to_numpy(out), reference, atol=tol)


@pytest.mark.parametrize("one_hot", [False, True])
def test_target_angle_metric_reports_degrees(one_hot):
    from tfmargin.heads import TargetAngle

    head = make_head(4, 8, scale=5.0)
    x = embeddings_with_angles(head, [0, 1], [math.radians(30), math.radians(50)], 8)
    labels = np.array([0, 1])
    metric = TargetAngle(head.scale)
    metric.update_state(np.eye(4)[labels] if one_hot else labels, head(x))  # label-free
    result = {k: float(v) for k, v in metric.result().items()}
    assert result["theta_y_mean"] == pytest.approx(40.0, abs=1e-3)
    assert result["theta_y_std"] == pytest.approx(10.0, abs=1e-2)


@pytest.mark.parametrize("margin_type", ["arcface", "cosface", "sphereface", "combined",
                                         "normface"])
def test_every_margin_type_builds_with_its_registry_default(margin_type):
    from tfmargin.margins import MARGIN_TYPES
    from tfmargin.runner.config import RunConfig

    head = ArcMarginLayer(10, margin_type=margin_type)
    default = MARGIN_TYPES[margin_type].default_margin
    # The defaults as written in the registry, spelled out per type (not recomputed by the
    # function the layer calls).
    expected = {"arcface": lambda: (1.0, default, 0.0), "cosface": lambda: (1.0, 0.0, default),
                "sphereface": lambda: (default, 0.0, 0.0), "combined": lambda: tuple(default),
                "normface": lambda: (1.0, 0.0, 0.0)}[margin_type]()
    assert (head.m1, head.m2, head.m3) == expected
    assert head.scale == MARGIN_TYPES[margin_type].default_scale
    config = RunConfig(loss=margin_type)
    assert config.resolved_margin() == default
    assert config.resolved_scale() == head.scale
    assert MARGIN_TYPES[margin_type].published  # every type names its published values
    x = np.random.default_rng(0).normal(size=(4, 8)).astype("float32")
    out = head(x, labels=np.array([0, 1, 2, 3]), training=True)
    assert np.all(np.isfinite(to_numpy(out)))


def test_combined_monotonic_fallback_never_increases_with_m1_above_one():
    head = make_head(4, 8, margin_type="combined", margin=(1.5, 0.5, 0.1), scale=1.0)
    thetas = np.linspace(0.0, math.pi, 400)
    x = embeddings_with_angles(head, np.zeros(400, dtype=int), thetas, 8)
    curve = to_numpy(head(x, labels=np.zeros(400, dtype="int32"), training=True))[:, 0]
    assert np.all(np.diff(curve) <= 1e-6), np.diff(curve).max()


def test_docstring_example_runs():
    import doctest

    import tfmargin.heads

    result = doctest.testmod(tfmargin.heads)
    assert result.attempted >= 6 and result.failed == 0
