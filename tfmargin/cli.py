"""Command-line plumbing shared by the experiment scripts.

Imports no TensorFlow: ``--help`` and flag errors are answered before it starts.
"""

import argparse
import contextlib
import dataclasses
import sys

from tfmargin.config import ConfigError, RunConfig
from tfmargin.margins import FALLBACKS, MARGIN_TYPES

_HELP = {
    "backbone": "backbone name: resnet18, mobilenetv2, efficientnetb0 (tinycnn: smoke tests)",
    "loss": "softmax (Dense head) or a margin head: arcface, cosface, sphereface, "
            "combined, normface",
    "recipe": "training procedure: standard (docs/recipe.md) or airbench (airbench94's: "
              "Nesterov 0.85, BatchNorm offsets at 64x lr, warm-up then linear decay, "
              "lookahead, alternating flip); it also sets the defaults of the other flags "
              "(python experiments/run.py --recipe airbench --help shows them)",
    "dataset": "tfds:<name> (or a bare TFDS name: cifar10, cifar100, ...) or an image folder "
               "with class sub-folders (optionally under train/ and test/)",
    "epochs": "training epochs",
    "batch_size": "batch size per replica (global batch = this x replicas)",
    "scale": "head scale s (float) or 'auto' = sqrt(2)*ln(C-1)",
    "margin": "margin m in radians (sphereface: multiplier); combined: three values m1 m2 m3; "
              "default per loss: " + ", ".join(f"{name} {spec.default_margin}" for name, spec
                                              in MARGIN_TYPES.items() if name != "normface"),
    "fallback": f"what ArcFace does past theta > pi - m: {', '.join(FALLBACKS)}",
    "sub_centers": "K centres per class (Sub-center ArcFace)",
    "ce_weight": "lambda of the mixed objective (1-lambda) CE(margin) + lambda CE(s cos theta)",
    "embedding_dim": "embedding size before the head (0 keeps the pooled backbone features)",
    "optimizer": "sgd (Nesterov momentum 0.9) or adamw",
    "learning_rate": "peak learning rate after warm-up (cosine decay to 0), per 128 images: "
                     "scaled linearly with the global batch",
    "weight_decay": "weight decay of kernels: coupled L2 for sgd (as PyTorch's SGD), "
                    "decoupled for adamw",
    "warmup_epochs": "linear warm-up length in epochs (standard recipe; airbench warms up "
                     "over its first 23 percent of steps)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "augment": "standard (pad-4 shift + flip), randaugment (standard + RandAugment) or none",
    "mix": "none, mixup or cutmix (Keras core layers; soft targets, the margin goes to the "
           "dominant class)",
    "mixed_precision": "mixed precision (float16 on GPU, bfloat16 on CPU); the head stays float32",
    "jit_compile": "compile the train step with XLA",
    "steps_per_execution": "training steps per call into the compiled step (fewer Python "
                           "round trips)",
    "strategy": "mirrored (all GPUs, else all CPUs), default (no distribution), multiworker "
                "(MultiWorkerMirroredStrategy from TF_CONFIG)",
    "limit_train": "use only the first N training images (0: all), for small budgets",
    "precise_bn_batches": "after training, recompute BatchNorm statistics exactly over N "
                          "training batches (0: keep the moving averages)",
    "tta": "test-time augmentation level of the reported tta metrics and the exports: 0 "
           "none, 1 mirror, 2 mirror + 1-pixel shifts (airbench's weights)",
    "validation_freq": "validate on the validation split every N epochs",
    "val_split": "fraction of the training data held out for validation (per class); 0 "
                 "trains on all of it (no validation metrics, nothing chosen)",
    "test_split": "fraction per class held out as the test split when a folder has no "
                  "train/ and test/",
    "image_size": "input size; images are resized to it",
    "seed": "random seed",
    "deterministic": "deterministic ops (bit-identical reruns on CPU)",
    "projector_samples": "validation images in the TensorBoard projector (0: no projector)",
    "projector_every": "also write the projector every N epochs (0: only at the end)",
    "export": "comma-separated exports written to --export-dir/<run name>: savedmodel, keras, "
              "onnx; or none",
    "export_dir": "where exports go",
    "name": "run name (default: derived from the settings)",
    "runs_dir": "where run directories go",
}


class OneLineParser(argparse.ArgumentParser):
    """Invalid flags: one line on stderr and exit 2 (no usage dump)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        fail(self, message)


def _scale(text):
    if text == "auto":
        return text
    return float(text)


def add_run_arguments(parser):
    """One flag per ``RunConfig`` field, defaults from ``RunConfig``."""
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        if isinstance(default, bool):
            parser.add_argument(flag, action="store_true", help=_HELP[field.name])
        elif field.name == "scale":
            parser.add_argument(flag, type=_scale, default=default, help=_HELP[field.name])
        elif field.name == "margin":
            parser.add_argument(flag, type=float, nargs="+", default=None,
                                help=_HELP[field.name])
        else:
            parser.add_argument(flag, type=type(default), default=default,
                                help=_HELP[field.name])
    parser.add_argument("--resume", action="store_true",
                        help="if the run directory exists: continue it, or do nothing if done")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory of the same name first")


def parse_run_args(parser, argv=None):
    """Parse twice: first for ``--recipe``, then with that recipe's defaults."""
    from tfmargin.recipes import RECIPES

    first = argparse.ArgumentParser(add_help=False)  # so --help shows the recipe's defaults
    first.add_argument("--recipe", default="standard")
    recipe = first.parse_known_args(argv)[0].recipe
    if recipe not in RECIPES:
        fail(parser, f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    # Every setting some recipe changes goes back to RunConfig's default first, so a parser
    # used twice does not keep the first recipe's defaults.
    base = RunConfig()
    changed = {key: getattr(base, key) for preset in RECIPES.values() for key in preset}
    parser.set_defaults(**{**changed, **RECIPES[recipe]})
    return parser.parse_args(argv)


def config_from_args(parser, args):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)}
    margin = values["margin"]
    if margin is not None:
        values["margin"] = tuple(margin) if len(margin) > 1 else margin[0]
    config = RunConfig(**values)
    try:
        config.validate()
    except ConfigError as error:
        fail(parser, str(error))
    return config


def fail(parser, message, code=2):
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    sys.exit(code)


@contextlib.contextmanager
def exit_with(parser):
    """Known failures become one line on stderr and a non-zero exit; anything else keeps
    its traceback."""
    from tfmargin.atomic import UnwritablePath
    from tfmargin.data import DatasetError
    from tfmargin.train import TrainingDiverged

    try:
        yield
    except (ConfigError, DatasetError) as error:
        fail(parser, str(error), 2)
    except TrainingDiverged as error:
        fail(parser, str(error), 3)
    except UnwritablePath as error:
        fail(parser, str(error), 1)
