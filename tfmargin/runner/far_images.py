"""Images of no class a model knows, for a run's far-away figures: what a user first tries
against a reject option (a flat colour, noise, a drawn digit), and any folder of real images
given by ``--far-ood`` (Fashion-MNIST, say: ``experiments/make_fashion_mnist.py``).

Generated from a fixed seed, so every run is scored on the same images; a folder's images
are read in name order. Each set is ``uint8 (N, H, W, 3)`` at the run's image size.
"""

import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tfmargin.data import IMAGE_EXTENSIONS, decode_image

SYNTHETIC_SIZE = 300  # images per generated set (an AUROC to about a point)
FOLDER_LIMIT = 2000  # images read from a --far-ood folder


def flat_images(count, size, rng):
    """One colour per image, uniform over RGB."""
    colours = rng.integers(0, 256, (count, 1, 1, 3), dtype=np.uint8)
    return np.broadcast_to(colours, (count, size, size, 3)).copy()


def noise_images(count, size, rng):
    """Every pixel and channel uniform over 0-255."""
    return rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def digit_images(count, size, rng):
    """A digit 0-9 drawn in Pillow's default font, about two thirds of the image high, in a
    random grey on a contrasting grey, shifted a few pixels: a user's drawn digit."""
    images = np.empty((count, size, size, 3), np.uint8)
    font = ImageFont.load_default(size=int(size * 0.7))
    for i in range(count):
        ink, paper = (int(v) for v in rng.permutation([rng.integers(0, 80),
                                                        rng.integers(175, 256)]))
        canvas = Image.new("L", (size, size), paper)
        left, top, right, bottom = font.getbbox(str(i % 10))
        dx, dy = rng.integers(-size // 10, size // 10 + 1, 2)
        ImageDraw.Draw(canvas).text(((size - right - left) / 2 + dx,
                                     (size - bottom - top) / 2 + dy), str(i % 10),
                                    fill=ink, font=font)
        images[i] = np.asarray(canvas)[..., None]
    return images


def folder_images(folder, size, limit=FOLDER_LIMIT):
    """The first ``limit`` images (by path) under ``folder``, decoded and resized as training
    and the export decode every image (``tfmargin.data.decode_image``)."""
    import tensorflow as tf

    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(folder)
                   for name in names if name.lower().endswith(IMAGE_EXTENSIONS))[:limit]
    images = np.empty((len(paths), size, size, 3), np.uint8)
    for i, path in enumerate(paths):
        images[i] = decode_image(tf.io.read_file(path), size).numpy()
    return images


def far_image_sets(size, folders=(), seed=0):
    """``{name: images}``: the generated sets, then each folder's (named by its base name)."""
    rng = np.random.default_rng(seed)
    sets = {name: make(SYNTHETIC_SIZE, size, rng) for name, make in (
        ("flat", flat_images), ("noise", noise_images), ("digits", digit_images))}
    for folder in folders:
        sets[os.path.basename(os.path.normpath(folder))] = folder_images(folder, size)
    return sets
