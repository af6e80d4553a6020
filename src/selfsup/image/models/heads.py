"""Projection heads."""

from torch import nn


class ProjectionHead(nn.Sequential):
    """SimCLR MLP head: (Linear-BN-ReLU) × (num_layers - 1), then a final Linear."""

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 128, num_layers: int = 2
    ) -> None:
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layers: list[nn.Module] = []
        for _ in range(num_layers - 1):
            layers += [nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim)]
            layers.append(nn.ReLU(True))
            in_dim = hidden_dim
        super().__init__(*layers, nn.Linear(in_dim, out_dim))
