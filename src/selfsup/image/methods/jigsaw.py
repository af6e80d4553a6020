"""Jigsaw puzzles (Noroozi & Favaro, 2016): which permutation shuffled an image's tiles?

Each image (after the run's augmentation recipe) is cut into a `--jigsaw-grid` × grid of
cells, and every tile is a random crop of its cell, `--jigsaw-jitter` pixels smaller than the
cell, so that neighbouring tiles are separated by random gaps and their edges do not give the
order away (the paper: 64-pixel tiles in 75-pixel cells). Pixels left over when the image side
is not a multiple of the grid move the whole grid at random (the paper's 225-pixel crop of a
256-pixel image). The tiles are shuffled by one of `--jigsaw-permutations` fixed permutations,
chosen greedily for a large minimum Hamming distance from the run's seed (`permutation_set`
recomputes them; the checkpoint holds them too). Every tile is normalised on its own to zero
mean and unit standard deviation per channel (the paper's guard against shortcuts through
low-level statistics such as a brightness gradient across the image), then the shared encoder
encodes every tile on its own; the tile features, concatenated in shuffled order, go to an MLP
(hidden size `--projection-hidden`) that classifies the permutation.

The encoder learns on tiles (a third of the image side for a 3×3 grid) and is evaluated on whole
images; its global average pool makes that possible, at the price of a change of scale.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch import Tensor

from selfsup.core.config import option
from selfsup.core.errors import SelfsupError
from selfsup.image import draw
from selfsup.image.config import PretrainConfig
from selfsup.image.data.transforms import unit_float
from selfsup.image.methods.base import Method
from selfsup.image.models import ProjectionHead


@dataclass
class Options:
    """Jigsaw's own options: the tile grid, the gaps between tiles, the permutation set."""

    jigsaw_grid: int = option(3, "tiles per side (3: a 3×3 puzzle)")
    jigsaw_jitter: int | None = option(
        None,
        "a tile is this many pixels smaller than its cell (default: 0.15 of the cell)",
    )
    jigsaw_permutations: int = option(
        100,
        "size of the permutation set (greedy maximal minimum Hamming distance)",
    )
    projection_hidden: int = option(
        512, "hidden size of the MLP that names the permutation", check=">=1"
    )


TILE_STD_FLOOR = 1 / 255  # one grey level: flat tiles are centred, not blown up to unit std
MIN_TILE = 4  # pixels a side: smaller tiles carry too little to place them
MAX_PERMUTATIONS = 1000  # the greedy search costs count × candidates; the paper's largest set
CANDIDATES = math.factorial(9)  # every permutation up to 3×3; a random pool this large beyond


def permutation_set(tiles: int, count: int, seed: int) -> Tensor:
    """`count` permutations of range(tiles) (int64 count×tiles) with a large minimum Hamming
    distance between any two: a seeded random first one, then greedily the candidate farthest
    from its nearest chosen one (ties to the lowest index), as in Noroozi & Favaro's
    Algorithm 1 with the minimum for the mean. Candidates: all tiles! permutations up to 3×3,
    a seeded random pool of 9! beyond."""
    g = torch.Generator().manual_seed(seed)
    if math.factorial(tiles) <= CANDIDATES:
        candidates = np.array(list(itertools.permutations(range(tiles))), dtype=np.int8)
    else:
        candidates = torch.rand(CANDIDATES, tiles, generator=g).argsort(dim=1).numpy()
    # Column by column (positions × candidates): one greedy step over 9! candidates takes
    # about a millisecond this way, against tens for a row-wise comparison.
    columns = np.ascontiguousarray(candidates.T, dtype=np.int8)

    def distances(j: int) -> np.ndarray:
        d = np.zeros(len(candidates), dtype=np.int8)
        for position, column in enumerate(columns):
            d += column != columns[position, j]
        return d

    chosen = [int(torch.randint(len(candidates), (1,), generator=g))]
    nearest = distances(chosen[0])
    for _ in range(count - 1):
        chosen.append(int(nearest.argmax()))  # argmax returns the first of equal maxima
        np.minimum(nearest, distances(chosen[-1]), out=nearest)
    return torch.from_numpy(candidates[chosen].astype(np.int64))


