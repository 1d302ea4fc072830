"""SGD with coupled L2 weight decay, as the PyTorch CIFAR recipes use it."""

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
    the coupled form. Only kernels (variables of rank >= 2) decay: BatchNorm
    scales and offsets and biases do not.

    Args:
        l2: float >= 0, the coupled decay ``wd``.
        **kwargs: ``keras.optimizers.SGD`` arguments (not ``weight_decay``).
    """

    def __init__(self, learning_rate=0.01, l2=0.0, **kwargs):
        if kwargs.get("weight_decay"):
            raise ValueError("L2SGD: pass the coupled decay as l2, not weight_decay.")
        super().__init__(learning_rate, **kwargs)
        self.l2 = float(l2)

    def update_step(self, gradient, variable, learning_rate):
        # The gradient is already aggregated over replicas here, so the decay is added once.
        if self.l2 and len(variable.shape) >= 2:
            gradient = gradient + ops.cast(self.l2, gradient.dtype) * ops.convert_to_tensor(
                variable)
        super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "l2": self.l2}
