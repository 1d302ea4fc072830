"""Per-sample NumPy reference of the margin family, written with plain loops.

Deliberately independent of tfmargin.margins: it follows the papers' formulas
with ``math`` scalars, one sample and one class at a time.
"""

import math

import numpy as np

EPS = 1e-7
# The clip bounds as float32 holds them (1 - 1e-7 rounds to 1 - 2**-23).
LOW, HIGH = float(np.float32(-1.0 + EPS)), float(np.float32(1.0 - EPS))


def _fallback_offset(m1, m2, m3, points=200_001):
    """The offset c of the branch ``cos(theta) - m3 - c``, found numerically.

    InsightFace's ``c = m2 * sin(m2)``, unless the branch would then start above
    the lowest value the margin curve reached before the turn (found on a dense
    grid): then the smallest c that starts it there.
    """
    turn = (math.pi - m2) / m1
    lowest = min(math.cos(m1 * turn * i / (points - 1) + m2) - m3 for i in range(points))
    return max(m2 * math.sin(m2), math.cos(turn) - m3 - lowest)


def psi(cos_t, margin_type, margin, fallback):
    c = min(max(cos_t, LOW), HIGH)
    theta = math.acos(c)
    if margin_type == "normface":
        return cos_t
    if margin_type == "cosface":
        value = c - margin
    elif margin_type == "sphereface":
        k = math.floor(margin * theta / math.pi)
        value = (-1) ** k * math.cos(margin * theta) - 2 * k
    else:
        m1, m2, m3 = (1.0, margin, 0.0) if margin_type == "arcface" else margin
        value = math.cos(m1 * theta + m2) - m3
        if fallback == "monotonic" and (m1 > 1 or m2 > 0) and m1 * theta + m2 > math.pi:
            value = c - m3 - _fallback_offset(m1, m2, m3)
    if fallback == "easy" and not c > 0:
        value = c
    return value


def psi_slope(cos_t, margin_type, margin, fallback, h=1e-7):
    """|d psi / d cos| from below: how much a float32 error in cos moves psi."""
    c = min(max(cos_t, LOW), HIGH)
    return abs(psi(c, margin_type, margin, fallback) - psi(c - h, margin_type, margin,
                                                            fallback)) / h


def margin_logits(x, w, labels, margin_type, margin, scale, fallback="monotonic", sub_centers=1):
    """Logits for every sample and class, the target with the margin applied."""
    n, classes = x.shape[0], w.shape[1] // sub_centers
    out = np.zeros((n, classes))
    for i in range(n):
        xi = x[i] / math.sqrt(sum(float(v) ** 2 for v in x[i]))
        for j in range(classes):
            best = -2.0
            for k in range(sub_centers):
                col = w[:, j * sub_centers + k]
                wj = col / math.sqrt(sum(float(v) ** 2 for v in col))
                dot = sum(float(a) * float(b) for a, b in zip(xi, wj, strict=True))
                best = max(best, dot)
            if labels is not None and j == labels[i]:
                best = psi(best, margin_type, margin, fallback)
            out[i, j] = scale * best
    return out
