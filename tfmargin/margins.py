"""Target-class logit functions of the angular-margin family.

Every head in this family scores class j by ``s * cos(theta_j)`` with the
embedding and the class weight L2-normalised; they differ only in what the
*target* class's cosine becomes during training. This module holds that one
function, ``psi(theta)``, for every member, written once on top of the general
combined margin ``cos(m1 * theta + m2) - m3``, and the one registry of margin
types with their default margins.

It imports no deep-learning framework: the formulas are checked against NumPy, and a
command line checks head arguments before a run builds anything.
"""

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class MarginType:
    """One member of the family: the defaults it trains with and the published values.

    ``default_margin`` and ``default_scale`` were chosen on a validation split of
    CIFAR-10 with MobileNetV2 (docs/recipe.md); ``published`` is what the paper that
    introduced the type used, for face recognition with 10^4-10^5 identities.
    """

    default_margin: object
    default_scale: float
    published: str


# The one registry: a new margin type is added here (and to ``resolve_margins``).
# Chosen by validation top-1 in the MobileNetV2 selection runs of docs/recipe.md (s = 8
# beat s = 16 for every type it was tried on; ArcFace m = 0.1 beat 0.3 on the mean of three
# seeds, CosFace m = 0.1 beat the published 0.35 on one); the types with one candidate keep
# their published margin at s = 8.
MARGIN_TYPES = {
    "arcface": MarginType(0.1, 8.0, "ArcFace, Deng et al. 2019 (arXiv 1801.07698): m = 0.5, "
                                    "s = 64"),
    "cosface": MarginType(0.1, 8.0, "CosFace, Wang et al. 2018 (arXiv 1801.09414): m = 0.35, "
                                    "s = 64"),
    "sphereface": MarginType(1.35, 8.0, "normalised SphereFace as compared in ArcFace (Deng "
                                        "et al. 2019, Table 2): m = 1.35, s = 64"),
    "combined": MarginType((1.0, 0.3, 0.2), 8.0, "combined margin CM1 of ArcFace (Deng et "
                                                 "al. 2019): (m1, m2, m3) = (1, 0.3, 0.2), "
                                                 "s = 64"),
    "normface": MarginType(0.0, 8.0, "NormFace, Wang et al. 2017 (arXiv 1704.06369): no "
                                     "margin, learned or fixed scale"),
}
FALLBACKS = ("monotonic", "easy", "none")


def margin_type_of(name):
    """The registry's entry of ``name`` (see ``MARGIN_TYPES``)."""
    if name not in MARGIN_TYPES:
        raise ValueError(f"Unknown margin_type {name!r}; choose one of {', '.join(MARGIN_TYPES)}.")
    return MARGIN_TYPES[name]


def default_margin(margin_type):
    """The registry's default margin of ``margin_type``."""
    return margin_type_of(margin_type).default_margin


def default_scale(margin_type):
    """The registry's default scale of ``margin_type``."""
    return margin_type_of(margin_type).default_scale


def auto_scale(num_classes):
    """AdaCos fixed scale ``sqrt(2) * ln(C - 1)``: 3.11 for 10 classes, 6.50 for 100."""
    if num_classes < 3:
        raise ValueError(
            f"scale='auto' needs num_classes >= 3 (sqrt(2)*ln(C-1) is 0 for C=2), "
            f"got num_classes={num_classes}; pass a float scale instead."
        )
    return math.sqrt(2.0) * math.log(num_classes - 1)


