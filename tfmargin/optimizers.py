"""SGD with coupled L2 weight decay, as the PyTorch CIFAR recipes use it, and the
airbench learning-rate schedule."""

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="tfmargin")
class L2SGD(keras.optimizers.SGD):
    """SGD whose weight decay is added to the gradient before momentum.

    PyTorch's ``SGD(weight_decay=wd)``: ``g <- g + wd * w``, then momentum.
    Keras' own ``weight_decay`` argument is decoupled (``w <- w - lr * wd * w``
    outside the momentum), which with momentum 0.9 is about 1 / (1 - 0.9) = 10x
    weaker at the same value. The CIFAR recipes this project cites
    (weiaicunzai/pytorch-cifar100: SGD, momentum 0.9, wd 5e-4, batch 128) mean
    the coupled form. By default only kernels (variables of rank >= 2) decay.

    Args:
        l2: float >= 0, the coupled decay ``wd``.
        decay_all: decay every variable, biases and BatchNorm offsets too
            (airbench).
        offset_lr_scale: learning-rate multiplier of BatchNorm offsets
            (``beta``); their decay is divided by it, so every variable
            shrinks by ``lr * l2`` per step (airbench's ``bias_scaler`` 64).
        frozen_after: ``{variable name: step}``: the variables of that name
            stop changing from that step on (airbench stops training its
            whitening bias after 3 epochs).
        **kwargs: ``keras.optimizers.SGD`` arguments (not ``weight_decay``).
    """

    def __init__(self, learning_rate=0.01, l2=0.0, decay_all=False, offset_lr_scale=1.0,
                 frozen_after=None, **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError("L2SGD: pass the coupled decay as l2, not weight_decay.")
        super().__init__(learning_rate, **kwargs)
        self.l2 = float(l2)
        self.decay_all = bool(decay_all)
        self.offset_lr_scale = float(offset_lr_scale)
        self.frozen_after = dict(frozen_after or {})

    def update_step(self, gradient, variable, learning_rate):
        # The gradient is already aggregated over replicas here, so the decay is added once.
        # The name, not the path: under tf.distribute this is the backend's variable.
        name = variable.name.split("/")[-1].split(":")[0]
        lr_scale = self.offset_lr_scale if name == "beta" else 1.0
        if self.l2 and (self.decay_all or len(variable.shape) >= 2):
            gradient = gradient + ops.cast(self.l2 / lr_scale, gradient.dtype) * \
                ops.convert_to_tensor(variable)
        learning_rate = learning_rate * lr_scale
        if name not in self.frozen_after:
            super().update_step(gradient, variable, learning_rate)
            return
        # Frozen from that step on: the value is kept outright (a zero learning rate would
        # still let the momentum move it, as PyTorch's requires_grad=False does not).
        before = ops.copy(variable)  # a read now, not a reference to the variable
        super().update_step(gradient, variable, learning_rate)
        self.assign(variable, ops.where(self.iterations < self.frozen_after[name],
                                        ops.convert_to_tensor(variable), before))

    def get_config(self):
        return {**super().get_config(), "l2": self.l2, "decay_all": self.decay_all,
                "offset_lr_scale": self.offset_lr_scale, "frozen_after": self.frozen_after}


@keras.saving.register_keras_serializable(package="tfmargin")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear from ``start * peak`` to ``peak`` over ``warmup`` of the steps, then linear
    to ``end * peak`` at ``total_steps`` (airbench: 0.2, 23 %, 0.07).

    Args:
        peak: the largest learning rate.
        total_steps: steps of the whole run.
        warmup: fraction of ``total_steps`` spent warming up.
        start, end: first and last learning rate as fractions of ``peak``.
    """

    def __init__(self, peak, total_steps, warmup=0.23, start=0.2, end=0.07):
        self.peak, self.total_steps = float(peak), int(total_steps)
        self.warmup, self.start, self.end = float(warmup), float(start), float(end)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup_steps = max(int(self.warmup * self.total_steps), 1)
        rising = self.start + (1.0 - self.start) * step / warmup_steps
        falling = 1.0 + (self.end - 1.0) * (step - warmup_steps) / max(
            self.total_steps - warmup_steps, 1)
        return self.peak * ops.where(step < warmup_steps, rising, ops.maximum(falling,
                                                                               self.end))

    def get_config(self):
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup": self.warmup,
                "start": self.start, "end": self.end}
