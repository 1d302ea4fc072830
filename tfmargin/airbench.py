"""airbench: the fast CIFAR-10 network of Keller Jordan, as a Keras backbone.

A Keras 3 port of the network of ``airbench94`` (Jordan, "94% on CIFAR-10 in
3.29 seconds on a single GPU", arXiv:2404.00498; design and numbers from
``KellerJordan/cifar10-airbench``, ``legacy/airbench94.py``). Written for this
project; the recipe that trains it (optimizer, schedule, lookahead,
augmentation, test-time augmentation) is the ``airbench`` recipe of
``tfmargin.runner.recipes.RECIPES``.
"""

import keras
import numpy as np
from keras import layers, ops

from tfmargin.activations import FusedGELU
from tfmargin.normalization import BATCHNORM_LAYERS

# airbench: eps added to the patch covariance's eigenvalues before whitening.
WHITENING_EPS = 5e-4
# PyTorch BatchNorm2d(momentum=0.4) keeps 0.6 of the running statistics; Keras' momentum
# means the same 0.6.
BN_MOMENTUM = 0.6
WIDTHS = {"airbench94": (64, 256, 256), "airbench93": (64, 128, 128)}


def patches_2x2(images):
    """Every 2x2 patch of ``images`` (N, H, W, C) as rows of length 4C, ordered (row,
    column, channel) like a Conv2D kernel's ``(2, 2, C)`` leading axes."""
    images = np.asarray(images, np.float64)
    rows, cols = images.shape[1] - 1, images.shape[2] - 1
    corners = [images[:, i:i + rows, j:j + cols, :] for i in (0, 1) for j in (0, 1)]
    return np.stack(corners, axis=3).reshape(-1, 4 * images.shape[-1])


def whitening_kernel(images, eps=WHITENING_EPS):
    """The frozen 2x2 whitening filters of ``images`` (N, H, W, C), normalised inputs.

    Patch second-moment matrix ``S = P^T P / n`` (not mean-centred, as
    airbench), eigenvectors ``V`` in order of decreasing eigenvalue ``l``;
    filters ``V / sqrt(l + eps)`` and their negatives: a ``(2, 2, C, 8C)``
    kernel. On the patches it was fitted to, the first 4C outputs have
    second moments ``l / (l + eps)``: identity up to eps.
    """
    patches = patches_2x2(images)
    eigenvalues, eigenvectors = np.linalg.eigh(patches.T @ patches / len(patches))
    eigenvalues, eigenvectors = eigenvalues[::-1], eigenvectors[:, ::-1]
    filters = eigenvectors / np.sqrt(np.maximum(eigenvalues, 0.0) + eps)
    channels = images.shape[-1]
    kernel = np.concatenate([filters, -filters], axis=1)
    return kernel.reshape(2, 2, channels, 8 * channels).astype(np.float32)


@keras.saving.register_keras_serializable(package="tfmargin")
class PatchWhitening(layers.Layer):
    """A 2x2 "valid" convolution with frozen whitening filters and a trainable bias.

    ``y = conv2d(x, W) + b`` with ``W`` from ``whitening_kernel`` of the
    training images (call ``adapt`` once before training), ``8C`` output
    channels: the whitened patch and its negative, so a following GELU acts
    like a CReLU. ``W`` is not trainable; ``b`` is (airbench trains it only
    for the first epochs: the recipe's optimizer freezes it).

    Args:
        eps: added to the eigenvalues before ``1 / sqrt``.

    Example:
    >>> layer = PatchWhitening()
    >>> layer.adapt(np.random.default_rng(0).normal(size=(8, 32, 32, 3)))
    >>> tuple(layer(np.zeros((2, 32, 32, 3), "float32")).shape)
    (2, 31, 31, 24)

    References:
        Jordan, "94% on CIFAR-10 in 3.29 seconds on a single GPU", 2024.
    """

    def __init__(self, eps=WHITENING_EPS, **kwargs):
        super().__init__(**kwargs)
        self.eps = float(eps)

    def build(self, input_shape):
        channels = input_shape[-1]
        self.kernel = self.add_weight((2, 2, channels, 8 * channels), initializer="zeros",
                                      trainable=False, name="kernel")
        # A name of its own: the airbench recipe's optimizer freezes it by name.
        self.bias = self.add_weight((8 * channels,), initializer="zeros",
                                    name="whitening_bias")

    def adapt(self, images):
        """Set the filters from normalised training ``images`` (N, H, W, C)."""
        images = np.asarray(images)
        if not self.built:
            self.build(images.shape)
        self.kernel.assign(whitening_kernel(images, self.eps))

    @property
    def adapted(self):
        """Whether ``adapt`` has set the filters (until then they are zero: the layer outputs
        only its bias)."""
        return self.built and bool(np.any(ops.convert_to_numpy(self.kernel)))

    def call(self, inputs):
        kernel = ops.cast(self.kernel, inputs.dtype)
        return ops.conv(inputs, kernel, padding="valid") + ops.cast(self.bias, inputs.dtype)

    def compute_output_shape(self, input_shape):
        n, h, w, c = input_shape
        return (n, None if h is None else h - 1, None if w is None else w - 1, 8 * c)

    def get_config(self):
        return {**super().get_config(), "eps": self.eps}


