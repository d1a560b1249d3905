"""Reference piecewise-linear models used by the demo, tests, benchmarks and notebooks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn


def mlp(n_in: int, hidden: Sequence[int], n_out: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """A fully connected network ``n_in -> hidden... -> n_out`` with biases and the given activation."""
    layers: list[nn.Module] = []
    prev = n_in
    for h in hidden:
        layers += [nn.Linear(prev, h), activation()]
        prev = h
    layers.append(nn.Linear(prev, n_out))
    return nn.Sequential(*layers)


def he_init(model: nn.Module, seed: int = 0) -> nn.Module:
    """Re-draw every Linear layer of ``model`` in place from a seeded generator: He-normal weights
    (std sqrt(2 / fan_in)) and N(0, 0.1²) biases, so untrained networks have many regions; returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            with torch.no_grad():
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2 / m.weight.shape[1]))
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


class LeNet(nn.Module):
    """LeNet-style CNN for 1×28×28 images: Conv-ReLU-MaxPool ×2, then a 120-84-10 MLP head.

    ``features`` (convolutional part) and ``head`` (the MLP) are separate submodules so that regions can be
    counted for the head alone or for the whole network.
    """

    def __init__(self, n_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        side = ((image_size - 4) // 2 - 4) // 2
        self.head = nn.Sequential(
            nn.Linear(16 * side * side, 120), nn.ReLU(),
            nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, n_classes),
        )

    def forward(self, x):
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """A small CNN for 1×8×8 images (scikit-learn digits): Conv-ReLU-MaxPool, Conv-ReLU, then Linear."""

    def __init__(self, n_classes: int = 10, channels: int = 8):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1), nn.ReLU(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(2 * channels * 16, 32), nn.ReLU(), nn.Linear(32, n_classes))

    def forward(self, x):
        return self.head(self.features(x))
