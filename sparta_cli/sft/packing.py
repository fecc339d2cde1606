"""Fitting SFT rows to `max_length`, packing them, and the batches a causal LM trains on.

Truncation cuts from the right. A row left with no supervised token is dropped and counted, never
trained on with a silent zero loss; `overlong: drop` drops every row that does not fit.

A packed sequence is several rows end to end, each with position ids from 0. Batches of packed
sequences carry no `attention_mask`: transformers' causal LMs then read each restart of the position
ids as a row boundary and attend within rows only (masking_utils.find_packed_sequence_indices for
eager / sdpa / flex attention, varlen kernels for flash attention). Padding is a block of its own the
same way, so no real token attends to it. Each row's first label is already off (masks.py), so no row
is trained to predict its first token from the row before.

The model must run with `use_cache=False`: with a cache, or with any 2D attention mask, transformers
skips that detection and the rows attend across each other (a tiny Llama's logits move by 0.19).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from sparta_cli.errors import SpartaError
from sparta_cli.sft.masks import IGNORE, TokenizedRow

Overlong = Literal["truncate", "drop"]
OVERLONG: tuple[str, ...] = ("truncate", "drop")


@dataclass(frozen=True)
class Fitted:
    """The rows that fit, which input rows they are, and what fitting cost (for the log)."""

    rows: list[TokenizedRow]
    kept: list[int]  # index of each kept row in the input
    truncated: int  # rows cut to max_length and kept
    dropped_overlong: int  # rows longer than max_length, dropped (overlong: drop)
    dropped_unsupervised: int  # rows with no supervised token left (cut off, or none to begin with)

    def note(self, max_length: int) -> str | None:
        """One log line when fitting changed anything, else None."""
        total = len(self.rows) + self.dropped_overlong + self.dropped_unsupervised
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} of {total} rows cut to max_length {max_length}")
        if self.dropped_overlong:
            parts.append(f"{self.dropped_overlong} longer than max_length {max_length} dropped (data.overlong: drop)")
        if self.dropped_unsupervised:
            parts.append(f"{self.dropped_unsupervised} dropped: no answer token within max_length {max_length} "
                         "(raise data.max_length to keep them)")
        return "; ".join(parts) or None


@dataclass(frozen=True)
class PackedRow:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]  # restart at 0 at each row

    def __len__(self) -> int:
        return len(self.input_ids)


def fit_to_length(rows: Sequence[TokenizedRow], max_length: int, overlong: Overlong = "truncate") -> Fitted:
    if overlong not in OVERLONG:
        raise SpartaError(f"data.overlong {overlong!r} is not one of {', '.join(OVERLONG)}: fix data.overlong")
    kept_rows, kept = [], []
    truncated = dropped_overlong = dropped_unsupervised = 0
    for index, row in enumerate(rows):
        if len(row) > max_length:
            if overlong == "drop":
                dropped_overlong += 1
                continue
            row = TokenizedRow(input_ids=row.input_ids[:max_length], labels=row.labels[:max_length])
            truncated += row.supervised > 0
        if row.supervised == 0:
            dropped_unsupervised += 1
            continue
        kept_rows.append(row)
        kept.append(index)
    return Fitted(kept_rows, kept, truncated, dropped_overlong, dropped_unsupervised)


def pack(rows: Sequence[TokenizedRow], max_length: int) -> list[PackedRow]:
    """Rows packed into sequences of at most `max_length` tokens, best fit decreasing (TRL's default):
    the longest row first, each into the fullest sequence it fits. Deterministic; rows keep their
    input order within a sequence."""
    too_long = next((len(row) for row in rows if len(row) > max_length), None)
    if too_long is not None:
        raise ValueError(f"a row of {too_long} tokens exceeds max_length {max_length}: call fit_to_length first")
    order = sorted(range(len(rows)), key=lambda index: -len(rows[index]))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin), sorted
    for index in order:
        size = len(rows[index])
        at = bisect.bisect_left(free, (size, -1))
        if at == len(free):
            bins.append([index])
            room, number = max_length - size, len(bins) - 1
        else:
            room, number = free.pop(at)
            bins[number].append(index)
            room -= size
        bisect.insort(free, (room, number))
    return [_join([rows[index] for index in sorted(members)]) for members in bins]


def _join(rows: Sequence[TokenizedRow]) -> PackedRow:
    return PackedRow(input_ids=[token for row in rows for token in row.input_ids],
                     labels=[label for row in rows for label in row.labels],
                     position_ids=[position for row in rows for position in range(len(row))])


def collate_padded(rows: Sequence[TokenizedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """One row a sequence, right-padded: input_ids, attention_mask, labels."""
    width = max(len(row) for row in rows)
    return {
        "input_ids": _padded([row.input_ids for row in rows], width, pad_id),
        "attention_mask": _padded([[1] * len(row) for row in rows], width, 0),
        "labels": _padded([row.labels for row in rows], width, IGNORE),
    }


def collate_packed(rows: Sequence[PackedRow], pad_id: int) -> dict[str, torch.Tensor]:
    """Packed sequences, right-padded: input_ids, labels, position_ids and no attention_mask (the
    position ids mark the rows; run the model with use_cache=False, see the module's docstring).
    Padding's positions restart at 0."""
    width = max(len(row) for row in rows)
    return {
        "input_ids": _padded([row.input_ids for row in rows], width, pad_id),
        "labels": _padded([row.labels for row in rows], width, IGNORE),
        "position_ids": torch.tensor([row.position_ids + list(range(width - len(row))) for row in rows]),
    }


def _padded(lists: Sequence[Sequence[int]], width: int, value: int) -> torch.Tensor:
    return torch.tensor([list(values) + [value] * (width - len(values)) for values in lists])
