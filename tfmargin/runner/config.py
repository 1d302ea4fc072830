"""A run's whole configuration, its identity, and its checks: pure Python, so every flag
error is answered before a run builds anything.
"""

import dataclasses
import hashlib
import json
import os

from tfmargin import names
from tfmargin.margins import FALLBACKS, MARGIN_TYPES, check_head_arguments
from tfmargin.runner import provenance
from tfmargin.runner.recipes import (
    AIRBENCH,
    DEFAULT_SERVED_SCORE,
    HEAD_DEFAULTS,
    MARGIN_HEAD_LEARNING_RATE,
    RECIPES,
    SERVED_SCORES,
    head_defaults,
)
from tfmargin.scores import LEGACY_KNN_K, SCORES

# Settings that change neither the trained weights nor the reported metrics: they are left
# out of a run's identity. (validation_freq only decides which epochs are validated, and
# so which epoch a best checkpoint could come from; no reported number depends on it.)
NOT_IDENTITY = ("name", "runs_dir", "export", "export_dir", "projector_samples",
                "projector_every", "validation_freq", "reject_score", "far_ood")
# The scheme of a run's identity hash, recorded in its config.json. Version 1, every run so
# far: the hash leaves out each setting added after runs existed while it holds the value it
# had before (ADDED_LATER), so those runs keep their names and a sweep finds them finished;
# a record that predates a setting is read with that value (RunConfig.from_record).
IDENTITY_VERSION = 1
ADDED_LATER = {"recipe": "standard", "tta": 0, "classes": "", "gelu": "keras",
               "batchnorm": "keras"}


def dataset_label(dataset):
    """A dataset's short name in run names and tables: the folder's base name, or the TFDS
    name (``tfds:cifar10`` and ``cifar10`` are both ``cifar10``)."""
    return os.path.basename(os.path.normpath(dataset.removeprefix("tfds:")))


def normalized_classes(classes):
    """A ``--classes`` value in one spelling: the names sorted, comma-separated."""
    return ",".join(sorted(c for c in classes.split(",") if c))


class ConfigError(ValueError):
    """An impossible run configuration, with a message saying how to fix it."""