@keras.saving.register_keras_serializable(package="tfmargin")
class PartialDirac(keras.initializers.Initializer):
    """Conv kernel whose first ``min(C_in, C_out)`` filters pass their input channel through.

    Filter ``i < C_in`` is the identity on channel ``i`` (a centre tap of 1,
    PyTorch's ``dirac_``); the other filters are uniform in
    ``+-1 / sqrt(fan_in)`` (PyTorch's default conv init), as airbench.
    """

    def __init__(self, seed=None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        kh, kw, c_in, c_out = shape
        bound = 1.0 / np.sqrt(kh * kw * c_in)
        kernel = keras.random.uniform(shape, -bound, bound, dtype=dtype, seed=self.seed)
        n = min(c_in, c_out)
        dirac = np.zeros(shape, np.float32)
        dirac[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        mask = np.ones(shape, np.float32)
        mask[:, :, :, :n] = 0.0
        return kernel * ops.cast(mask, kernel.dtype) + ops.cast(dirac, kernel.dtype)

    def get_config(self):
        return {"seed": self.seed}


# The ``activation`` of each ``gelu`` of ``tfmargin.names.GELUS``.
GELU_ACTIVATIONS = {"keras": "gelu", "fused": FusedGELU}


def _activation_layer(activation, name):
    """``activation``: a Keras activation (name or function), or a layer class."""
    if isinstance(activation, type):
        return activation(name=name)
    return layers.Activation(activation, name=name)


def _conv_group(x, filters, activation, name, norm=layers.BatchNormalization):
    """conv3x3 -> max-pool 2 -> BN -> act -> conv3x3 -> BN -> act (airbench's ConvGroup)."""
    for i in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False,
                          kernel_initializer=PartialDirac(), name=f"{name}_conv{i}")(x)
        if i == 1:
            x = layers.MaxPooling2D(2, name=f"{name}_pool")(x)
        # No scale (gamma fixed at 1); eps 1e-12 as airbench.
        x = norm(momentum=BN_MOMENTUM, epsilon=1e-12, scale=False, name=f"{name}_bn{i}")(x)
        x = _activation_layer(activation, f"{name}_act{i}")(x)
    return x


def airbench(input_shape=(32, 32, 3), widths=WIDTHS["airbench94"], activation="gelu",
             name="airbench94", norm=layers.BatchNormalization):
    """airbench's network: whitening, three conv groups, global max-pool, 1/9 scale.

    ``PatchWhitening`` (24 channels for RGB) -> act -> three conv groups of
    ``widths`` (each halves the size: 31 -> 15 -> 7 -> 3) -> global max-pool
    -> features x 1/9. airbench divides its bias-free linear head's logits by
    9; scaling the features instead is the same for a linear head, and a
    no-op for the cosine heads, which normalise the features. 1.97 M
    parameters at widths 64/256/256. Call ``adapt`` on the
    ``whiten`` layer with normalised training images before training.
    ``activation`` (a Keras activation, or a layer class such as ``FusedGELU``) and
    ``norm`` (a BatchNormalization class) are replaceable, for the benchmark's variants.
    """
    inputs = keras.Input(input_shape)
    x = PatchWhitening(name="whiten")(inputs)
    x = _activation_layer(activation, "whiten_act")(x)
    for i, filters in enumerate(widths):
        x = _conv_group(x, filters, activation, f"block{i + 1}", norm)
    x = layers.GlobalMaxPooling2D(name="pool")(x)
    x = layers.Rescaling(1 / 9, name="temperature")(x)
    return keras.Model(inputs, x, name=name)


def airbench94(input_shape=(32, 32, 3), gelu="keras", batchnorm="keras"):
    """airbench94: widths 64/256/256 (94.01 % in 9.9 epochs on CIFAR-10 with its recipe);
    ``gelu``: ``"keras"`` or ``"fused"`` (``FusedGELU``); ``batchnorm``: ``"keras"`` or
    ``"fused"`` (``FusedBatchNormalization``, whose epsilon floor 1.001e-5 replaces 1e-12)."""
    return airbench(input_shape, WIDTHS["airbench94"], activation=GELU_ACTIVATIONS[gelu],
                    name="airbench94", norm=BATCHNORM_LAYERS[batchnorm])


def airbench93(input_shape=(32, 32, 3), gelu="keras", batchnorm="keras"):
    """airbench93's widths 64/128/128 (about half the FLOPs; 93 % in the airbench paper)."""
    return airbench(input_shape, WIDTHS["airbench93"], activation=GELU_ACTIVATIONS[gelu],
                    name="airbench93", norm=BATCHNORM_LAYERS[batchnorm])
