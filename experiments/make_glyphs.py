"""Write a many-class image folder that needs no download: one random glyph per class.

    python experiments/make_glyphs.py /tmp/glyphs200 --classes 200

Each class is a random 6x6 binary pattern in its own colour, drawn 4x enlarged
at a random position on a noisy 32x32 canvas; ``train/`` and ``test/`` hold
different random draws. Used by ``sweep.py many-classes`` to show what the
head's scale does with hundreds of classes, where the paper could not train.
"""

import argparse
import os

import numpy as np


def glyph_classes(num_classes, rng, cells=6):
    """Distinct random binary patterns and a colour per class."""
    patterns = set()
    while len(patterns) < num_classes:
        patterns.add(tuple(rng.integers(0, 2, cells * cells)))
    shapes = np.array(sorted(patterns), dtype=bool).reshape(num_classes, cells, cells)
    colours = rng.integers(80, 256, (num_classes, 3))
    return shapes, colours


def draw(shape, colour, rng, size=32, zoom=4):
    image = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    big = np.kron(shape, np.ones((zoom, zoom), dtype=bool))
    top, left = rng.integers(0, size - big.shape[0] + 1, 2)
    patch = image[top:top + big.shape[0], left:left + big.shape[1]]
    patch[big] = colour
    return image


def write_glyphs(root, num_classes=200, train_per_class=40, test_per_class=10, seed=0):
    from tfmargin.data import write_image_folder

    rng = np.random.default_rng(seed)
    shapes, colours = glyph_classes(num_classes, rng)
    names = [f"glyph_{label:03d}" for label in range(num_classes)]
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes), count)
        images = [draw(shapes[label], colours[label], rng) for label in labels]
        write_image_folder(os.path.join(root, split), images, labels, names)
    return root


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", help="folder to create")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.path.exists(args.output):
        parser.exit(2, f"make_glyphs.py: error: {args.output!r} exists; choose a new folder\n")
    write_glyphs(args.output, args.classes, args.train_per_class, args.test_per_class, args.seed)
    print(f"wrote {args.classes} classes x ({args.train_per_class} train + "
          f"{args.test_per_class} test) images to {args.output}")


if __name__ == "__main__":
    main()
