"""Small learnable image folders written by the tests: coloured shapes on noise."""

import os

import numpy as np
from PIL import Image

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
    for split, count in splits.items():
        for label in range(num_classes):
            folder = os.path.join(root, split, f"class_{label}")
            os.makedirs(folder, exist_ok=True)
            for i in range(count):
                Image.fromarray(shape_image(label, rng, size)).save(
                    os.path.join(folder, f"{i:04d}.{fmt}"))
    return str(root)
