"""Command-line plumbing shared by the experiment scripts.

``--help`` and flag errors are answered before a run builds anything.
"""

import argparse
import contextlib
import dataclasses
import sys

from tfmargin import names
from tfmargin.margins import FALLBACKS, MARGIN_TYPES
from tfmargin.runner.config import ConfigError, RunConfig
from tfmargin.runner.recipes import HEAD_DEFAULTS, MARGIN_HEAD_LEARNING_RATE, RECIPE_HELP
from tfmargin.scores import SCORES


def _help():
    """Each flag's help, the lists of names written from the registries."""
    margins = ", ".join(f"{name} {spec.default_margin}" for name, spec in MARGIN_TYPES.items()
                        if name != "normface")
    scales = ", ".join(f"{name} {spec.default_scale:g}" for name, spec in MARGIN_TYPES.items())
    published = "; ".join(spec.published for spec in MARGIN_TYPES.values())
    return {
        "backbone": f"backbone: {names.described(names.BACKBONES)}",
        "loss": f"the head: {names.choices(names.HEADS)} (softmax: a Dense layer; the others "
                "are margin heads, docs/heads.md)",
        "recipe": f"training procedure, which also sets the defaults of the other flags "
                  f"(shown by --recipe NAME --help): {names.described(RECIPE_HELP)}",
        "dataset": "tfds:<name> (or a bare TFDS name: cifar10, cifar100, ...) or an image "
                   "folder with class sub-folders (optionally under train/ and test/)",
        "epochs": "training epochs",
        "batch_size": "batch size per replica (global batch = this x replicas)",
        "scale": f"head scale s (float) or 'auto' = sqrt(2)*ln(C-1); default per head: "
                 f"{scales}",
        "margin": f"margin m in radians (sphereface: multiplier; combined: three values m1 m2 "
                  f"m3); default per head (chosen on CIFAR-10 validation, docs/recipe.md): "
                  f"{margins}; published values: {published}",
        "fallback": f"what ArcFace does past theta > pi - m: {names.choices(FALLBACKS)}",
        "sub_centers": "K centres per class (Sub-center ArcFace)",
        "ce_weight": "lambda of the mixed objective (1-lambda) CE(margin) + lambda CE(s cos "
                     "theta)",
        "embedding_dim": "embedding size before the head (0 keeps the pooled backbone "
                         "features)",
        "gelu": f"the GELU of the backbones that have one "
                f"({names.choices(names.GELU_BACKBONES)}): {names.described(names.GELUS)}",
        "batchnorm": f"the BatchNorm of the backbones that have one "
                     f"({names.choices(names.BATCHNORM_BACKBONES)}): "
                     f"{names.described(names.BATCHNORMS)}",
        "optimizer": f"optimizer: {names.described(names.OPTIMIZERS)}",
        "learning_rate": "peak learning rate per 128 images, scaled linearly with the global "
                         "batch (the recipe sets the schedule: docs/recipe.md); default: the "
                         "recipe's for the head (standard: " + ", ".join(
                             f"{loss} {settings['learning_rate']:g}" for loss, settings in
                             HEAD_DEFAULTS["standard"].items() if "learning_rate" in settings)
                         + f", the margin heads {MARGIN_HEAD_LEARNING_RATE:g})",
        "weight_decay": "weight decay: coupled L2 for sgd (as PyTorch's SGD), decoupled for "
                        "adamw",
        "warmup_epochs": "linear warm-up length in epochs (standard recipe only)",
        "label_smoothing": "label smoothing of the cross-entropy",
        "augment": f"augmentation: {names.described(names.AUGMENTATIONS)}",
        "mix": f"batch mixing: {names.described(names.MIXES)}",
        "mixed_precision": "mixed precision on or off (--no-mixed-precision); default auto: "
                           "on where it was measured faster: float16 on a GPU; bfloat16 on a "
                           "CPU with AVX-512 BF16 or AMX for "
                           f"{names.choices(names.BFLOAT16_FASTER_ON_CPU)}; the head stays "
                           "float32",
        "jit_compile": "compile the train step with XLA",
        "steps_per_execution": "training steps per call into the compiled step (fewer Python "
                               "round trips)",
        "strategy": f"distribution: {names.described(names.STRATEGIES)}",
        "limit_train": "use only the first N training images (0: all), for small budgets",
        "precise_bn_batches": "after training, recompute BatchNorm statistics exactly over N "
                              "training batches, kept where they beat the moving averages "
                              "on validation (0: keep the moving averages)",
        "tta": f"test-time augmentation of the reported tta metrics and the exports: "
               f"{names.described(names.TTA_LEVELS)}",
        "classes": "comma-separated class names to train on (default: all); the test images "
                   "of the others are the unknowns of the open-set metrics",
        "reject_score": f"the score the export's reject option thresholds (at the value that "
                        f"keeps 95 %% of the known validation images): auto (the head's choice "
                        f"made on validation, docs/recipe.md); {names.described(SCORES)}",
        "far_ood": "comma-separated folders of images of no known class, scored after "
                   "training beside generated flat, noise and digit images (AUROC and the "
                   "share the reject option rejects; experiments/make_fashion_mnist.py "
                   "writes Fashion-MNIST as such a folder); none: no far-away images",
        "validation_freq": "validate on the validation split every N epochs",
        "val_split": "fraction of the training data held out for validation (per class); 0 "
                     "trains on all of it (no validation metrics, nothing chosen)",
        "test_split": "fraction per class held out as the test split when a folder has no "
                      "train/ and test/",
        "image_size": "input size; images are resized to it",
        "seed": "random seed",
        "deterministic": "deterministic ops (bit-identical reruns on CPU)",
        "projector_samples": "validation images in the TensorBoard projector (0: no "
                             "projector)",
        "projector_every": "also write the projector every N epochs (0: only at the end)",
        "export": f"comma-separated exports written to --export-dir/<run name>: "
                  f"{names.described(names.EXPORT_FORMATS)}; or none",
        "export_dir": "where exports go",
        "name": "run name (default: derived from the settings)",
        "runs_dir": "where run directories go",
    }


class DefaultsHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each flag's default after its help, where it has one worth printing (not None, an
    empty string or a store_true flag's False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, "", False) or action.default is argparse.SUPPRESS \
                or "%(default)" in text or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class OneLineParser(argparse.ArgumentParser):
    """Invalid flags: one line on stderr and exit 2 (no usage dump)."""

    def __init__(self, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(**kwargs)

    def error(self, message):
        fail(self, message)


def _scale(text):
    if text == "auto":
        return text
    return float(text)


# --help's groups, by RunConfig field (a field not listed goes to the last group).
GROUPS = {
    "data": ("dataset", "classes", "limit_train", "val_split", "test_split", "image_size"),
    "model and head": ("backbone", "loss", "scale", "margin", "fallback", "sub_centers",
                       "ce_weight", "embedding_dim", "gelu", "batchnorm"),
    "training": ("recipe", "epochs", "batch_size", "optimizer", "learning_rate",
                 "weight_decay", "warmup_epochs", "label_smoothing", "augment", "mix",
                 "mixed_precision", "jit_compile", "steps_per_execution", "strategy", "seed",
                 "deterministic"),
    "evaluation and export": ("precise_bn_batches", "tta", "reject_score", "far_ood",
                              "validation_freq",
                              "projector_samples", "projector_every", "export", "export_dir"),
    "run management": ("name", "runs_dir"),
}


def add_run_arguments(parser, defaults=True):
    """One flag per ``RunConfig`` field, defaults from ``RunConfig``, in ``GROUPS``;
    ``defaults=False``: a flag not given is left out of the parsed namespace (the sweep
    applies only the flags given to every run of its grid)."""
    values = RunConfig()
    texts = _help()
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    group_of = {field: groups[title] for title, fields in GROUPS.items() for field in fields}
    for field in dataclasses.fields(RunConfig):
        flag = "--" + field.name.replace("_", "-")
        group = group_of.get(field.name, groups["run management"])
        default = getattr(values, field.name)
        given = {"default": default if defaults else argparse.SUPPRESS, "help": texts[field.name]}
        if field.name == "mixed_precision":
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **given)
        elif isinstance(default, bool):
            group.add_argument(flag, action="store_true", **given)
        elif field.name == "scale":
            group.add_argument(flag, type=_scale, **given)
        elif field.name == "learning_rate":
            group.add_argument(flag, type=float, **given)
        elif field.name == "margin":
            group.add_argument(flag, type=float, nargs="+", **given)
        else:
            group.add_argument(flag, type=type(default), **given)
    manage = groups["run management"]
    manage.add_argument("--resume", action="store_true",
                        help="what the same command does anyway, spelled out: continue an "
                             "interrupted run, or report a finished one again")
    manage.add_argument("--overwrite", action="store_true",
                        help="delete an existing run directory of the same name first")


def parse_run_args(parser, argv=None):
    """Parse twice: first for ``--recipe`` and ``--loss``, then with that recipe's defaults
    for that head (``recipes.head_defaults``), so --help shows them."""
    from tfmargin.runner.recipes import RECIPES, head_defaults

    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--recipe", default="standard")
    first.add_argument("--loss", default=RunConfig.loss)
    known = first.parse_known_args(argv)[0]
    if known.recipe not in RECIPES:
        fail(parser, f"unknown recipe {known.recipe!r}; choose one of {', '.join(RECIPES)}")
    # Every setting some recipe or head changes goes back to RunConfig's default first, so a
    # parser used twice does not keep the first recipe's defaults.
    base = RunConfig()
    changed = {key: getattr(base, key) for preset in (
        *RECIPES.values(), *(s for heads in HEAD_DEFAULTS.values() for s in heads.values()))
        for key in preset}
    parser.set_defaults(**{**changed, **head_defaults(known.recipe, known.loss)})
    return parser.parse_args(argv)


def run_settings(args):
    """The ``RunConfig`` fields in a parsed namespace, as ``RunConfig`` takes them (a margin
    of one value as a float, of three as a tuple)."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(RunConfig)
              if hasattr(args, f.name)}
    margin = values.get("margin")
    if margin is not None:
        values["margin"] = tuple(margin) if len(margin) > 1 else margin[0]
    return values


def config_from_args(parser, args):
    config = RunConfig(**run_settings(args))
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
    from tfmargin.runner.train import TrainingDiverged

    try:
        yield
    except KeyboardInterrupt:
        fail(parser, "interrupted; the same command continues the run from its last "
                     "finished epoch", 130)
    except (ConfigError, DatasetError) as error:
        fail(parser, str(error), 2)
    except TrainingDiverged as error:
        fail(parser, str(error), 3)
    except UnwritablePath as error:
        fail(parser, str(error), 1)
