"""Dense layers of the tower bodies: activation and norm by name, a layer, an MLP."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline.config.model import (
    Activation,
    MLPConfig,
    Norm,
)

ACTIVATIONS: dict[Activation, type[nn.Module]] = {
    Activation.RELU: nn.ReLU,
    Activation.GELU: nn.GELU,
    Activation.TANH: nn.Tanh,
    Activation.LEAKY_RELU: nn.LeakyReLU,
}


def norm_layer(kind: Norm, width: int) -> nn.Module:
    """The norm of ``kind`` over ``width`` features (identity for none)."""
    if kind is Norm.BATCH:
        return nn.BatchNorm1d(width)
    return nn.LayerNorm(width) if kind is Norm.LAYER else nn.Identity()


class DenseLayer(nn.Module):
    """Linear -> norm -> activation -> dropout, plus the input when widths match."""

    def __init__(self, in_dim: int, out_dim: int, cfg: MLPConfig):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(in_dim, out_dim), norm_layer(cfg.norm, out_dim),
                                   ACTIVATIONS[cfg.activation](), nn.Dropout(cfg.dropout))
        self.residual = cfg.residual and in_dim == out_dim

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, out_dim]."""
        y = self.block(x)
        return x + y if self.residual else y


class MLP(nn.Module):
    """Hidden layers of ``MLPConfig``; no hidden layers is the identity.

    With ``gradient_checkpointing`` each layer's activations are recomputed in backward
    (training only) instead of being kept, trading compute for memory.
    """

    def __init__(self, in_dim: int, cfg: MLPConfig):
        super().__init__()
        widths = [in_dim, *cfg.hidden]
        self.layers = nn.ModuleList(DenseLayer(a, b, cfg) for a, b in pairwise(widths))
        self.width = widths[-1]
        self.checkpointing = cfg.gradient_checkpointing

    def output_dim(self) -> int:
        """Width of the last hidden layer (the input width when there is none)."""
        return self.width

    def forward(self, x: Tensor) -> Tensor:
        """[B, in_dim] -> [B, output_dim]."""
        for layer in self.layers:
            if self.checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x)
        return x
