"""Overlapping latent tiles blended with smooth weights that sum to 1 (DESIGN.md section 5).

Every sampler step computes each tile's velocity on the current full-size latent and blends them,
so all tiles share one noise tensor and one trajectory: no seams, and one tile that covers the
image gives exactly the untiled result.
"""

from __future__ import annotations

import torch


def tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets covering [0, size) with tiles of `tile`, neighbours overlapping by >= `overlap`.

    align > 1 (a model's token size): every start is rounded down to a multiple of it, so overlapping tiles share
    one token grid (a pixel is the same part of a token in every tile). An overlap may then be up to align - 1
    short (the blend weights still sum to 1), and the last tile runs on to `size`, up to align - 1 longer.
    """
    if tile >= size:
        return [0]
    stride = max(tile - overlap, 1)
    n = -(-(size - tile) // stride) + 1  # ceil: enough tiles to reach the end
    # spread the tiles evenly so every overlap is at least `overlap` (no thin slivers at the border)
    starts = [i * (size - tile) / (n - 1) for i in range(n)]
    if align == 1:
        return [round(x) for x in starts]
    return sorted({align * int(x // align) for x in starts})  # a stride below `align` would repeat a start


def ramp(length: int, tile: int, at_start: bool, at_end: bool, overlap: int) -> torch.Tensor:
    """1-D weight: a raised-cosine ramp over `overlap` pixels on inner edges, flat elsewhere.

    The ramp starts at exactly 0 on the tile's inner edge, where the model sees the tile border instead
    of the neighbouring content, so that pixel comes wholly from the neighbour (which covers it with
    weight 1 as tiles overlap by >= `overlap`): a model with a 3x3 receptive field tiles exactly.
    """
    w = torch.ones(tile, dtype=torch.float64)
    if overlap > 1:
        r = 0.5 - 0.5 * torch.cos(torch.pi * torch.arange(overlap, dtype=torch.float64) / (overlap - 1))
        if not at_start:
            w[:overlap] = r
        if not at_end:
            w[-overlap:] = torch.minimum(w[-overlap:], r.flip(0))
    return w[:length]


class TiledVelocity:
    """Wraps `model(z, t_cur, z_lq, t_tar)` to run on overlapping tiles of the latent.

    tile/overlap are in latent pixels; `batch` tiles of one shape are evaluated per forward pass; tile starts are
    multiples of `align` (the model's token size).
    """

    def __init__(self, model, tile: int, overlap: int, batch: int = 1, align: int = 1):
        if overlap >= tile:
            raise ValueError(f"tile overlap ({overlap}) must be smaller than the tile ({tile})")
        self.model, self.tile, self.overlap, self.batch, self.align = model, tile, overlap, batch, align
        self._cache: dict = {}

    def grid(self, H: int, W: int):
        """[(y, x, h, w)] tiles and the per-pixel normaliser; cached per latent size."""
        if (H, W) not in self._cache:
            th, tw = min(self.tile, H), min(self.tile, W)
            ys, xs = tile_starts(H, th, self.overlap, self.align), tile_starts(W, tw, self.overlap, self.align)
            ov_y = min(self.overlap, th // 2) if len(ys) > 1 else 0
            ov_x = min(self.overlap, tw // 2) if len(xs) > 1 else 0
            tiles, weights = [], []
            for i, y in enumerate(ys):
                h = H - y if i == len(ys) - 1 else th  # an aligned last tile runs on to the border
                wy = ramp(h, h, i == 0, i == len(ys) - 1, ov_y)
                for j, x in enumerate(xs):
                    w = W - x if j == len(xs) - 1 else tw
                    wx = ramp(w, w, j == 0, j == len(xs) - 1, ov_x)
                    tiles.append((y, x, h, w))
                    weights.append(wy[:, None] * wx[None, :])
            total = torch.zeros(H, W, dtype=torch.float64)
            for (y, x, h, w), wt in zip(tiles, weights):
                total[y : y + h, x : x + w] += wt
            # normalise each tile's weight by the sum over tiles: the blend weights sum to exactly 1
            norm = [(wt / total[y : y + h, x : x + w]).float() for (y, x, h, w), wt in zip(tiles, weights)]
            self._cache[(H, W)] = (tiles, norm)
        return self._cache[(H, W)]

    def __call__(self, z, t_cur, z_lq, t_tar):
        B, C, H, W = z.shape
        tiles, norm = self.grid(H, W)
        if len(tiles) == 1:
            return self.model(z, t_cur, z_lq, t_tar)
        out = None
        shapes: dict = {}  # tiles of one shape go through the model together
        for k, (y, x, h, w) in enumerate(tiles):
            shapes.setdefault((h, w), []).append(k)
        for ks in shapes.values():
            for i in range(0, len(ks), self.batch):
                chunk = ks[i : i + self.batch]
                zt = torch.cat([z[:, :, y : y + h, x : x + w] for y, x, h, w in (tiles[k] for k in chunk)])
                zl = torch.cat([z_lq[:, :, y : y + h, x : x + w] for y, x, h, w in (tiles[k] for k in chunk)])
                v = self.model(zt, t_cur, zl, t_tar)
                if out is None:
                    out = torch.zeros(B, v.shape[1], H, W, dtype=v.dtype, device=v.device)
                for n, k in enumerate(chunk):
                    y, x, h, w = tiles[k]
                    out[:, :, y : y + h, x : x + w] += v[n * B : (n + 1) * B] * norm[k].to(v.device, v.dtype)
        return out
