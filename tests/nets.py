"""Small test models whose cuts carry several tensors and non-tensor values."""

import torch
import torch.nn.functional as F
from torch import nn


def _block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class SkipNet(nn.Module):
    """Four resolution levels; the classifier reads stage 1's output too (a two-tensor cut)
    and the batch size taken from the input in stage 0 (an int crossing three cuts)."""

    def __init__(self, num_classes: int = 10, width: int = 8):
        super().__init__()
        self.stem = _block(3, width, 1)
        self.downs = nn.ModuleList(_block(width, width, 2) for _ in range(3))
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x):
        n = x.size(0)
        b = self.downs[0](self.stem(x))
        d = self.downs[2](self.downs[1](b))
        features = torch.cat([F.adaptive_avg_pool2d(b, 1).flatten(1), d.mean((2, 3))], 1)
        return self.fc(features.reshape(n, -1))
