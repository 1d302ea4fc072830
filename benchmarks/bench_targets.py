"""The benchmark's targets (head overhead, input pipeline, utilisation, against plain Keras
scripts), the speed levers of the standard recipe, and the accuracy check against a plain
script."""

import statistics
from functools import partial
from unittest import mock

import keras
import numpy as np
import tensorflow as tf
from setups import RunSetup
from timing import (
    gflop,
    images_per_second,
    matmul_peak,
    paired,
    training_flops_per_image,
)

from tfmargin.backbones import build_backbone
from tfmargin.data import load_dataset
from tfmargin.runner.config import RunConfig
from tfmargin.runner.train import train


def pipeline_rate(batches, batch_size, steps=100):
    """Images/s of iterating a pipeline with no model behind it."""
    iterator = iter(batches)
    for _ in range(5):
        next(iterator)
    start = tf.timestamp()
    for _ in range(steps):
        next(iterator)
    return steps * batch_size / float(tf.timestamp() - start)


def load_mock_tfds(num_examples):
    """CIFAR-10 through TFDS's reading path, with TFDS's own random examples (offline)."""
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=num_examples), \
            mock.patch("tfmargin.data._check_reachable"):
        return load_dataset("cifar10")


def plain_keras_model(backbone, num_classes, image_size=32):
    """What a plain keras.io-style script builds: backbone, pooling, Dense, default settings."""
    inputs = keras.Input((image_size, image_size, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)
    x = backbone(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes)(x))
    model.compile(optimizer="adam", metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


def stock_mobilenetv2(image_size=32):
    return keras.applications.MobileNetV2(input_shape=(image_size, image_size, 3),
                                          include_top=False, weights=None)


def as_arrays(split, limit=None):
    images, labels = zip(*((x.numpy(), int(y)) for x, y in split.take(limit or -1)),
                         strict=True)
    return np.stack(images).astype("float32"), np.array(labels, "int32")


def plain_rate(model, images, labels, batch_size):
    def fit(callbacks):
        model.fit(images, labels, batch_size=batch_size, epochs=1, verbose=0,
                  callbacks=callbacks)

    return images_per_second(fit, batch_size)


def bench_targets(report, data, tfds_data, args):
    steps, rounds, batch = args.steps, args.rounds, args.batch_size
    backbone = args.backbones[0]

    # Head overhead: same backbone, batches and step; ArcMarginLayer vs Dense.
    arc = RunSetup(data, steps, backbone=backbone, loss="arcface", batch_size=batch)
    dense = RunSetup(data, steps, backbone=backbone, loss="softmax", batch_size=batch)
    arc_memory, dense_memory = arc.cached_batches(steps), dense.cached_batches(steps)
    head = paired(partial(dense.rate, dense_memory), partial(arc.rate, arc_memory), rounds)
    report.add("head", f"{backbone} step time ArcMarginLayer / Dense", head["ratio"], "x",
               "<= 1.02", head["ratio"] <= 1.02,
               f"Dense {head['a']:.1f} img/s, ArcFace {head['b']:.1f} img/s, batch {batch}")

    # Input pipeline: the real pipeline (decode cache, shuffle, augmentation) vs the same
    # batches replayed from memory.
    pipe = paired(arc.rate, partial(arc.rate, arc_memory), rounds)
    report.add("input", f"{backbone} image folder pipeline / in-memory batches", pipe["ratio"],
               "x", ">= 0.95", pipe["ratio"] >= 0.95,
               f"{pipe['a']:.1f} vs {pipe['b']:.1f} img/s, augment standard")
    alone = pipeline_rate(arc.batches, batch)
    report.add("input", "input pipeline alone, no model (images/s)", alone, "img/s",
               note=f"feeding {pipe['b']:.1f} img/s takes {100 * pipe['b'] / alone:.2f}% of "
                    "what it can deliver on these cores")
    if tfds_data is not None:
        arc_tfds = RunSetup(tfds_data, steps, backbone=backbone, loss="arcface",
                            batch_size=batch)
        pipe = paired(arc_tfds.rate, partial(arc.rate, arc_memory), rounds)
        report.add("input", f"{backbone} TFDS pipeline / in-memory batches", pipe["ratio"], "x",
                   ">= 0.95", pipe["ratio"] >= 0.95,
                   f"{pipe['a']:.1f} vs {pipe['b']:.1f} img/s; TFDS mock_data cifar10")

    # Utilisation against the machine's matmul peak in the precision each backbone trains in
    # (auto: bfloat16 for some backbones on CPUs with bfloat16 instructions), measured now.
    peaks = {}
    for name in args.backbones:
        setup = arc if name == backbone else RunSetup(data, steps, backbone=name,
                                                      loss="arcface", batch_size=batch)
        rate = head["b"] if name == backbone else statistics.median(
            setup.rate(setup.cached_batches(steps)) for _ in range(rounds))
        dtype = tf.bfloat16 if setup.config.mixed_precision else tf.float32
        precision = dtype.name
        if precision not in peaks:
            peaks[precision] = matmul_peak(dtype=dtype)
            report.add("machine", f"{precision} matmul peak (tf.matmul 2048^2)",
                       peaks[precision], "GFLOP/s")
        flops = training_flops_per_image(setup.model)
        fraction = None if flops is None else flops * rate / 1e9 / peaks[precision]
        target = name == "resnet18"
        report.add("utilization", f"{name} training FLOP/s / matmul peak ({precision})",
                   float("nan") if fraction is None else 100 * fraction, "%",
                   ">= 50" if target else None,
                   None if not target or fraction is None else fraction >= 0.5,
                   f"{gflop(flops)} GFLOP/image x {rate:.1f} img/s, trained in {precision}")

    # Against plain Keras scripts, same batch and images.
    ours = RunSetup(data, steps, backbone=args.plain_backbone, loss="arcface",
                    batch_size=batch)
    images, labels = as_arrays(data.train, steps * batch)
    our_flops = training_flops_per_image(ours.model)
    stock = [("stock keras.applications", stock_mobilenetv2())] \
        if args.plain_backbone == "mobilenetv2" else []
    for label, backbone_model in (("same adapted network",
                                   build_backbone(args.plain_backbone, (32, 32, 3))), *stock):
        plain = plain_keras_model(backbone_model, data.num_classes)
        result = paired(ours.rate, partial(plain_rate, plain, images, labels, batch), rounds)
        plain_flops = training_flops_per_image(plain)
        # The target judges the runner's overhead, so only on the same network: the stock
        # network downsamples a 32x32 image to 1x1 and does a fraction of the work per image.
        target = label == "same adapted network"
        report.add("vs plain", f"{args.plain_backbone} run.py training / plain Keras ({label})",
                   result["ratio"], "x", ">= 1.0" if target else None,
                   result["ratio"] >= 1.0 if target else None,
                   f"{result['a']:.1f} vs {result['b']:.1f} img/s; GFLOP/image "
                   f"{gflop(our_flops)} vs {gflop(plain_flops)}")


def bench_levers(report, data, args):
    """Each lever against the default settings, paired, per backbone."""
    steps, rounds, batch = args.steps, args.rounds, args.batch_size
    levers = {
        "jit_compile": dict(jit_compile=True),
        "mixed precision (bfloat16 on CPU)": dict(mixed_precision=True),
        "steps_per_execution 4": dict(steps_per_execution=4),
        f"batch {2 * batch}": dict(batch_size=2 * batch),
        f"batch {batch // 2}": dict(batch_size=batch // 2),
    }
    for backbone in args.lever_backbones:
        base = RunSetup(data, steps, backbone=backbone, loss="arcface", batch_size=batch,
                        mixed_precision=False)
        base_memory = base.cached_batches(steps)
        for name, change in levers.items():
            setup = RunSetup(data, steps, backbone=backbone, loss="arcface",
                             **{"batch_size": batch, "mixed_precision": False, **change})
            memory = setup.cached_batches(steps)
            result = paired(partial(setup.rate, memory), partial(base.rate, base_memory), rounds)
            report.add("lever", f"{backbone}: {name} / float32 default", result["ratio"], "x",
                       note=f"{result['a']:.1f} vs {result['b']:.1f} img/s (in-memory batches)")


def bench_budget(report, data, args):
    """What a run of the paper's Table 1 costs on this CPU: each backbone's training step
    (the main command's head and batch, 128) in bfloat16 against float32, paired, and the
    hours of training (45,000 images x 5 epochs, evaluation not counted) at the precision
    ``--mixed-precision auto`` picks here."""
    batch, images = 128, 45_000 * 5
    for backbone in args.backbones:
        setups = {mixed: RunSetup(data, args.steps, backbone=backbone, loss="arcface",
                                  batch_size=batch, mixed_precision=mixed)
                  for mixed in (True, False)}
        steps = {mixed: partial(setup.rate, setup.cached_batches(args.steps))
                 for mixed, setup in setups.items()}
        result = paired(steps[True], steps[False], args.rounds)
        report.add("budget", f"{backbone}: bfloat16 / float32 training step", result["ratio"],
                   "x", note=f"{result['a']:.1f} vs {result['b']:.1f} img/s, batch {batch}")
        auto = RunConfig(backbone=backbone, loss="arcface").resolved().mixed_precision
        rate = result["a"] if auto else result["b"]
        report.add("budget", f"{backbone}: one main-command run's training, 45,000 x 5 epochs",
                   images / rate / 3600, "hours",
                   note=f"at {'bfloat16' if auto else 'float32'} (auto here), {rate:.1f} img/s")


def bench_accuracy(report, args, runs_dir):
    """Test accuracy at equal epochs: run.py's training vs the plain stock script."""
    data = load_dataset(args.dataset, limit_train=args.accuracy_train)
    config = RunConfig(backbone=args.plain_backbone, loss="arcface", dataset=args.dataset,
                       epochs=args.accuracy_epochs, limit_train=args.accuracy_train,
                       batch_size=args.batch_size, export="none", projector_samples=0,
                       far_ood="none",
                       runs_dir=runs_dir, validation_freq=args.accuracy_epochs)
    ours = train(config)["top1"]
    plain = plain_keras_model(stock_mobilenetv2() if args.plain_backbone == "mobilenetv2"
                              else build_backbone(args.plain_backbone), data.num_classes)
    images, labels = as_arrays(data.train)
    plain.fit(images, labels, batch_size=args.batch_size, epochs=args.accuracy_epochs,
              verbose=0)
    test_images, test_labels = as_arrays(data.test)
    baseline = plain.evaluate(test_images, test_labels, verbose=0, return_dict=True)["accuracy"]
    report.add("vs plain", f"{args.plain_backbone} test top-1: run.py - plain stock Keras",
               100 * (ours - baseline), "points", ">= 0", ours >= baseline,
               f"{100 * ours:.2f}% vs {100 * baseline:.2f}%, {data.train_size} train images x "
               f"{args.accuracy_epochs} epochs, {data.sizes['test']} test images")
