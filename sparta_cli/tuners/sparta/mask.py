"""Which entries of a weight matrix are trainable: pure functions of (seed, module name, shape).

The choice must not depend on the device, the world size or the order modules are
visited in, so it is drawn on CPU from a generator seeded by the seed and the
module's name alone.
"""

from __future__ import annotations

import hashlib

import torch

INT32_LIMIT = 2**31


def num_selected(numel: int, density: float) -> int:
    """Exactly k = round(density * numel) entries (Python's round: half to even)."""
    return int(round(density * numel))


def mask_seed(seed: int, module_name: str) -> int:
    """A 63-bit seed that mixes the run seed with the module name (stable across Python runs)."""
    digest = hashlib.sha256(f"{seed}:{module_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def indices_digest(indices: torch.Tensor) -> str:
    """sha256 of a mask's flat indices as int64: checkpoints record it, resume compares it."""
    return hashlib.sha256(indices.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < INT32_LIMIT else torch.int64


def select_indices(numel: int, density: float, seed: int, module_name: str) -> torch.Tensor:
    """k distinct flat indices in [0, numel), uniformly at random, sorted, on CPU.

    `randperm(...)[:k]` is an exact uniform k-subset; for very large matrices where
    a full permutation would be costly and k is small, a rejection loop over
    random draws gives the same distribution with O(k) memory.
    """
    k = num_selected(numel, density)
    generator = torch.Generator(device="cpu").manual_seed(mask_seed(seed, module_name))
    if k == 0:
        chosen = torch.empty(0, dtype=torch.int64)
    elif k * 8 >= numel or numel < 2**24:
        chosen = torch.randperm(numel, generator=generator)[:k]
    else:
        chosen = _sample_without_replacement(numel, k, generator)
    return chosen.sort().values.to(index_dtype(numel))


def _sample_without_replacement(numel: int, k: int, generator: torch.Generator) -> torch.Tensor:
    chosen = torch.empty(0, dtype=torch.int64)
    while chosen.numel() < k:
        draws = torch.randint(numel, (2 * (k - chosen.numel()) + 16,), generator=generator)
        merged = torch.cat([chosen, draws])
        # keep first occurrences in draw order, so the result is a uniform subset
        unique, inverse = torch.unique(merged, return_inverse=True)
        first = torch.full((unique.numel(),), merged.numel(), dtype=torch.int64)
        first.scatter_reduce_(0, inverse, torch.arange(merged.numel()), reduce="amin")
        chosen = merged[first.sort().values][:k]
    return chosen
