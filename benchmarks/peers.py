"""PyTorch baselines for the benchmark's peer section, written here from the published
descriptions (not from this project's Keras code):

* airbench94 (Jordan 2024, ``KellerJordan/cifar10-airbench`` ``legacy/airbench94.py``): a
  2x2 whitening conv with 24 outputs (fixed filters, a trainable bias) and GELU, three conv
  groups (conv3x3, max-pool 2, BatchNorm without scale, GELU, conv3x3, BatchNorm, GELU) of
  64/256/256 channels, a global max-pool, a bias-free linear head scaled by 1/9; SGD with
  Nesterov momentum 0.85 in two groups (BatchNorm offsets at 64x the learning rate), label
  smoothing 0.2.
* MobileNetV2 (Sandler et al. 2018, Table 2) adapted to 32x32 as this project adapts it: the
  first conv and the first stride-2 bottleneck at stride 1; then this project's neck
  (global pooling, a 512-wide bias-free projection, BatchNorm) and an ArcFace head
  (s * cos(theta + m) on the target class, s = 8, m = 0.1; Deng et al. 2019); SGD with
  Nesterov momentum 0.9 and coupled weight decay 5e-4 on the conv and linear weights.

Channels-last memory format, as oneDNN prefers on a CPU. ``training_step`` returns a
zero-argument function that runs one optimizer step on a fixed batch, in float32 or under
``torch.autocast("cpu", dtype=torch.bfloat16)``.
"""

import math

import numpy as np
import torch
from torch import nn


def airbench94(num_classes=10):
    whitening = nn.Conv2d(3, 24, 2, bias=True)
    whitening.weight.requires_grad = False  # fixed filters, as airbench: only its bias learns
    layers = [whitening, nn.GELU()]
    channels = 24
    for width in (64, 256, 256):
        for i in (1, 2):
            layers.append(nn.Conv2d(channels, width, 3, padding=1, bias=False))
            channels = width
            if i == 1:
                layers.append(nn.MaxPool2d(2))
            norm = nn.BatchNorm2d(width, eps=1e-12, momentum=0.4)
            norm.weight.requires_grad = False  # no scale, as airbench
            layers += [norm, nn.GELU()]

    class Scale(nn.Module):
        def forward(self, x):
            return x / 9

    return nn.Sequential(*layers, nn.AdaptiveMaxPool2d(1), nn.Flatten(), Scale(),
                         nn.Linear(channels, num_classes, bias=False))


def _conv_bn(c_in, c_out, kernel, stride, groups=1, activation=True):
    layers = [nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, groups=groups,
                        bias=False), nn.BatchNorm2d(c_out, momentum=0.1)]
    return layers + ([nn.ReLU6()] if activation else [])


class InvertedResidual(nn.Module):
    def __init__(self, c_in, c_out, stride, expansion):
        super().__init__()
        hidden = c_in * expansion
        layers = _conv_bn(c_in, hidden, 1, 1) if expansion != 1 else []
        layers += _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        layers += _conv_bn(hidden, c_out, 1, 1, activation=False)
        self.block = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class ArcFaceHead(nn.Module):
    """Cosine logits, the target class's as s * cos(theta + m) in training."""

    def __init__(self, dim, num_classes, scale=8.0, margin=0.1):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_classes, dim) / math.sqrt(dim))
        self.scale, self.margin = scale, margin

    def forward(self, x, labels):
        cos = nn.functional.linear(nn.functional.normalize(x.float()),
                                   nn.functional.normalize(self.weight.float()))
        theta = torch.acos(cos.gather(1, labels[:, None]).clamp(-1 + 1e-7, 1 - 1e-7))
        target = torch.cos(theta + self.margin)
        logits = cos.scatter(1, labels[:, None], target)
        return self.scale * logits


class MobileNetV2Classifier(nn.Module):
    # (expansion t, channels c, repeats n, stride s) of Sandler et al. 2018, Table 2, with the
    # first stride-2 stage at stride 1 for 32x32 inputs.
    STAGES = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, num_classes=10, embedding_dim=512):
        super().__init__()
        layers = _conv_bn(3, 32, 3, 1)  # the first conv at stride 1 (32x32 inputs)
        channels = 32
        for expansion, width, repeats, stride in self.STAGES:
            for i in range(repeats):
                layers.append(InvertedResidual(channels, width, stride if i == 0 else 1,
                                               expansion))
                channels = width
        layers += _conv_bn(channels, 1280, 1, 1)
        self.features = nn.Sequential(*layers)
        self.projection = nn.Linear(1280, embedding_dim, bias=False)
        self.norm = nn.BatchNorm1d(embedding_dim, momentum=0.1)
        self.head = ArcFaceHead(embedding_dim, num_classes)

    def forward(self, x, labels):
        x = self.features(x).mean(dim=(2, 3))
        return self.head(self.norm(self.projection(x)), labels)


def training_step(name, images, labels, bfloat16=False):
    """One optimizer step of ``name`` (``airbench94`` or ``mobilenetv2``) on the fixed batch
    ``images`` (N, H, W, 3, 0..255) and ``labels``, as a zero-argument function."""
    x = torch.tensor(np.asarray(images, np.float32) / 255.0).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    y = torch.tensor(np.asarray(labels, np.int64))
    if name == "airbench94":
        net = airbench94().to(memory_format=torch.channels_last)
        offsets = [m.bias for m in net if isinstance(m, nn.BatchNorm2d)]
        others = [p for p in net.parameters()
                  if p.requires_grad and all(p is not q for q in offsets)]
        lr = 1.5 / 1024 * len(images)
        optimizer = torch.optim.SGD([dict(params=offsets, lr=64 * lr, weight_decay=1.33e-3 / 64),
                                     dict(params=others, lr=lr, weight_decay=1.33e-3)],
                                    momentum=0.85, nesterov=True)

        def loss():
            return nn.functional.cross_entropy(net(x), y, label_smoothing=0.2)
    else:
        net = MobileNetV2Classifier().to(memory_format=torch.channels_last)
        decayed = [p for n, p in net.named_parameters() if p.ndim >= 2]
        rest = [p for n, p in net.named_parameters() if p.ndim < 2]
        optimizer = torch.optim.SGD([dict(params=decayed, weight_decay=5e-4),
                                     dict(params=rest, weight_decay=0.0)], lr=0.05,
                                    momentum=0.9, nesterov=True)

        def loss():
            return nn.functional.cross_entropy(net(x, y), y)

    net.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            value = loss()
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        return value.item()

    return step
