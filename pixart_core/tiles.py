"""Sampling beyond the trained sizes in overlapping tiles (MultiDiffusion, Bar-Tal et al. 2023).

MultiDiffusion fuses the denoising paths of overlapping crops by solving, at each step, a least-squares problem
whose closed form is the per-pixel weighted average of the crops' predictions: Φ(J) = Σ_i F_i⁻¹(W_i ⊗ Ψ(I_i)) /
Σ_j F_j⁻¹(W_j) (the paper's eq. 5; diffusers' StableDiffusionPanoramaPipeline uses W_i = 1, a count-based average).
Here each tile's W_i is a linear ramp across the overlaps it shares with its neighbours (1 inside, falling to
0.5/overlap at the shared edge, 1 up to the canvas border), so seams blend smoothly; after normalisation the weights
sum to 1 at every latent pixel. The average is taken on the model output (epsilon): every scheduler here steps
linearly in it, so averaging predictions equals averaging the crops' denoised latents, as the paper does.

`TiledDiT` wraps a PixArt DiT so that the guided prediction (pixart_core.guidance) calls it as it calls the DiT and
the sampling loop (pixart_core.sampling) runs unchanged: one forward of the wrapper runs the DiT once per tile (the
whole CFG batch at once), so memory is one tile's. pixart_core.hires.tiling lays the tiles out for a canvas. A DiT
with ControlNets applied (pixart_core.controlnet.ControlledDiT) runs each tile with its hints cropped to that tile.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

from .controlnet import ControlledDiT
from .dit_view import DiTView


@dataclasses.dataclass(frozen=True)
class Tile:
    """A crop of the latent canvas (latent pixels) and its normalised blend weight [h, w]."""

    y: int
    x: int
    h: int
    w: int
    weight: torch.Tensor


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Evenly spread tile starts covering 0..length with neighbours overlapping by at least `overlap`."""
    if tile >= length:
        return [0]
    if not 0 <= overlap < tile:
        raise ValueError(f"Tile overlap {overlap} must be at least 0 and smaller than the tile ({tile}).")
    n = math.ceil((length - overlap) / (tile - overlap))
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def ramp(tile: int, left: int, right: int) -> torch.Tensor:
    """1-D weight of a tile: 1, falling linearly to 0.5/left (0.5/right) across an overlap of `left` (`right`)
    latent pixels shared with the previous (next) tile; 0 means no neighbour on that side."""
    p = torch.arange(tile, dtype=torch.float64) + 0.5
    w = torch.ones(tile, dtype=torch.float64)
    if left > 0:
        w = torch.minimum(w, p / left)
    if right > 0:
        w = torch.minimum(w, (tile - p) / right)
    return w


def _axis(length: int, tile: int, overlap: int) -> list[tuple[int, int, torch.Tensor]]:
    tile = min(tile, length)
    s = starts(length, tile, overlap)
    out = []
    for i, a in enumerate(s):
        left = s[i - 1] + tile - a if i > 0 else 0
        right = a + tile - s[i + 1] if i + 1 < len(s) else 0
        out.append((a, tile, ramp(tile, left, right)))
    return out


def layout(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> list[Tile]:
    """The tiles over a latent canvas (all sizes in latent pixels), row by row, with weights that sum to 1."""
    for label, v in (("height", height), ("width", width), ("tile height", tile_h), ("tile width", tile_w)):
        if v <= 0:
            raise ValueError(f"Tiled sampling: {label} {v} must be positive.")
    rows, cols = _axis(height, tile_h, overlap), _axis(width, tile_w, overlap)
    raw = [(y, x, h, w, wy[:, None] * wx[None, :]) for y, h, wy in rows for x, w, wx in cols]
    total = torch.zeros(height, width, dtype=torch.float64)
    for y, x, h, w, wt in raw:
        total[y:y + h, x:x + w] += wt
    # Every pixel is covered by construction (starts reach both ends), so total > 0 everywhere.
    return [Tile(y, x, h, w, (wt / total[y:y + h, x:x + w]).float()) for y, x, h, w, wt in raw]


class TiledDiT(DiTView):
    """A PixArt DiT that denoises a latent canvas larger than its trained size in overlapping tiles.

    Looks like the DiT to the sampling loop (`config`, `parameters()`, `use_additional_conditions`, the same forward
    signature and output); each forward runs the DiT once per tile with the whole batch (CFG included) and blends
    the outputs with the tiles' weights. With micro-conditioning (PixArt-α 1024-MS) each tile gets its own size as
    the resolution/aspect-ratio condition, as the model saw whole images of that size in training.
    `on_tile(done, tiles)` is called after each tile (progress, cancel).
    """

    def __init__(self, dit: torch.nn.Module, tiles: list[Tile], canvas: tuple[int, int],
                 on_tile: Callable[[int, int], None] | None = None):
        super().__init__(dit)
        self.tiles = tiles
        self.canvas = canvas
        self.on_tile = on_tile

    def at_step(self, step: int, steps: int) -> TiledDiT:
        """The same tiles over the DiT's form for step `step` of `steps` (its ControlNets act on part of the
        schedule: pixart_core.guidance.model_at)."""
        if not isinstance(self.dit, ControlledDiT):
            return self
        return TiledDiT(self.dit.at_step(step, steps), self.tiles, self.canvas, self.on_tile)

    def forward(self, hidden_states: torch.Tensor, *args, added_cond_kwargs: dict | None = None,
                return_dict: bool = False, **kwargs) -> tuple[torch.Tensor]:
        """[N, 4, H, W] canvas -> ([N, C, H, W] blended prediction, in fp32 when tiled,); return_dict is ignored."""
        if tuple(hidden_states.shape[-2:]) != self.canvas:
            raise ValueError(f"Tiled DiT laid out for a {self.canvas} latent got {tuple(hidden_states.shape[-2:])}.")
        out = pred = None
        for i, t in enumerate(self.tiles):
            crop = hidden_states[..., t.y:t.y + t.h, t.x:t.x + t.w]  # [N, 4, h, w]
            added = added_cond_kwargs
            if added is not None and added.get("resolution") is not None:
                ref = added["resolution"]
                n = ref.shape[0]
                added = {"resolution": ref.new_tensor([[t.h * 8, t.w * 8]]).repeat(n, 1),
                         "aspect_ratio": ref.new_tensor([[t.h / t.w]]).repeat(n, 1)}
            dit = self.dit.crop(t.y, t.x, t.h, t.w) if isinstance(self.dit, ControlledDiT) else self.dit
            pred = dit(crop, *args, added_cond_kwargs=added, return_dict=False, **kwargs)[0]  # [N, C, h, w]
            if out is None:
                out = pred.new_zeros((*pred.shape[:2], *self.canvas), dtype=torch.float32)
            out[..., t.y:t.y + t.h, t.x:t.x + t.w] += pred.float() * t.weight.to(pred.device)
            if self.on_tile is not None:
                self.on_tile(i + 1, len(self.tiles))
        # One tile covers the canvas with weight 1: its prediction as is (the untiled forward, bit for bit).
        return (pred if len(self.tiles) == 1 else out,)