@dataclasses.dataclass
class RunConfig:
    backbone: str = "mobilenetv2"
    loss: str = "arcface"
    recipe: str = "standard"
    dataset: str = "cifar10"
    epochs: int = 5  # under an hour of MobileNetV2 on 2 CPU cores: docs/recipe.md
    batch_size: int = 128  # per replica
    scale: object = None  # float, "auto", or None: the margin type's default (MARGIN_TYPES)
    margin: object = None  # None: the margin type's default (tfmargin.margins.MARGIN_TYPES)
    fallback: str = "monotonic"
    sub_centers: int = 1
    ce_weight: float = 0.0
    embedding_dim: int = 512
    gelu: str = "keras"  # the GELU of names.GELU_BACKBONES (the airbench recipe: fused)
    # The BatchNorm of names.BATCHNORM_BACKBONES. Fused: Keras's function to rounding (where
    # epsilon >= 1.001e-5; its paired-seed check: docs/results.md), faster (docs/performance.md).
    batchnorm: str = "fused"
    optimizer: str = "sgd"
    # Per recipes.REFERENCE_BATCH images; None: the head's (resolved_learning_rate).
    learning_rate: object = None
    weight_decay: float = 5e-4  # SGD: coupled L2, as the PyTorch CIFAR recipes
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    augment: str = "standard"
    mix: str = "none"
    mixed_precision: object = "auto"  # True, False, or "auto": resolved_mixed_precision
    jit_compile: bool = False
    steps_per_execution: int = 1
    strategy: str = "mirrored"
    limit_train: int = 0
    precise_bn_batches: int = 20
    tta: int = 0
    classes: str = ""  # comma-separated class names to train on (""): all; see class_list
    reject_score: str = "auto"  # the export's reject option: scores.SCORES, or "auto"
    far_ood: str = ""  # comma-separated folders of far-away images, or "none" (far_images)
    validation_freq: int = 1
    val_split: float = 0.1
    test_split: float = 0.1
    image_size: int = 32
    seed: int = 0
    deterministic: bool = False
    projector_samples: int = 1000
    projector_every: int = 0
    export: str = "savedmodel,keras"
    export_dir: str = "saved_models"
    name: str = ""
    runs_dir: str = "runs"

    def __post_init__(self):
        # The class list as a set, in one spelling: the order given does not change the run,
        # and config.json records it as the identity does (so a run resumes however the
        # classes were typed).
        self.classes = normalized_classes(self.classes)

    @classmethod
    def from_record(cls, record):
        """The configuration a run's ``config.json`` records (``ResolvedConfig.record``); a
        setting the record predates has the value it had before (``ADDED_LATER``), one it
        leaves out its recipe's default."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {**ADDED_LATER, **{k: v for k, v in record.items() if k in fields}}
        if isinstance(values.get("margin"), list):
            values["margin"] = tuple(values["margin"])
        return cls.for_recipe(**values)

    def resolved(self):
        """Every setting resolved once, as the run uses and records it (``ResolvedConfig``)."""
        score, knn_k = self.resolved_reject_score()
        chosen_by = ("--reject-score" if self.reject_score != "auto" else
                     "the head's choice on validation"
                     if (self.recipe, self.loss) in SERVED_SCORES else
                     "no choice on validation yet for this head and recipe: the maximum logit")
        return ResolvedConfig(
            asked=dataclasses.replace(self), margin=self.resolved_margin(),
            scale=self.resolved_scale(), learning_rate=self.resolved_learning_rate(),
            mixed_precision=self.resolved_mixed_precision(), gelu=self.resolved_gelu(),
            batchnorm=self.resolved_batchnorm(), reject_score=score, knn_k=knn_k,
            reject_chosen_by=chosen_by,
            export_formats=self.export_formats(), name=self.run_name())

    @classmethod
    def for_recipe(cls, recipe="standard", **settings):
        """A configuration with ``recipe``'s defaults for its head (``recipes.head_defaults``),
        ``settings`` overriding them."""
        if recipe not in RECIPES:
            raise ConfigError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
        return cls(**{**head_defaults(recipe, settings.get("loss", cls.loss)), **settings,
                      "recipe": recipe})

    def resolved_mixed_precision(self):
        """Whether the run trains in mixed precision. ``"auto"``: yes where it was measured
        faster: on an NVIDIA GPU (float16), and on a CPU with AVX-512 BF16 or AMX for the
        backbones in ``names.BFLOAT16_FASTER_ON_CPU`` (bfloat16); else no. Part of the
        identity as the resolved bool."""
        if self.mixed_precision == "auto":
            return provenance.has_gpu() or (provenance.has_bfloat16_instructions() and
                                            self.backbone in names.BFLOAT16_FASTER_ON_CPU)
        return bool(self.mixed_precision)

    def resolved_gelu(self):
        """The GELU the backbone is built with: ``gelu`` for the backbones built with GELU
        (``names.GELU_BACKBONES``), Keras's (the setting's first value, which changes
        nothing) for the others. Part of the identity as resolved."""
        return self.gelu if self.backbone in names.GELU_BACKBONES else "keras"

    def resolved_batchnorm(self):
        """The BatchNorm the backbone is built with: ``batchnorm`` for the backbones built
        with BatchNorm (``names.BATCHNORM_BACKBONES``), Keras's for the others (which have
        none). Part of the identity as resolved."""
        return self.batchnorm if self.backbone in names.BATCHNORM_BACKBONES else "keras"

    def class_list(self):
        """The classes to train on, as names (None: every class of the dataset)."""
        return [c for c in self.classes.split(",") if c] or None

    def export_formats(self):
        return tuple(f for f in self.export.split(",") if f and f != "none")

    def resolved_margin(self):
        """The margin the head uses: the given one, or the type's registry default."""
        if self.loss == "softmax":
            return None
        return MARGIN_TYPES[self.loss].default_margin if self.margin is None else self.margin

    def resolved_scale(self):
        """The scale the head uses: the given one (a float or "auto"), or the type's
        registry default; None for softmax."""
        if self.loss == "softmax":
            return None
        return MARGIN_TYPES[self.loss].default_scale if self.scale is None else self.scale

    def resolved_learning_rate(self):
        """The peak learning rate per ``recipes.REFERENCE_BATCH`` images: the given one, or
        the head's under its recipe (``recipes.HEAD_DEFAULTS``; else
        ``MARGIN_HEAD_LEARNING_RATE``). Part of the identity as resolved, so a run given the
        head's rate explicitly is the default run."""
        if self.learning_rate is not None:
            return self.learning_rate
        return HEAD_DEFAULTS.get(self.recipe, {}).get(self.loss, {}).get(
            "learning_rate", MARGIN_HEAD_LEARNING_RATE)

    def resolved_reject_score(self):
        """``(score, k)``: the score the export's reject option thresholds and the neighbour
        its kNN similarity reads (``scores.GALLERY_SCORES``; the reported kNN figures' for
        the others). ``"auto"``: the head's validated choice under its recipe
        (``recipes.SERVED_SCORES``), else the maximum logit."""
        if self.reject_score == "auto":
            return SERVED_SCORES.get((self.recipe, self.loss), DEFAULT_SERVED_SCORE)
        return self.reject_score, LEGACY_KNN_K

    def identity(self):
        """Every setting that changes the results, as JSON-ready values."""
        values = dataclasses.asdict(self)
        values["margin"] = self.resolved_margin()
        values["scale"] = self.resolved_scale()
        values["learning_rate"] = self.resolved_learning_rate()
        values["mixed_precision"] = self.resolved_mixed_precision()
        values["gelu"] = self.resolved_gelu()
        values["batchnorm"] = self.resolved_batchnorm()
        return json.loads(json.dumps({k: v for k, v in values.items()
                                      if k not in NOT_IDENTITY
                                      and not (k in ADDED_LATER and v == ADDED_LATER[k])}))

    def identity_hash(self):
        text = json.dumps(self.identity(), sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()[:8]

    def run_name(self):
        """Readable head and budget, then a hash of the whole identity (timm-style)."""
        if self.name:
            return self.name
        data = dataset_label(self.dataset)
        head = self.loss
        if self.loss != "softmax":
            margin = self.resolved_margin()
            head += f"-s{self.resolved_scale()}"
            if self.loss != "normface":
                head += "-m" + ("-".join(str(m) for m in margin)
                                if isinstance(margin, (list, tuple)) else str(margin))
            if self.loss in ("arcface", "combined") or self.fallback == "easy":
                head += f"-{self.fallback}"
            if self.ce_weight:
                head += f"-ce{self.ce_weight}"
        if self.recipe != "standard":
            head += f"-{self.recipe}"
        if self.resolved_mixed_precision():
            head += "-mixed"
        budget = f"e{self.epochs}" + (f"-n{self.limit_train}" if self.limit_train else "")
        if self.classes:
            budget += f"-c{len(self.class_list())}"
        return f"{data}-{self.backbone}-{head}-{budget}-{self.identity_hash()}"

    def differences(self, record):
        """``"key recorded -> new"`` for each identity setting that differs from a run
        directory's ``config.json``."""
        stored = RunConfig.from_record(record).identity()
        return [f"{key} {stored.get(key)!r} -> {value!r}"
                for key, value in self.identity().items() if stored.get(key) != value]

    def far_ood_folders(self):
        """The ``--far-ood`` folders, in the order given (``none``: no far-away images)."""
        return [] if self.far_ood == "none" else [f for f in self.far_ood.split(",") if f]

    def validate(self):
        """Raise ``ConfigError`` naming the first impossible setting and its allowed values."""
        def need(ok, message):
            if not ok:
                raise ConfigError(message)

        for flag, value, allowed in (
                ("backbone", self.backbone, names.BACKBONES), ("loss", self.loss, names.HEADS),
                ("recipe", self.recipe, RECIPES), ("tta level", self.tta, names.TTA_LEVELS),
                ("fallback", self.fallback, FALLBACKS), ("gelu", self.gelu, names.GELUS),
                ("batchnorm", self.batchnorm, names.BATCHNORMS),
                ("optimizer", self.optimizer, names.OPTIMIZERS),
                ("strategy", self.strategy, names.STRATEGIES),
                ("augmentation", self.augment, names.AUGMENTATIONS),
                ("mix", self.mix, names.MIXES),
                ("reject score", self.reject_score, {"auto": None, **SCORES})):
            need(value in allowed,
                 f"unknown {flag} {value!r}; choose one of {names.choices(allowed)}")
        for flag, value, low in (("epochs", self.epochs, 1), ("batch-size", self.batch_size, 1),
                                 ("steps-per-execution", self.steps_per_execution, 1),
                                 ("validation-freq", self.validation_freq, 1),
                                 ("projector-samples", self.projector_samples, 0),
                                 ("precise-bn-batches", self.precise_bn_batches, 0),
                                 ("limit-train", self.limit_train, 0),
                                 ("image-size", self.image_size, 32)):
            need(value >= low, f"--{flag} must be >= {low}, got {value}")
        need(self.embedding_dim >= 1 or self.embedding_dim == 0,
             f"--embedding-dim must be >= 1 (0: pooled features), got {self.embedding_dim}")
        need(self.resolved_learning_rate() > 0,
             f"--learning-rate must be > 0, got {self.learning_rate}")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        need(0 <= self.label_smoothing < 1,
             f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        need(0 <= self.val_split < 1, f"--val-split must be in [0, 1), got {self.val_split}")
        need(0 < self.test_split < 1, f"--test-split must be in (0, 1), got {self.test_split}")
        unknown = set(self.export_formats()) - set(names.EXPORT_FORMATS)
        need(not unknown, f"unknown --export format(s) {', '.join(sorted(unknown))}; choose "
             f"from {names.choices(names.EXPORT_FORMATS)} (comma-separated) or none")
        recipe_gelu = RECIPES.get(self.recipe, {}).get("gelu", RunConfig.gelu)
        need(self.gelu == recipe_gelu or self.backbone in names.GELU_BACKBONES,
             f"--gelu {self.gelu} needs a backbone built with GELU "
             f"({names.choices(names.GELU_BACKBONES)}); {self.backbone} has none")
        recipe_batchnorm = RECIPES.get(self.recipe, {}).get("batchnorm", RunConfig.batchnorm)
        need(self.batchnorm == recipe_batchnorm
             or self.backbone in names.BATCHNORM_BACKBONES,
             f"--batchnorm {self.batchnorm} needs a backbone built with BatchNorm "
             f"({names.choices(names.BATCHNORM_BACKBONES)}); {self.backbone} has none")
        missing = [folder for folder in self.far_ood_folders() if not os.path.isdir(folder)]
        need(not missing, f"--far-ood folder {missing[0] if missing else ''!r} does not exist; "
             "give a folder of images (experiments/make_fashion_mnist.py writes one)")
        classes = self.class_list() or []
        need(not self.classes or len(set(classes)) == len(classes) >= 2,
             f"--classes needs two or more distinct class names, got {self.classes!r}")
        every = AIRBENCH["lookahead_every"]
        need(self.recipe != "airbench" or self.steps_per_execution <= every,
             f"--steps-per-execution above {every} would skip lookahead updates of the "
             f"airbench recipe (one every {every} steps); use {every} or fewer")
        if self.loss != "softmax":
            self.check_head(1000)  # the real class count is checked again once data is read
            need(0 <= self.ce_weight < 1, f"--ce-weight must be in [0, 1), got {self.ce_weight}")

    def check_head(self, num_classes):
        """The head's own argument checks for ``num_classes``, as a ``ConfigError``."""
        try:
            check_head_arguments(num_classes, self.loss, self.margin, self.scale, self.fallback,
                                 self.sub_centers)
        except ValueError as error:
            raise ConfigError(str(error)) from None


@dataclasses.dataclass(frozen=True)
class ResolvedConfig:
    """A run's settings resolved once, when it starts: the head's margin, scale and
    learning rate, the precision, the kernels, the reject score, the exports and the run's
    name. Frozen: what the rest of the run reads and ``config.json`` records. Every other
    setting is read as asked (``asked``, a ``RunConfig``)."""

    asked: RunConfig
    margin: object
    scale: object
    learning_rate: float
    mixed_precision: bool
    gelu: str
    batchnorm: str
    reject_score: str
    knn_k: int  # the neighbour of the kNN similarity (scores.GALLERY_SCORES)
    reject_chosen_by: str  # what chose reject_score, in words
    export_formats: tuple
    name: str  # the run's name (a given --name, or the derived one)

    def __getattr__(self, key):
        if key == "asked":  # not yet set (copying): no recursion
            raise AttributeError(key)
        return getattr(self.asked, key)

    def record(self):
        """Every setting as resolved, JSON-ready, with the identity's version: what
        ``config.json`` holds of them (``RunConfig.from_record`` reads it back)."""
        values = dataclasses.asdict(self.asked)
        values |= {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                   if f.name not in ("asked", "export_formats", "name", "knn_k",
                                     "reject_chosen_by")}
        values["name"] = self.asked.name
        return json.loads(json.dumps(values | {"identity_version": IDENTITY_VERSION}))
