"""Small convolutional classifiers for K-FAC's convolution layers (KFC, Grosse & Martens 2016).

Both take the lab's flattened digits ``(n, side²)`` (an ``nn.Unflatten`` makes the image) and
return 10 logits (the categorical loss applies the softmax):

* :func:`mnist_cnn` — 28×28 digits: conv 1→8 5×5 stride 2 + ReLU, conv 8→16 3×3 stride 2 +
  ReLU, Linear 400→10 (5,386 parameters): seconds per K-FAC step at batch 1,000 on a laptop CPU.
* :func:`figure1_cnn` — 16×16 digits (as figures 1–2): conv 1→6 5×5 stride 2 pad 2 + tanh, conv
  6→12 3×3 stride 2 pad 1 + tanh, Linear 192→10 (2,746 parameters): its exact Fisher (30 MB in
  float32) fits in memory for the Fisher studies.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["mnist_cnn", "figure1_cnn", "MNIST_CNN_PARAMS", "FIGURE1_CNN_PARAMS"]

MNIST_CNN_PARAMS = 5386
FIGURE1_CNN_PARAMS = 2746


def mnist_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The ``mnist-cnn`` classifier on 28×28 digits (module doc)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Unflatten(1, (1, 28, 28)),
            nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(),      # 28 -> 12
            nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),     # 12 -> 5
            nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
        ).to(dtype)
    model.kfac_loss, model.kfac_name = "categorical", "mnist-cnn"
    return model


def figure1_cnn(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """The ``fig1-cnn`` classifier on 16×16 digits (module doc)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = nn.Sequential(
            nn.Unflatten(1, (1, 16, 16)),
            nn.Conv2d(1, 6, 5, stride=2, padding=2), nn.Tanh(),   # 16 -> 8
            nn.Conv2d(6, 12, 3, stride=2, padding=1), nn.Tanh(),  # 8 -> 4
            nn.Flatten(), nn.Linear(12 * 4 * 4, 10),
        ).to(dtype)
    model.kfac_loss, model.kfac_name = "categorical", "fig1-cnn"
    return model
