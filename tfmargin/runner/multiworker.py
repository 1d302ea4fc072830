"""Keras 3 ``model.fit`` under ``MultiWorkerMirroredStrategy``: two narrow fixes.

Keras 3.15 on TensorFlow 2.21 cannot train under MultiWorkerMirroredStrategy
(keras-team/keras#20585). Two places in its TensorFlow trainer fail:

1. ``_maybe_symbolic_build`` hands a whole ``(x, y)`` batch of per-replica
   values to ``strategy.reduce``, which the collective strategy cannot take for
   a nested structure ("Attempt to convert a value (PerReplica ...)"). The
   build only needs shapes and dtypes, so this worker's first replica's values
   serve.
2. ``reduce_per_replica`` averages the step's logs with ``axis=0`` under a
   multi-worker strategy, which fails on the scalar losses and metrics. They
   are averaged over replicas with ``axis=None`` instead.

:func:`patch_keras` installs both (idempotent); ``train`` calls it only for
``--strategy multiworker``. Remove this module once Keras fixes the issue:
``tests/test_reliability.py`` trains two real workers and compares weights.
"""

import keras
from keras import tree
from keras.src.backend.tensorflow import trainer as tf_trainer  # private: see TESTED_KERAS

# The private functions replaced below were read in these Keras releases.
TESTED_KERAS = ("3.15.",)
_original_reduce_per_replica = tf_trainer.reduce_per_replica


def _maybe_symbolic_build(self, iterator=None, data_batch=None):
    local = self.distribute_strategy.experimental_local_results
    if iterator is not None:
        _, _, it = next(iter(iterator))
        data_batch = tree.map_structure(lambda v: local(v)[0], next(it))
    with self.distribute_strategy.scope():
        self._symbolic_build(data_batch=data_batch)


def _reduce_per_replica(values, strategy, reduction="auto"):
    if reduction in ("auto", "mean") and tf_trainer._collective_all_reduce_multi_worker(
            strategy):
        return tree.map_structure(lambda v: strategy.reduce("MEAN", v, axis=None), values)
    return _original_reduce_per_replica(values, strategy, reduction)


def patch_keras():
    """Install both fixes; refuses a Keras release whose internals were not checked."""
    if not keras.__version__.startswith(TESTED_KERAS):
        raise RuntimeError(
            f"--strategy multiworker patches private Keras internals checked only for Keras "
            f"{', '.join(v + 'x' for v in TESTED_KERAS)}; this is {keras.__version__}. Check "
            "tfmargin/runner/multiworker.py against it (keras-team/keras#20585) and extend "
            "TESTED_KERAS.")
    tf_trainer.TensorFlowTrainer._maybe_symbolic_build = _maybe_symbolic_build
    tf_trainer.reduce_per_replica = _reduce_per_replica
