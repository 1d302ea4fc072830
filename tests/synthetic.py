"""Small learnable image folders written by the tests: coloured shapes on noise."""

import os

import numpy as np

from tfmargin.data import write_image_folder as write_folder

COLOURS = [(230, 40, 40), (40, 200, 40), (40, 80, 230), (230, 210, 40), (200, 40, 200),
           (40, 210, 210)]


def shape_image(label, rng, size=32):
    """Class = colour; the square's position and the background noise vary."""
    image = rng.integers(0, 90, size=(size, size, 3)).astype(np.uint8)
    side = size // 2
    top, left = rng.integers(0, size - side, size=2)
    image[top:top + side, left:left + side] = COLOURS[label]
    return image


def write_image_folder(root, num_classes=3, per_class=12, test_per_class=None, size=32,
                       fmt="png", seed=0):
    """``root/<class>/*.png``, or ``root/train|test/<class>/`` when ``test_per_class``."""
    rng = np.random.default_rng(seed)
    splits = {"": per_class} if test_per_class is None else {"train": per_class,
                                                            "test": test_per_class}
    names = [f"class_{label}" for label in range(num_classes)]
    for split, count in splits.items():
        labels = np.repeat(np.arange(num_classes), count)
        images = [shape_image(label, rng, size) for label in labels]
        write_folder(os.path.join(root, split), images, labels, names, fmt)
    return str(root)
