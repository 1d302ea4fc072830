"""Timing tools of the benchmark: paired alternating measurements, the machine's matmul
peak, the FLOPs of a training step, and the time per op under each framework's profiler.

Every speed claim in docs/performance.md is a ratio of two set-ups timed in alternating
blocks in one process (``paired``), or a rate next to the peak measured in the same run.
"""

import collections
import glob
import os
import statistics
import time

import keras
import tensorflow as tf


class StepClock(keras.callbacks.Callback):
    """(step index, time) at the end of every call into the train function."""

    def on_train_begin(self, logs=None):
        self.marks = []

    def on_train_batch_end(self, batch, logs=None):
        self.marks.append((batch, time.perf_counter()))


def images_per_second(fit, batch_size):
    """Run ``fit(callbacks)`` once; images/s from its first step's end to its last, so
    tracing, iterator start-up and buffer filling are outside it."""
    clock = StepClock()
    fit([clock])
    (first, start), (last, end) = clock.marks[0], clock.marks[-1]
    return (last - first) * batch_size / (end - start)


def steps_per_second(step, steps):
    """Images-agnostic rate of a zero-argument ``step`` (one call is done first, untimed)."""
    step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps / (time.perf_counter() - start)


def paired(measure_a, measure_b, rounds):
    """Alternate two zero-argument rate measurements (after one warm-up each); the medians
    and the median of the paired ratios a/b, so a machine that speeds up or slows down
    during the run hits both sides."""
    measure_a(), measure_b()
    a, b = [], []
    for _ in range(rounds):
        a.append(measure_a())
        b.append(measure_b())
    return {"ratio": statistics.median(x / y for x, y in zip(a, b, strict=True)),
            "a": statistics.median(a), "b": statistics.median(b), "rounds": rounds}


def matmul_peak(n=2048, repeats=10, trials=5, dtype=tf.float32):
    """Best GFLOP/s of chained ``tf.matmul`` of n x n matrices (the practical peak)."""
    x = tf.cast(tf.random.normal((n, n)), dtype)

    @tf.function
    def chain(x):
        for _ in range(repeats):
            x = tf.matmul(x, x) * tf.cast(1.0 / n, dtype)  # keeps the values finite
        return x

    chain(x).numpy()
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        chain(x).numpy()
        best = max(best, 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9)
    return best


def conv_peak(dtype=tf.float32, batch=256, size=15, channels=(64, 256), repeats=10, trials=5):
    """Best GFLOP/s of ``tf.nn.conv2d`` forward, 3x3 "same", on a ``(batch, size, size,
    channels[0])`` input to ``channels[1]`` filters: airbench94's second group's first conv,
    oneDNN's best case among the network's own shapes (on some CPUs faster than a square
    matmul, so the matmul figure alone is no bound there)."""
    c_in, c_out = channels
    # A distinct input per convolution, made before the clock starts: no two are the same
    # computation, so none can be merged away.
    inputs = [tf.cast(tf.random.normal((batch, size, size, c_in)), dtype) for _ in range(repeats)]
    kernel = tf.cast(tf.random.normal((3, 3, c_in, c_out)), dtype)

    @tf.function
    def chain(inputs):
        return tf.add_n([tf.cast(tf.reduce_sum(tf.nn.conv2d(x, kernel, 1, "SAME")[:, :1, :1]),
                                 tf.float32) for x in inputs])

    chain(inputs).numpy()
    flops = 2 * batch * size * size * 9 * c_in * c_out * repeats
    best = 0.0
    for _ in range(trials):
        start = time.perf_counter()
        chain(inputs).numpy()
        best = max(best, flops / (time.perf_counter() - start) / 1e9)
    return best


def training_flops_per_image(model, batch_size=2):
    """Float operations of one training step (forward + all gradients), per image, counted
    by TensorFlow's graph profiler, or None where this TensorFlow lacks it.

    The profiler lives in ``tensorflow.python.profiler`` (TensorFlow's internal API; no
    public replacement counts FLOPs of a graph), so it is imported guarded.
    """
    try:
        from tensorflow.python.profiler import model_analyzer, option_builder
    except ImportError:
        return None
    specs = tf.nest.map_structure(lambda i: tf.TensorSpec((batch_size, *i.shape[1:]), i.dtype),
                                  model.input)

    def step(inputs):
        with tf.GradientTape() as tape:
            outputs = model(inputs, training=True)
            loss = sum(tf.reduce_sum(o) for o in tf.nest.flatten(outputs))
        return tape.gradient(loss, model.trainable_variables)

    graph = tf.function(step).get_concrete_function(specs).graph
    options = option_builder.ProfileOptionBuilder(
        option_builder.ProfileOptionBuilder.float_operation()).with_empty_output().build()
    return model_analyzer.profile(graph, options=options).total_float_ops / batch_size


def tensorflow_op_times(run, logdir):
    """TensorFlow's profiler around ``run()``: ``{(op name, op type): milliseconds}``, the
    trace's op events (named ``name:type`` on the executor threads) summed over threads, so
    two ops run at once both count; XLA-compiled functions, which the trace does not name,
    under ``("", "XLA executable")``. None where this TensorFlow has no XPlane protobuf to
    read its trace with (the module is TensorFlow's, not a public API)."""
    try:
        from tensorflow.tsl.profiler.protobuf import xplane_pb2
    except ImportError:
        return None
    tf.profiler.experimental.start(logdir)
    try:
        run()
    finally:
        tf.profiler.experimental.stop()
    times = collections.Counter()
    for path in glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")):
        with open(path, "rb") as f:
            space = xplane_pb2.XSpace.FromString(f.read())
        for plane in space.planes:
            for line in plane.lines:
                for event in line.events:
                    meta = plane.event_metadata[event.metadata_id]
                    if meta.display_name and ":" in meta.name:
                        name = meta.name.rsplit(":", 1)[0]
                        times[(name, meta.display_name)] += event.duration_ps / 1e9
                    elif meta.name == "CpuExecutable::ExecuteAsyncOnStream":
                        times[("", "XLA executable")] += event.duration_ps / 1e9
    return times


def torch_op_times(run):
    """PyTorch's profiler around ``run()``: ``{op: milliseconds}`` of each op's own CPU
    time (its children's excluded)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        run()
    return {event.key: event.self_cpu_time_total / 1e3 for event in profile.key_averages()}


def gflop(flops):
    """GFLOP as text, ``?`` where TensorFlow could not count them."""
    return "?" if flops is None else f"{flops / 1e9:.3f}"

