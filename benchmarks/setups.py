"""The benchmarks' set-ups: a run's compiled model and batches built as the runner builds
them, the airbench recipe's, and the data they train on. Shared by ``bench.py`` and the
oneDNN child (``onednn.py``), which import it and not each other."""

import os
from functools import partial

import keras
import numpy as np
from timing import images_per_second

from tfmargin.airbench import GELU_ACTIVATIONS, airbench
from tfmargin.backbones import build_backbone
from tfmargin.classifier import MarginClassifier
from tfmargin.data import channel_statistics, load_dataset, write_image_folder
from tfmargin.normalization import BATCHNORM_LAYERS
from tfmargin.runner.config import RunConfig
from tfmargin.runner.train import compile_model, make_datasets, precision_policy


def write_random_folder(root, num_classes=10, per_class=64, test_per_class=8, size=32):
    """JPEG class folders of random images: speed does not depend on what they show."""
    rng = np.random.default_rng(0)
    names = [f"class_{label}" for label in range(num_classes)]
    for split, count in (("train", per_class), ("test", test_per_class)):
        labels = np.repeat(np.arange(num_classes), count)
        images = rng.integers(0, 256, (len(labels), size, size, 3), dtype=np.uint8)
        write_image_folder(os.path.join(root, split), images, labels, names, fmt="jpg")
    return root


class RunSetup:
    """A compiled ``MarginClassifier`` and its batches, built as ``train`` builds them;
    ``network``: a function building the backbone instead of the registry (a variant the
    registry does not hold), called under the run's dtype policy."""

    def __init__(self, data, steps, recipe="standard", network=None, **settings):
        if recipe == "standard":
            settings.setdefault("batch_size", 128)
        config = RunConfig.for_recipe(recipe, export="none", projector_samples=0, **settings)
        config.validate()
        self.config = config.resolved()
        keras.config.set_dtype_policy(precision_policy(self.config))
        try:
            mean, variance = channel_statistics(data.train)
            backbone = network() if network else build_backbone(
                self.config.backbone, gelu=self.config.gelu,
                batchnorm=self.config.batchnorm)
            self.model = MarginClassifier(
                backbone, data.num_classes,
                margin_type=self.config.loss, margin=self.config.margin,
                scale=self.config.scale, embedding_dim=self.config.embedding_dim, mean=mean,
                variance=variance)
            self.model.adapt(data.train.batch(1024).map(lambda x, y: x))
            compile_model(self.model, self.config, steps, self.config.batch_size)
        finally:
            keras.config.set_dtype_policy("float32")
        # Repeated: every measurement round starts a fit over the same batches.
        self.batches = make_datasets(self.config, data, self.config.batch_size)[0].repeat()
        self.steps = steps * self.config.steps_per_execution

    def cached_batches(self, count):
        """``count`` batches of the real pipeline, replayed from memory."""
        memory = self.batches.take(count).cache().repeat()
        for _ in memory.take(count):
            pass
        return memory

    def rate(self, batches=None, callbacks=()):
        def fit(clock):
            self.model.fit(batches or self.batches, steps_per_epoch=self.steps, epochs=1,
                           verbose=0, callbacks=[*clock, *callbacks], shuffle=False)

        return images_per_second(fit, self.config.batch_size)


def airbench_setup(data, args, steps, activation=None, norm=None, **change):
    """An airbench94 recipe set-up (softmax head): the recipe's network (its GELU from
    ``change`` or the recipe), or with ``activation`` or ``norm`` replaced."""
    settings = {"batch_size": args.airbench_batch, "mixed_precision": False, **change}
    network = None
    if activation or norm:
        recipe = RunConfig.for_recipe("airbench", **settings)
        network = partial(airbench, activation=activation or GELU_ACTIVATIONS[recipe.gelu],
                          norm=norm or BATCHNORM_LAYERS[recipe.batchnorm])
    return RunSetup(data, steps, "airbench", network=network, loss="softmax", **settings)


def airbench_data(args, tmp, data=None):
    """Enough images for the airbench section's batches: ``data`` where it has them, else
    ``--dataset``, else random JPEGs written under ``tmp``."""
    needed = args.airbench_batch * (max(args.steps, args.peer_steps) + 1)
    if data is not None and data.train_size >= needed:
        return data
    if args.dataset:
        return load_dataset(args.dataset, limit_train=needed, val_split=0.0)
    per_class = needed // 10 + 1
    return load_dataset(write_random_folder(os.path.join(tmp, "airbench"),
                                            per_class=per_class), val_split=0.0)
