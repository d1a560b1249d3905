"""A zoo of small piecewise-linear models covering every supported layer (shared by the engine tests)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from relu_regions.models import LeNet, mlp


class BNCNN(nn.Module):
    """Conv + BatchNorm2d + ReLU + AvgPool2d + Dropout + AdaptiveAvgPool + Linear."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AvgPool2d(2), nn.Dropout(0.3),
            nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Dropout(0.2), nn.Linear(24, 5))

    def forward(self, x):
        return self.net(x)


class ResidualNet(nn.Module):
    """Residual blocks with an identity shortcut (x + f(x)) and a projected one."""

    def __init__(self, d=6):
        super().__init__()
        self.inp = nn.Linear(d, 8)
        self.f1 = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
        self.proj = nn.Linear(8, 5, bias=False)
        self.f2 = nn.Sequential(nn.Linear(8, 5), nn.ReLU())
        self.out = nn.Linear(5, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(h + self.f1(h))
        h = self.proj(h) + self.f2(h)
        return self.out(h)


class FunctionalCNN(nn.Module):
    """Activations and pooling written functionally in forward (invisible to module hooks)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 3, 3)
        self.c2 = nn.Conv2d(3, 4, 3)
        self.fc1 = nn.Linear(4 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 10)
        self.fc3 = nn.Linear(10, 4)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.c1(x)), 2)  # 12 -> 10 -> 5
        x = torch.relu(self.c2(x))  # 5 -> 3 ... padded below
        x = F.pad(x, (0, 1, 0, 1)).flatten(1)
        x = self.fc1(x).relu()
        x = torch.clamp(self.fc2(x), min=0)
        return self.fc3(x)


class InplaceMLP(nn.Module):
    def __init__(self, d=5):
        super().__init__()
        self.l1, self.l2, self.l3 = nn.Linear(d, 7), nn.Linear(7, 7), nn.Linear(7, 3)
        self.r1, self.r2 = nn.ReLU(inplace=True), nn.ReLU(inplace=True)

    def forward(self, x):
        return self.l3(self.r2(self.l2(self.r1(self.l1(x)))))


class InplaceResidualStream(nn.Module):
    """A residual stream updated in place after its ReLU read it (``h += block(relu(h))``); ``forward(x, log)``
    appends each ReLU's input (a clone) to ``log`` when given, for independent Jacobians with torch.func."""

    def __init__(self, d_in: int, width: int, n_out: int):
        super().__init__()
        self.stem, self.head = nn.Linear(d_in, width), nn.Linear(width, n_out)
        self.blocks = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])

    def forward(self, x, log=None):
        h = self.stem(x)
        for blk in self.blocks:
            if log is not None:
                log.append(h.clone())
            h += blk(torch.relu(h))
        return self.head(h)


class ReusedModules(nn.Module):
    """One ReLU module and one Linear layer called twice in a forward."""

    def __init__(self, d=5):
        super().__init__()
        self.inp = nn.Linear(d, 6)
        self.shared = nn.Linear(6, 6)
        self.act = nn.ReLU()
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        h = self.act(self.shared(h))
        h = self.act(self.shared(h))
        return self.out(h)


class MixedActivations(nn.Module):
    """LeakyReLU, PReLU, ReLU6 and Hardtanh (three-state units)."""

    def __init__(self, d=5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8), nn.PReLU(8),
                                 nn.Linear(8, 8), nn.ReLU6(), nn.Linear(8, 8), nn.Hardtanh(-0.5, 0.5),
                                 nn.Linear(8, 3))

    def forward(self, x):
        return self.net(3 * x)


class Conv1dNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(2, 4, 3), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(4, 4, 3, padding=1),
                                 nn.LeakyReLU(), nn.Flatten(), nn.Linear(4 * 7, 3))

    def forward(self, x):
        return self.net(x)


class ResNetCNN(nn.Module):
    """A torchvision-style ResNet: BatchNorm, in-place ReLUs, an in-place residual add (``out += identity``), a
    strided 1x1 projection, an overlapping padded max-pool (3, stride 2, padding 1) and global average pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, stride=2, padding=1))
        self.conv1, self.bn1 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.down = nn.Sequential(nn.Conv2d(4, 6, 1, stride=2, bias=False), nn.BatchNorm2d(6))
        self.relu = nn.ReLU(inplace=True)
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(6, 4)

    def forward(self, x):
        x = self.stem(x)
        identity = self.down(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        out = self.relu(out)
        return self.fc(torch.flatten(self.pool(out), 1))


class BranchyCNN(nn.Module):
    """Grouped and depthwise convolutions, a transposed convolution, nearest upsampling, channel concatenation and
    chunks, a pixel shuffle, a ceil-mode max-pool, an adaptive max-pool and a dilated max-pool."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.up = nn.ConvTranspose2d(4, 4, 2, stride=2)
        self.fc = nn.Linear(8 * 3 * 3, 3)

    def forward(self, x):
        h = F.relu(self.c1(x))  # 2x9x9 -> 8x9x9
        a, b = torch.chunk(self.depthwise(h), 2, dim=1)
        h = torch.cat([F.relu(a), F.leaky_relu(b, 0.1)], 1) + self.grouped(h)
        h = F.max_pool2d(h, 2, ceil_mode=True)  # -> 8x5x5
        h = F.pixel_shuffle(h, 2)[:, :, :8, :8]  # -> 2x10x10, cropped to 8x8
        h = F.relu(self.up(F.interpolate(h.repeat(1, 2, 1, 1), scale_factor=0.5, mode="nearest")))  # 4x8x8
        h = F.max_pool2d(h, 3, stride=1, dilation=2)  # -> 4x4x4
        h = F.adaptive_max_pool2d(torch.cat([h, -h], 1), 3)  # -> 8x3x3
        return self.fc(h.flatten(1))


def _prelu_init(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.PReLU):
            with torch.no_grad():
                m.weight.uniform_(0.05, 0.4)
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model


def zoo() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    """name -> (model in eval mode, per-sample input shape)."""
    torch.manual_seed(0)
    models = {
        "mlp1": (mlp(6, [16], 4), (6,)),
        "mlp2": (mlp(6, [16, 12], 4), (6,)),
        "mlp3": (mlp(6, [16, 12, 8], 4), (6,)),
        "flatten_mlp": (nn.Sequential(nn.Flatten(), mlp(12, [10], 4)), (3, 4)),  # image input, MLP body
        "lenet": (LeNet(n_classes=5, image_size=16), (1, 16, 16)),
        "bn_cnn": (BNCNN(), (1, 8, 8)),
        "residual": (ResidualNet(), (6,)),
        "functional": (FunctionalCNN(), (1, 12, 12)),
        "inplace": (InplaceMLP(), (5,)),
        "reused": (ReusedModules(), (5,)),
        "mixed": (MixedActivations(), (5,)),
        "conv1d": (Conv1dNet(), (2, 16)),
        "resnet": (ResNetCNN(), (1, 12, 12)),
        "branchy": (BranchyCNN(), (2, 9, 9)),
    }
    for m, _ in models.values():
        _prelu_init(m).eval()
    return models
