"""A first run in about a minute: no download, a small network, everything a run makes.

    python experiments/first_run.py

It writes a small generated image folder (``data/glyphs10``: ten classes, one
random glyph each, drawn at random positions on noise), then trains an ArcFace
head on ``tinycnn`` through exactly the path of ``experiments/run.py``:
validation split, TensorBoard logs with the embedding projector, test metrics,
and a SavedModel in ``saved_models/``. At the end it prints where each went and
the commands to look at them. Extra flags are passed on to ``run.py``
(``python experiments/first_run.py --loss softmax``).
"""

import os
import sys

import make_glyphs  # this folder's generator
import run

DATA = os.path.join("data", "glyphs10")
SETTINGS = ["--backbone", "tinycnn", "--loss", "arcface", "--scale", "8", "--margin", "0.1",
            "--dataset", DATA, "--epochs", "4", "--batch-size", "32", "--embedding-dim", "32",
            "--projector-samples", "200", "--overwrite"]


def main(argv=None):
    from tfmargin.quiet import import_tensorflow

    import_tensorflow()
    if not os.path.isdir(DATA):
        make_glyphs.write_glyphs(DATA, num_classes=10, train_per_class=120, test_per_class=30)
        print(f"wrote a generated image folder to {DATA} (10 classes x 120 train + 30 test)")
    return run.main([*SETTINGS, *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
