"""Which (query tile, key tile) pairs to compute, decided from the region labels.

A tile's label set is the set of hard labels of its tokens. A tile pair is

- skipped when no (label(q), label(k)) pair across the two sets is allowed: its
  keys and values are never loaded;
- *full* when every pair across the two sets is allowed and the key tile has no
  padding: it runs with no mask at all;
- *partial* otherwise: it runs with the element-wise allow mask.

The lists are compacted per query tile (like FlexAttention's BlockMask), so a
kernel loops over exactly the tiles it must visit. Both the Triton kernels and
the chunked torch backend read the same lists.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class TileSparsity(NamedTuple):
    partial_count: torch.Tensor  # (B or 1, QT) int32
    partial_index: torch.Tensor  # (B or 1, QT, KT) int32, the first partial_count entries valid
    full_count: torch.Tensor
    full_index: torch.Tensor

    def active_tiles(self, batch: int, q_tile: int) -> torch.Tensor:
        """Key tiles visited by one query tile, partial then full, as an index tensor."""
        b = min(batch, self.partial_count.shape[0] - 1)
        partial = self.partial_index[b, q_tile, : int(self.partial_count[b, q_tile])]
        full = self.full_index[b, q_tile, : int(self.full_count[b, q_tile])]
        return torch.cat([partial, full])


def tile_presence(labels: torch.Tensor, block: int, num_regions: int) -> torch.Tensor:
    """(B, T, R) float: 1 where region r occurs in tile t (padding occurs nowhere)."""
    batch, tokens = labels.shape
    tiles = -(-tokens // block)
    onehot = F.one_hot(labels.long(), num_regions).float()
    onehot = F.pad(onehot, (0, 0, 0, tiles * block - tokens))
    return onehot.view(batch, tiles, block, num_regions).amax(2)


def compact(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(count, index) per row of a boolean mask: the True positions first, in order."""
    count = mask.sum(-1, dtype=torch.int32)
    index = torch.sort((~mask).to(torch.uint8), dim=-1, stable=True).indices.to(torch.int32)
    return count.contiguous(), index.contiguous()


def tile_sparsity(q_labels: torch.Tensor, k_labels: torch.Tensor, allow: torch.Tensor | None,
                  num_regions: int, block_m: int, block_n: int) -> TileSparsity:
    """Partial and full key-tile lists for every query tile.

    Args:
        q_labels, k_labels: (B or 1, N) hard labels.
        allow: (B or 1, R, R) bool, or None for all pairs allowed.
    """
    pq = tile_presence(q_labels, block_m, num_regions)
    pk = tile_presence(k_labels, block_n, num_regions)
    batch = max(pq.shape[0], pk.shape[0], 1 if allow is None else allow.shape[0])
    if allow is None:
        active = torch.ones(batch, pq.shape[1], pk.shape[1], dtype=torch.bool, device=pq.device)
        full = active.clone()
    else:
        allowed_pairs = pq @ allow.float() @ pk.transpose(-1, -2)
        present_pairs = pq.sum(-1)[..., :, None] * pk.sum(-1)[..., None, :]
        active = (allowed_pairs > 0).expand(batch, -1, -1)
        full = (allowed_pairs == present_pairs).expand(batch, -1, -1).clone()
    if k_labels.shape[1] % block_n:
        full[..., -1] = False
    return TileSparsity(*compact(active & ~full), *compact(full))
