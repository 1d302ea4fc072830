"""Classify images with an exported model.

    python experiments/predict.py saved_models/<run> image.png ...

Uses only TensorFlow and the SavedModel (no tfmargin import): what a client has.
The export's ``serve_encoded`` endpoint decodes and resizes the image bytes with
the same function the training data went through.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("export", help="an export folder (holds savedmodel/)")
    parser.add_argument("images", nargs="+", help="image files (any size; resized)")
    parser.add_argument("--top-k", type=int, default=3, help="classes to print per image")
    args = parser.parse_args(argv)
    saved_model = os.path.join(args.export, "savedmodel")
    if not os.path.isdir(saved_model):
        parser.exit(2, f"predict.py: error: {saved_model!r} is not a SavedModel export; "
                       "train with experiments/run.py first\n")
    import numpy as np
    import tensorflow as tf

    model = tf.saved_model.load(saved_model)
    outputs = None
    for path in args.images:
        # One image per call: the export decodes and resizes exactly as training did.
        try:
            with open(path, "rb") as f:
                one = model.serve_encoded(tf.constant([f.read()]))
        except (OSError, tf.errors.InvalidArgumentError):
            parser.exit(2, f"predict.py: error: cannot read image {path!r}\n")
        outputs = one if outputs is None else {
            k: tf.concat([outputs[k], v], 0) for k, v in one.items()}
    with open(os.path.join(args.export, "class_names.txt")) as f:
        names = f.read().splitlines()
    probabilities = outputs["probabilities"].numpy()
    for path, probs in zip(args.images, probabilities, strict=True):
        top = np.argsort(-probs)[: args.top_k]
        print(f"{path}: " + ", ".join(f"{names[i]} {probs[i]:.3f}" for i in top))
    return probabilities


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
