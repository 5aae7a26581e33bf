"""Skipping padding: packed tokens, and row counts rounded to few distinct matmul shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .switch import cpu_path

# Matmuls whose row count changes from batch to batch (packed tokens, the positions where a loss is computed)
# round it up to a multiple of this. Under bf16 autocast on a CPU every new shape makes oneDNN generate and
# cache a kernel: with a few hundred row counts a run filled that cache (1024 kernels, ~3 MB each, 3.4 GB)
# and then slowed ~2x once it began evicting and regenerating them (measured in LLaVA's stage 2).
ROW_MULTIPLE = 64


def round_rows(x: torch.Tensor, multiple: int = ROW_MULTIPLE) -> torch.Tensor:
    """(N, ...) -> (N', ...) with zero rows appended up to a multiple of `multiple`; slice the result back to N.
    On a CPU only: the kernel cache it spares is oneDNN's (x itself elsewhere)."""
    if not cpu_path(x):
        return x
    extra = -x.shape[0] % multiple
    return torch.cat([x, x.new_zeros(extra, *x.shape[1:])]) if extra else x


@dataclass
class Packing:
    """The real tokens of a padded (B, T) batch, packed into N rows: position-wise layers (norms, projections,
    MLPs) then skip the padding, and only attention, which needs the (B, T) layout, unpacks them.

    `index` (N,) holds the flat positions b * T + t of the kept tokens, row by row. A causal model may drop
    every token after the last one it reads (CLIP's text tower after each row's end-of-text token): the
    tokens before it never see them, so the kept tokens' values are the same, with less work.
    """

    batch: int
    length: int
    index: torch.Tensor
    dropped: torch.Tensor  # the other flat positions

    @classmethod
    def from_mask(cls, keep: torch.Tensor, multiple: int = 1) -> "Packing":
        """keep: (B, T) bool, True = a token to compute. `multiple` rounds the count N up by also computing the
        first few dropped positions (harmless where dropping was optional, as after a causal row's last token);
        see `round_rows`."""
        flat = keep.flatten()
        index, dropped = flat.nonzero().flatten(), (~flat).nonzero().flatten()
        extra = min(-len(index) % multiple, len(dropped))
        if extra:
            index, dropped = torch.cat([index, dropped[:extra]]).sort().values, dropped[extra:]
        return cls(keep.shape[0], keep.shape[1], index, dropped)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (N, ...)."""
        return x.flatten(0, 1).index_select(0, self.index)

    def find(self, rows: torch.Tensor) -> torch.Tensor:
        """(B,) a kept position t in each row -> (B,) where those tokens sit among the N packed ones."""
        return torch.searchsorted(self.index, torch.arange(self.batch, device=rows.device) * self.length + rows)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (B, T, ...), zeros at the dropped positions."""
        flat = x.new_empty(self.batch * self.length, *x.shape[1:])  # no zero fill of the kept rows
        # zeros first, while `flat` needs no gradient: the fill then leaves nothing to undo in the backward
        flat.index_fill_(0, self.dropped, 0.0).index_copy_(0, self.index, x)
        return flat.view(self.batch, self.length, *x.shape[1:])
