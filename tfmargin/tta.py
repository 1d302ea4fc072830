"""Test-time augmentation: logits averaged over flipped and shifted views (airbench).

Level 0: the image. Level 1: the image and its mirror, 1/2 each. Level 2:
those two at weight 1/4 each, plus the image shifted one pixel up-left and
one pixel down-right (reflect-padded), each with its mirror, at 1/8 each.
``keras.ops`` only: it runs inside ``tf.function``, exports and any backend.
"""

from keras import ops

from tfmargin.names import TTA_LEVELS


def _mirror_views(images, weight):
    return [(images, weight / 2), (ops.flip(images, axis=2), weight / 2)]


def tta_views(images, level):
    """``[(view, weight)]`` of a batch ``(N, H, W, C)``; the weights sum to 1 and the first
    view is ``images`` itself."""
    if level not in TTA_LEVELS:
        raise ValueError(f"TTA level must be one of {tuple(TTA_LEVELS)}, got {level!r}.")
    if level == 0:
        return [(images, 1.0)]
    if level == 1:
        return _mirror_views(images, 1.0)
    height, width = images.shape[1], images.shape[2]
    padded = ops.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    # Crop [0:H] of the padded image moves the content one pixel down-right, [2:H+2] up-left.
    shifted = [padded[:, :height, :width], padded[:, 2:height + 2, 2:width + 2]]
    return _mirror_views(images, 0.5) + [view for image in shifted
                                          for view in _mirror_views(image, 0.25)]


def tta_logits(logits_fn, images, level, plain=None):
    """Weighted sum of ``logits_fn`` over the views of ``images`` (one call per view);
    ``plain``: ``logits_fn(images)`` when the caller has it already (not computed again)."""
    total = 0.0
    for i, (view, weight) in enumerate(tta_views(images, level)):
        total = total + weight * (plain if i == 0 and plain is not None else logits_fn(view))
    return total