def hamming_distances(permutations: Tensor) -> Tensor:
    """Pairwise Hamming distances (positions that differ) of P×T permutations: P×P."""
    return (permutations[:, None] != permutations[None]).sum(dim=-1)


def tile_layout(
    image_size: tuple[int, int] | list[int], grid: int, jitter: int | None
) -> tuple[tuple[int, int], int]:
    """((cell height, cell width), jitter) for a grid × grid puzzle, checking the options.
    The default jitter is 15% of the cell side (at least 1 pixel), the paper's 11 of 75."""
    h, w = image_size
    if grid < 2:
        raise SelfsupError(f"--jigsaw-grid must be at least 2, got {grid}")
    cell = (h // grid, w // grid)
    jitter = max(1, round(0.15 * min(cell))) if jitter is None else jitter
    if jitter < 0:
        raise SelfsupError(f"--jigsaw-jitter is in pixels and must be >= 0, got {jitter}")
    if min(cell) - jitter < MIN_TILE:
        raise SelfsupError(
            f"--jigsaw-grid {grid} cuts {h}×{w} images into {cell[0]}×{cell[1]}-pixel cells, "
            f"{min(cell) - jitter}-pixel tiles after --jigsaw-jitter {jitter}; tiles need at "
            f"least {MIN_TILE} pixels: lower --jigsaw-grid or --jigsaw-jitter, or use larger images"
        )
    return cell, jitter


def check_permutation_count(grid: int, count: int) -> None:
    """At least 2 permutations, at most all grid²! of them and at most MAX_PERMUTATIONS."""
    possible = math.factorial(grid * grid)
    limit = min(possible, MAX_PERMUTATIONS)
    if not 2 <= count <= limit:
        why = (
            f"a {grid}×{grid} grid has only {possible} orders"
            if possible <= MAX_PERMUTATIONS
            else f"the greedy selection stops at {MAX_PERMUTATIONS}"
        )
        raise SelfsupError(
            f"--jigsaw-permutations must be between 2 and {limit}, got {count} ({why})"
        )


def cut_tiles(
    x: Tensor, grid: int, cell: tuple[int, int], jitter: int, g: torch.Generator
) -> Tensor:
    """B×C×H×W -> B×(grid²)×C×(cell_h - jitter)×(cell_w - jitter), tiles in row-major cell
    order. Each image's grid moves by a random offset within the leftover pixels, each tile by
    a random offset within its cell (all drawn from g)."""
    b, _, h, w = x.shape
    tiles = grid * grid
    size = (cell[0] - jitter, cell[1] - jitter)
    spare = torch.tensor([h - grid * cell[0], w - grid * cell[1]], device=x.device)
    shift = (torch.rand(b, 1, 2, generator=g, device=x.device) * (spare + 1)).long()
    offset = torch.randint(0, jitter + 1, (b, tiles, 2), generator=g, device=x.device)
    k = torch.arange(tiles, device=x.device)
    corner = torch.stack([k // grid * cell[0], k % grid * cell[1]], dim=-1)
    top_left = shift + corner + offset  # B×T×2
    rows = top_left[..., 0, None] + torch.arange(size[0], device=x.device)  # B×T×th
    cols = top_left[..., 1, None] + torch.arange(size[1], device=x.device)  # B×T×tw
    batch = torch.arange(b, device=x.device).view(b, 1, 1, 1)
    picked = x[batch, :, rows[..., :, None], cols[..., None, :]]  # B×T×th×tw×C
    return picked.permute(0, 1, 4, 2, 3)


def shuffle_tiles(tiles: Tensor, permutations: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(shuffled tiles, labels B): position i of image b holds its tile
    permutations[labels[b], i]; the labels are uniform over the set."""
    labels = torch.randint(0, len(permutations), (len(tiles),), generator=g, device=tiles.device)
    order = permutations.to(tiles.device)[labels]
    return tiles[torch.arange(len(tiles), device=tiles.device)[:, None], order], labels


def solve_tiles(shuffled: Tensor, order: Tensor) -> Tensor:
    """Undo `shuffle_tiles` with each image's permutation (B×T): tiles back in cell order."""
    return shuffled[torch.arange(len(shuffled), device=shuffled.device)[:, None], order.argsort(1)]


def normalize_tiles(tiles: Tensor, floor: float = TILE_STD_FLOOR) -> Tensor:
    """Each tile and channel of ...×C×h×w tiles at zero mean and unit (population) standard
    deviation, the deviation floored at `floor`; invariant to a tile's brightness and contrast."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), correction=0, keepdim=True).clamp_min(floor)
    return (tiles - mean) / std


def mosaic(tiles: Tensor, grid: int, gap: int = 1) -> Tensor:
    """T×C×h×w tiles -> one C×H×W picture, grid × grid, with white gaps between tiles."""
    _, c, h, w = tiles.shape
    out = tiles.new_ones(c, grid * h + (grid - 1) * gap, grid * w + (grid - 1) * gap)
    for k, tile in enumerate(tiles):
        r, col = divmod(k, grid)
        out[:, r * (h + gap) : r * (h + gap) + h, col * (w + gap) : col * (w + gap) + w] = tile
    return out


class Jigsaw(Method):
    Options = Options

    def __init__(
        self, config: PretrainConfig, data_info: dict[str, Any], options: Options | None = None
    ) -> None:
        options = options if options is not None else Options()
        size = data_info["dataset"]["image_size"]
        self.grid = options.jigsaw_grid
        self.cell, self.jitter = tile_layout(size, self.grid, options.jigsaw_jitter)
        check_permutation_count(self.grid, options.jigsaw_permutations)
        super().__init__(config, data_info, options)
        permutations = permutation_set(self.grid**2, options.jigsaw_permutations, config.seed)
        self.register_buffer("permutations", permutations)
        self.classifier = ProjectionHead(
            self.grid**2 * self.encoder.feature_dim,
            options.projection_hidden,
            options.jigsaw_permutations,
        )

    def puzzle(self, x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """(shuffled tiles B×T×C×h×w, permutation labels B) of float [0, 1] images."""
        tiles = cut_tiles(x, self.grid, self.cell, self.jitter, g)
        return shuffle_tiles(tiles, self.permutations, g)

    def classify(self, shuffled: Tensor) -> tuple[Tensor, Tensor]:
        """(permutation logits B×P, tile features B×T×D) of shuffled [0, 1] tiles, each tile
        normalised on its own (`normalize_tiles`) before the encoder."""
        b, t = shuffled.shape[:2]
        # Mapped through the inverse of the encoder's dataset normalisation, so that its
        # backbone sees exactly zero-mean, unit-std tiles.
        tiles = normalize_tiles(shuffled.flatten(0, 1).float())
        features = self.encoder(tiles * self.encoder.std + self.encoder.mean).view(b, t, -1)
        return self.classifier(features.flatten(1)).float(), features

    def pretext_loss(self, x: Tensor, y: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
        """The online probe sees the mean of the tile features (a monitor: no extra pass)."""
        shuffled, labels = self.puzzle(self.views(x, g), g)
        logits, features = self.classify(shuffled)
        self.log("train/jigsaw_acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True)
        return F.cross_entropy(logits, labels), features.mean(dim=1)

    def save_samples(self, x: Tensor, path: Path) -> None:
        """Rows: the shuffled tiles, the tiles put back by the predicted permutation (titled
        right in green, wrong in red) and the tiles in their true places."""
        g = torch.Generator(device=x.device).manual_seed(self.config.seed)
        shuffled, labels = self.puzzle(unit_float(x), g)
        with torch.no_grad():
            predicted = self.classify(shuffled)[0].argmax(1)
        rows = [
            shuffled,
            solve_tiles(shuffled, self.permutations[predicted]),
            solve_tiles(shuffled, self.permutations[labels]),
        ]
        fig = Figure(figsize=(1.4 * len(x), 1.7 * len(rows) + 0.3), layout="constrained")
        fig.suptitle("shuffled / put back by the predicted permutation / true order", fontsize=9)
        axes = np.asarray(fig.subplots(len(rows), len(x), squeeze=False))
        for r, tiles in enumerate(rows):
            for i in range(len(x)):
                draw.show(axes[r, i], mosaic(tiles[i].cpu(), self.grid))
        for i in range(len(x)):
            right = bool(predicted[i] == labels[i])
            axes[1, i].set_title(
                "right" if right else "wrong", fontsize=9, color="green" if right else "red"
            )
        draw.save(fig, path)
