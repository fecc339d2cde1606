"""SpaRTA's adapter file checks, passed before any of it is used (eval, merge, export, resume).

A pure function over what was read from disk: negative indices would wrap around, an index past
the matrix would write elsewhere, NaN deltas would score and merge, so each is refused with one
line naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparta_cli.adapter_checks import damaged
from sparta_cli.tuners.base import check_trained
from sparta_cli.tuners.sparta.mask import num_selected

DELTA_SUFFIXES = (".indices", ".delta")  # `<module>.indices` and `<module>.delta`, beside `trained.<name>`


def check_adapter_tensors(tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
    """Indices strictly increasing (so unique), inside their matrix; one finite value per index;
    the modules, their sizes and the density the config declares; the trained tensors finite."""
    check_trained(tensors, path, DELTA_SUFFIXES)
    shapes = {name: tuple(shape) for name, shape in (config.get("target_shapes") or {}).items()}
    modules = {key.removesuffix(".indices") for key in tensors if key.endswith(".indices")}
    for key in tensors:
        if key.endswith(".delta") and key.removesuffix(".delta") not in modules:
            raise damaged(path, f"`{key}` has no indices")
    if sorted(modules) != sorted(shapes):
        extra = sorted(set(modules) - set(shapes)) or sorted(set(shapes) - set(modules))
        raise damaged(path, f"the tensors and adapter_config.json's target_shapes name different modules (e.g. `{extra[0]}`)")
    density = config.get("density")  # recorded for SpaRTA runs only (null for the other methods)
    for module in sorted(modules):
        indices, delta = tensors[f"{module}.indices"], tensors.get(f"{module}.delta")
        numel = shapes[module][0] * shapes[module][1]
        if indices.dim() != 1 or indices.dtype not in (torch.int32, torch.int64):
            raise damaged(path, f"`{module}.indices` is not a flat integer tensor")
        if delta is None or delta.dim() != 1 or delta.numel() != indices.numel() or not delta.is_floating_point():
            raise damaged(path, f"`{module}` needs one floating delta per index ({indices.numel()} indices)")
        if indices.numel():
            flat = indices.long()
            if int(flat[0]) < 0 or int(flat[-1]) >= numel or (flat.numel() > 1 and not bool((flat[1:] > flat[:-1]).all())):
                raise damaged(path, f"`{module}.indices` must be strictly increasing within [0, {numel}) for its {list(shapes[module])} "
                                    f"matrix (negative, out of range, repeated or unsorted entries)")
        if not bool(torch.isfinite(delta).all()):
            raise damaged(path, f"`{module}.delta` holds inf or NaN")
        if density is not None and indices.numel() != num_selected(numel, density):
            raise damaged(path, f"`{module}` has {indices.numel()} entries but density {density} of {numel} is "
                                f"{num_selected(numel, density)}")
