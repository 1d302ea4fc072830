"""Classify images with an exported model.

    python experiments/predict.py saved_models/<run> image.png ...


Uses only TensorFlow and the SavedModel (no tfmargin import): what a client has.
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
    size = model.serve.input_signature[0].shape[1]
    batch = []
    for path in args.images:
        try:
            image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        except (tf.errors.InvalidArgumentError, tf.errors.NotFoundError):
            parser.exit(2, f"predict.py: error: cannot read image {path!r}\n")
        image = tf.image.resize(image, (size, size), antialias=True)
        batch.append(tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8))
    outputs = model.serve(tf.stack(batch))
    with open(os.path.join(args.export, "class_names.txt")) as f:
        names = f.read().splitlines()
    probabilities = outputs["probabilities"].numpy()
    for path, probs in zip(args.images, probabilities, strict=True):
        top = np.argsort(-probs)[: args.top_k]
        print(f"{path}: " + ", ".join(f"{names[i]} {probs[i]:.3f}" for i in top))
    return probabilities


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
