"""Classify images with an exported model, rejecting those that fit no class.

    python experiments/predict.py saved_models/latest image.png ...

Needs only TensorFlow and the SavedModel, no tfmargin model code: what a client has
(``tfmargin.quiet``, standard library only, keeps TensorFlow's start-up lines quiet).
The export's ``serve_encoded`` endpoint decodes and resizes the image bytes with
the same function the training data went through; its probabilities carry the
temperature fitted on the validation split, and an image whose score (the run's
``--reject-score``, named in ``serving.json``) falls below the threshold chosen there is
printed as "unknown".
"""

import argparse
import json
import os
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("export", help="an export folder (holds savedmodel/), e.g. "
                        "saved_models/latest")
    parser.add_argument("images", nargs="+", help="image files (any size; resized)")
    parser.add_argument("--top-k", type=int, default=3, help="classes to print per image")
    args = parser.parse_args(argv)
    saved_model = os.path.join(args.export, "savedmodel")
    if not os.path.isdir(saved_model):
        parser.exit(2, f"predict.py: error: {saved_model!r} is not a SavedModel export; "
                       "train with experiments/run.py first\n")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from tfmargin.quiet import import_tensorflow  # the SavedModel needs no tfmargin class

    tf = import_tensorflow()
    import numpy as np

    model = tf.saved_model.load(saved_model)
    with open(os.path.join(args.export, "class_names.txt")) as f:
        names = f.read().splitlines()
    reject = None
    if os.path.exists(os.path.join(args.export, "serving.json")):
        with open(os.path.join(args.export, "serving.json")) as f:
            reject = json.load(f).get("reject")
    for path in args.images:
        # One image per call: the export decodes and resizes exactly as training did.
        try:
            with open(path, "rb") as f:
                out = model.serve_encoded(tf.constant([f.read()]))
        except (OSError, tf.errors.InvalidArgumentError):
            parser.exit(2, f"predict.py: error: cannot read image {path!r}\n")
        probabilities = out["probabilities"].numpy()[0]
        top = np.argsort(-probabilities)[: args.top_k]
        guesses = ", ".join(f"{names[i]} {probabilities[i]:.3f}" for i in top)
        if "rejected" in out and bool(out["rejected"].numpy()[0]):
            # The probabilities are over the known classes only: they say which class the
            # image is nearest, not that it is one.
            score = float(out["score"].numpy()[0])
            print(f"{path}: unknown ({reject['score']} {score:.3f} is below the threshold "
                  f"{reject['threshold']:.3f} chosen on validation; were it one of the known "
                  f"classes: {guesses})")
        else:
            print(f"{path}: {guesses}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
