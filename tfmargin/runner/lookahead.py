"""airbench's lookahead: slow weights averaged with the fast ones every few steps."""

import os

import keras
import numpy as np
from keras import ops

from tfmargin.atomic import atomic_file


class Lookahead(keras.callbacks.Callback):
    """Lookahead averaging of every float weight, BatchNorm statistics included (airbench).

    Every ``every`` optimizer steps: ``slow <- decay * slow + (1 - decay) *
    fast``, then the model's (fast) weights are reset to ``slow``. With
    ``steps_per_execution`` > 1 Keras calls batch callbacks once per execution,
    so the update comes at the first call after each multiple of ``every``
    (``RunConfig.validate`` keeps executions no longer than ``every`` steps, so
    none is skipped). ``decay``
    ramps up cubically, ``base**every * (step / total_steps)**3``, so early
    training is barely averaged and the end strongly. When training ends the
    model holds the slow weights. The slow weights are written to
    ``state_path`` at every epoch end (atomically, with their step), so a run
    resumed by ``BackupAndRestore`` (listed before this callback) continues
    them; a missing or stale file restarts them from the restored weights.

    Args:
        total_steps: optimizer steps of the whole run.
        every: steps between updates.
        base: per-step decay at the end of the ramp (airbench: 0.95).
        state_path: where the slow weights are kept (``.npz``), or None.
    """

    def __init__(self, total_steps, every=5, base=0.95, state_path=None):
        super().__init__()
        self.total_steps, self.every, self.base = int(total_steps), int(every), float(base)
        self.state_path = state_path
        self.slow = None
        self.updates = 0  # multiples of ``every`` passed so far

    def decay(self, step):
        return self.base**self.every * (step / self.total_steps) ** 3

    def _step(self):
        return int(ops.convert_to_numpy(self.model.optimizer.iterations))

    def _weights(self):
        return [w for w in self.model.weights if "float" in str(w.dtype)]

    def on_train_begin(self, logs=None):
        step = self._step()
        self.updates = step // self.every
        self.slow = [ops.convert_to_numpy(w) for w in self._weights()]
        if self.state_path and os.path.exists(self.state_path):
            with np.load(self.state_path) as saved:
                if int(saved["step"]) == step and len(saved.files) - 1 == len(self.slow):
                    self.slow = [saved[f"w{i}"] for i in range(len(self.slow))]

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step // self.every > self.updates:
            self.updates = step // self.every
            self.update(self.decay(self.updates * self.every))

    def update(self, decay):
        for i, weight in enumerate(self._weights()):
            self.slow[i] = decay * self.slow[i] + (1.0 - decay) * ops.convert_to_numpy(weight)
            weight.assign(self.slow[i])

    def on_epoch_end(self, epoch, logs=None):
        if self.state_path:
            step = self._step()
            with atomic_file(self.state_path) as tmp, open(tmp, "wb") as f:
                np.savez(f, step=step, **{f"w{i}": w for i, w in enumerate(self.slow)})

    def on_train_end(self, logs=None):
        self.update(1.0)  # the model ends on the slow weights