def resolve_margins(margin_type, margin=None):
    """Map ``(margin_type, margin)`` to the combined form ``(m1, m2, m3)``.

    ``margin=None`` takes the type's default from ``MARGIN_TYPES``.

    SphereFace is returned as ``(m, 0, 0)``; its piecewise psi is applied by
    :func:`target_logit`, not by the combined formula.

    Raises:
        ValueError: naming the argument and its allowed range.
    """
    if margin is None:
        margin = default_margin(margin_type)
    if margin_type == "combined":
        try:
            m1, m2, m3 = (float(v) for v in margin)
        except (TypeError, ValueError):
            raise ValueError(
                f"margin for margin_type='combined' must be a triple (m1, m2, m3), got {margin!r}."
            ) from None
        if m1 < 1.0:
            raise ValueError(f"margin m1 must be >= 1 for 'combined', got {m1}.")
        if not 0.0 <= m2 < math.pi:
            raise ValueError(f"margin m2 must be in [0, pi) for 'combined', got {m2}.")
        if m3 < 0.0:
            raise ValueError(f"margin m3 must be >= 0 for 'combined', got {m3}.")
        return m1, m2, m3
    if isinstance(margin, (tuple, list)):
        raise ValueError(
            f"margin must be a single float for margin_type={margin_type!r}; "
            "a triple (m1, m2, m3) is for margin_type='combined'."
        )
    m = float(margin)
    if m < 0.0:
        raise ValueError(f"margin must be >= 0, got {m}.")
    if margin_type == "arcface":
        if m >= math.pi:
            raise ValueError(
                f"margin for 'arcface' must be in [0, pi) radians, got {m}: "
                "cos(theta + m) has no decreasing branch left at m >= pi."
            )
        return 1.0, m, 0.0
    if margin_type == "cosface":
        return 1.0, 0.0, m
    if margin_type == "sphereface":
        if m < 1.0:
            raise ValueError(
                f"margin for 'sphereface' is a multiplier of theta and must be >= 1, got {m}."
            )
        return m, 0.0, 0.0
    return 1.0, 0.0, 0.0  # normface


def check_head_arguments(num_classes, margin_type, margin, scale, fallback, sub_centers):
    """Validate a head's arguments; returns ``((m1, m2, m3), scale_value)``.

    Pure Python, so a command line is checked before a run builds anything.
    ``margin=None`` and ``scale=None`` take the type's defaults.

    Raises:
        ValueError: naming the argument and its allowed range.
    """
    if int(num_classes) != num_classes or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}.")
    margins = resolve_margins(margin_type, margin)
    if scale is None:
        scale = default_scale(margin_type)
    if scale == "auto":
        scale_value = auto_scale(num_classes)
    elif isinstance(scale, str) or not float(scale) > 0.0 or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite float > 0 or 'auto', got {scale!r}.")
    else:
        scale_value = float(scale)
    if fallback not in FALLBACKS:
        raise ValueError(f"Unknown fallback {fallback!r}; choose one of {', '.join(FALLBACKS)}.")
    if int(sub_centers) != sub_centers or sub_centers < 1:
        raise ValueError(f"sub_centers must be an integer >= 1, got {sub_centers!r}.")
    return margins, scale_value


def _fallback_offset(m1, m2):
    """Offset c of the monotonic branch ``cos(theta) - m3 - c``.

    Past ``theta0 = (pi - m2) / m1`` the margin curve ``cos(m1*theta + m2)``
    turns back up. InsightFace's ArcFace replaces it there by
    ``cos(theta) - m*sin(m)``. That branch starts at or below the curve's
    value at theta0 (-1) only while ``m*sin(m) >= 1 + cos(theta0)``, which
    fails for ArcFace m > ~2.33; taking the larger of the two keeps the
    target logit non-increasing for every margin, and equals InsightFace's
    offset wherever theirs is monotonic.
    """
    theta0 = (math.pi - m2) / m1
    return max(m2 * math.sin(m2), 1.0 + math.cos(theta0))


def target_logit(cos_t, margin_type, m1, m2, m3, fallback="monotonic", epsilon=1e-7,
                 theta=None):
    """psi(theta) for the target class, elementwise over float32 ``cos_t``.

    ``cos_t`` is clipped to ``[-1 + epsilon, 1 - epsilon]`` before arccos so
    the gradient stays finite at cos = +-1. A caller that already holds
    ``theta = arccos(clipped cos_t)`` passes it to skip the second arccos.
    """
    from keras import ops

    if margin_type == "normface":
        return cos_t
    cos_t = ops.clip(cos_t, -1.0 + epsilon, 1.0 - epsilon)
    if margin_type == "cosface":
        psi = cos_t - m3
    else:
        if theta is None:
            theta = ops.arccos(cos_t)
        if margin_type == "sphereface":
            k = ops.floor(m1 * theta / math.pi)
            sign = 1.0 - 2.0 * ops.mod(k, 2.0)
            psi = sign * ops.cos(m1 * theta) - 2.0 * k
        else:
            psi = ops.cos(m1 * theta + m2) - m3
            if fallback == "monotonic" and (m1 > 1.0 or m2 > 0.0):
                theta0 = (math.pi - m2) / m1
                psi = ops.where(
                    theta > theta0, cos_t - m3 - _fallback_offset(m1, m2), psi
                )
    if fallback == "easy":
        psi = ops.where(cos_t > 0.0, psi, cos_t)
    return psi
