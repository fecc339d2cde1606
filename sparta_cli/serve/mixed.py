"""One forward over the inputs of several SpaRTA adapters: the base weights stay in place (W0) and
forward hooks give each row its own adapter, y = W0·x + ΔW_a·x, and its own head.

Why: writing an adapter into the weights (`swap.SparseSwap`) serves one adapter per forward, so with
many adapters and few requests each, batches hold one input. Here the rows of a batch are grouped
by adapter (contiguous spans); each targeted linear adds, per span, its sparse delta times the
span's inputs (one CSR x dense product: k multiply-adds per token, against the dense matmul's
rows x columns), and each head module recomputes the span's rows with the span's own head tensors.
Measured on MiniLM (density 0.05 on v,o, 8 adapters x 1 input of 12 tokens, one CPU thread): the
hooks add about 10% to the base's forward, where a gather / multiply / scatter_add over padded
(rows x k) indices doubled it (the CSR product of one 384 x 384 target at 96 tokens: 0.15 ms, the
gather path 4.3 ms, the dense matmul 0.44 ms).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from sparta_cli.serve.swap import BaseParameters, SparseSwap


@dataclass(frozen=True)
class Span:
    """Rows start:stop of a batch, all of one adapter."""

    swap: SparseSwap
    start: int
    stop: int


def add_sparse_deltas(output: torch.Tensor, x: torch.Tensor, parts: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    """`output` (the base linear's W0·x + b) plus, for each (delta, start, stop), delta·x on rows
    start:stop; `delta` a CSR (out, in) matrix of fp32 values, summed in fp32 and added in `output`'s
    dtype. The inputs are transposed once into one contiguous (in, tokens) block per row, which the
    CSR product reads as it is: one product per row (a batch holds at most --max-batch rows; a batch
    of one adapter is written in place instead), where slicing a span out of one (in, all tokens)
    matrix made the product copy it first (MiniLM, 8 rows of 8 adapters: ~0.6-1.3 ms of a 31 ms forward)."""
    output = output.contiguous()  # (a linear's output already is)
    blocks = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2).to(torch.float32).contiguous()  # (rows, in, tokens)
    per_row = output.view(x.shape[0], -1, output.shape[-1])
    mixed_precision = torch.is_autocast_enabled(x.device.type)
    with torch.autocast(x.device.type, enabled=False) if mixed_precision else nullcontext():
        for delta, start, stop in parts:
            for row in range(start, stop):
                per_row[row] += (delta @ blocks[row]).t().to(output.dtype)
    return output


def _split_rows(value: Any, start: int, stop: int, rows: int) -> Any:
    """A module argument cut to rows start:stop when it is a batch tensor (its first dimension the batch's)."""
    return value[start:stop] if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == rows else value


class _HeadHook:
    """A head module's forward hook: each span's rows recomputed with the span's own head tensors
    (spans without any keep the base's), the outputs padded to the widest (a regression head's one
    output beside a classifier's two; the caller reads each row's own width)."""

    def __init__(self, parts: list[tuple[dict[str, torch.Tensor], int, int]]) -> None:
        self.parts = parts
        self.inside = False  # the recomputation calls the module again: let that call through

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        if self.inside:
            return None
        rows = output.shape[0]
        self.inside = True
        try:
            outputs = []
            for tensors, start, stop in self.parts:
                sliced_args = tuple(_split_rows(a, start, stop, rows) for a in args)
                sliced_kwargs = {key: _split_rows(v, start, stop, rows) for key, v in kwargs.items()}
                outputs.append(torch.func.functional_call(module, tensors, sliced_args, sliced_kwargs))
        finally:
            self.inside = False
        width = max([output.shape[-1], *(part.shape[-1] for part in outputs)])
        result = output if width == output.shape[-1] else output.new_zeros((*output.shape[:-1], width))
        if result is not output:
            result[..., : output.shape[-1]] = output
        for part, (_, start, stop) in zip(outputs, self.parts):
            result[start:stop] = 0
            result[start:stop, ..., : part.shape[-1]] = part
        return result


@contextmanager
def row_adapters(params: BaseParameters, spans: list[Span]) -> Iterator[None]:
    """While inside, a forward of the model `params` holds computes each span's rows with that span's
    adapter: its deltas added at the linears it targets, its head in place of the base's. The base's
    weights are only read; the hooks are gone on exit."""
    deltas: dict[str, list[tuple[torch.Tensor, int, int]]] = {}
    heads: dict[str, list[tuple[dict[str, torch.Tensor], int, int]]] = {}
    for span in spans:
        for name, delta in span.swap.deltas.items():
            deltas.setdefault(name, []).append((delta, span.start, span.stop))
        for name, tensors in span.swap.head_modules.items():
            heads.setdefault(name, []).append((tensors, span.start, span.stop))
    handles = []
    try:
        for name, parts in deltas.items():
            handles.append(params.module(name).register_forward_hook(
                lambda module, args, output, parts=parts: add_sparse_deltas(output, args[0], parts)))
        for name, parts in heads.items():
            handles.append(params.module(name).register_forward_hook(_HeadHook(parts), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
