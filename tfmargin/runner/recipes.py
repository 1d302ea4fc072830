"""Training recipes: optimizer, schedule, regularisation, augmentation, epochs and evaluation,
bundled and named.

A recipe is the defaults of the run's flags (``RECIPES``; flags given explicitly still win)
plus the parts that have no flag (``make_optimizer``, ``learning_rate_schedule``,
``recipe_callbacks``). ``standard``: ``docs/recipe.md``. ``airbench``: airbench94's recipe
(Jordan 2024; ``KellerJordan/cifar10-airbench``, ``legacy/airbench94.py``), its numbers restated
for a mean (not summed) loss: lr 1.5 per 1,024 images, coupled L2 0.0153 / 11.5; 10 epochs
(airbench: 9.9). It holds out 10 % of the training images for validation, so its export has a
fitted temperature and a reject threshold; the converged study trains on all of them
(``--val-split 0``: nothing is chosen in such a run).

The presets are plain Python (the command line reads them before a run builds anything); the
builders import Keras when called.
"""

import os

from tfmargin.scores import LEGACY_KNN_K

# The learning rate is given for this many images per step and scaled linearly with the
# global batch (Goyal et al. 2017, "Accurate, Large Minibatch SGD").
REFERENCE_BATCH = 128
# The standard recipe's learning rate per REFERENCE_BATCH images for a head without its own
# (HEAD_DEFAULTS): the one the margin heads' scale and margin were chosen at.
MARGIN_HEAD_LEARNING_RATE = 0.05
RECIPES = {
    "standard": {},
    "airbench": dict(backbone="airbench94", epochs=10, batch_size=1024,
                     learning_rate=1.5 * REFERENCE_BATCH / 1024, weight_decay=0.0153 / 11.5,
                     label_smoothing=0.2, augment="airbench", embedding_dim=0,
                     precise_bn_batches=0, tta=2, val_split=0.1, gelu="fused"),
}
# Each head's own defaults under a recipe, where they differ from the recipe's: the one place
# the runner reads them (RunConfig.for_recipe, --help), each chosen on validation
# (docs/recipe.md, "Each head's recipe"). standard: softmax's learning rate, chosen at the
# main command's budget, paired by seed. airbench: none chosen yet, so every head trains by
# airbench's settings (tuned for softmax) until the per-head selection grid has chosen.
HEAD_DEFAULTS = {"standard": {"softmax": dict(learning_rate=0.025)}, "airbench": {}}
RECIPE_HELP = {
    "standard": "SGD with Nesterov momentum, linear warm-up then cosine decay, coupled L2; "
                "docs/recipe.md",
    "airbench": "airbench94's training: batch 1,024, Nesterov 0.85, BatchNorm offsets at "
                "64x lr, warm-up then linear decay, lookahead, alternating flip, label "
                "smoothing 0.2, TTA 2, 10 epochs, GELU fused",
}
# The reject score a head serves by default (--reject-score auto), per recipe: ``(score,
# k)`` chosen on validation with a class held out of training (docs/recipe.md, "The served
# reject score"). A head without an entry serves the maximum logit, and says so. Written from
# ``python experiments/served_scores.py``; a test checks it against the ledger.
SERVED_SCORES = {("airbench", "arcface"): ("knn", 50), ("airbench", "cosface"): ("msp", 50),
                 ("airbench", "normface"): ("msp", 50), ("airbench", "softmax"): ("knn", 50),
                 ("standard", "arcface"): ("knn", 5), ("standard", "softmax"): ("knn", 1)}
DEFAULT_SERVED_SCORE = ("max_logit", LEGACY_KNN_K)
# airbench's settings that have no flag of their own.
AIRBENCH = dict(momentum=0.85, offset_lr_scale=64.0, whiten_bias_epochs=3, warmup=0.23,
                start=0.2, end=0.07, lookahead_every=5, lookahead_base=0.95)


def head_defaults(recipe, loss):
    """``recipe``'s settings for a run of ``loss``: ``RECIPES``, then ``HEAD_DEFAULTS``."""
    return {**RECIPES[recipe], **HEAD_DEFAULTS[recipe].get(loss, {})}


def peak_learning_rate(config, global_batch):
    """``--learning-rate`` is per ``REFERENCE_BATCH`` images: linear scaling with the batch
    (``config``: a ``ResolvedConfig``)."""
    return config.learning_rate * global_batch / REFERENCE_BATCH


def learning_rate_schedule(config, steps_per_epoch, global_batch=REFERENCE_BATCH):
    """standard: linear warm-up to the (batch-scaled) peak, then cosine decay to 0.
    airbench: linear from 0.2x to the peak over 23 % of the steps, then linear to 0.07x."""
    import keras

    from tfmargin.optimizers import WarmupLinearDecay

    total = steps_per_epoch * config.epochs
    peak = peak_learning_rate(config, global_batch)
    if config.recipe == "airbench":
        return WarmupLinearDecay(peak, total, AIRBENCH["warmup"], AIRBENCH["start"],
                                 AIRBENCH["end"])
    warmup = min(int(config.warmup_epochs * steps_per_epoch), total // 2)
    return keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else peak, max(total - warmup, 1),
        warmup_target=peak if warmup else None, warmup_steps=warmup)


def make_optimizer(config, steps_per_epoch, global_batch=REFERENCE_BATCH):
    """SGD (Nesterov, coupled L2; airbench: momentum 0.85, decay on every parameter,
    BatchNorm offsets at 64x lr, whitening bias frozen after 3 epochs) or AdamW."""
    import keras

    from tfmargin.optimizers import L2SGD

    schedule = learning_rate_schedule(config, steps_per_epoch, global_batch)
    if config.optimizer == "adamw":
        adamw = keras.optimizers.AdamW(schedule, weight_decay=config.weight_decay)
        # Decay on BatchNorm parameters and biases only fights the normalisation.
        adamw.exclude_from_weight_decay(var_names=["gamma", "beta", "bias"])
        return adamw
    if config.recipe == "airbench":
        return L2SGD(schedule, l2=config.weight_decay, nesterov=True, decay_all=True,
                     momentum=AIRBENCH["momentum"], offset_lr_scale=AIRBENCH["offset_lr_scale"],
                     frozen_after={"whitening_bias": AIRBENCH["whiten_bias_epochs"]
                                   * steps_per_epoch})
    return L2SGD(schedule, l2=config.weight_decay, momentum=0.9, nesterov=True)


def recipe_callbacks(config, total_steps, run_dir):
    """Callbacks the recipe trains with, to follow ``BackupAndRestore`` (airbench: lookahead,
    its slow weights kept in ``checkpoints/lookahead.npz``)."""
    if config.recipe != "airbench":
        return []
    from tfmargin.runner.lookahead import Lookahead

    return [Lookahead(total_steps, AIRBENCH["lookahead_every"], AIRBENCH["lookahead_base"],
                      os.path.join(run_dir, "checkpoints", "lookahead.npz"))]
