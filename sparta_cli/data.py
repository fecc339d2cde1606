"""Tokenized splits and their data loaders, cached on disk so a second run does not tokenize again.

A token-level task (SFT, `task.kind.token_level`) is tokenised by sparta_cli/sft/ instead: its rows
rendered with the chat template, labelled on the answer's tokens and fitted to data.max_length (the
rows left with no answer token dropped and counted), cached the same way under a key that adds the
format, loss_on and the template's text. Packing happens after the cache, per loader (the held-out
rows of model selection are chosen among rows, not packed sequences).

A cache entry (`$SPARTA_CACHE_DIR/tokenized/<key>/`) is the tokenized split (`data/`, datasets'
own format) and `stats.json`: its counts and the sha256 of every file in `data/`, checked on every
read. An entry that fails the check (a bit flipped, a file truncated or replaced) is rebuilt, with a
one-line warning, never used."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import DataLoader, Sampler

from sparta_cli.config import Recipe, user_path
from sparta_cli.errors import SpartaError
from sparta_cli.tasks import Task, load_split, sft_rows

if TYPE_CHECKING:
    from sparta_cli.sft import Rendering

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")
CACHE_FORMAT = 2  # 2: stats.json records each data file's sha256 (entries of format 1 are never read)


def cache_root() -> Path:
    return Path(os.environ.get("SPARTA_CACHE_DIR", Path.home() / ".cache" / "sparta")) / "tokenized"


@dataclass
class TokenizedSplit:
    dataset: object  # datasets.Dataset with model inputs (and `subject` for MMLU)
    split: str
    truncated: int  # examples cut to max_length
    dropped: int  # examples left out for being too long (data.overlong: drop), or (SFT) with no answer token left
    fitting: str | None = None  # SFT: what fitting to max_length did, in words (sft.Fitted.note)
    rendering: Rendering | None = None  # SFT: how its rows became text (sft.Rendering), which a run records

    @classmethod
    def of(cls, dataset, split: str, stats: dict, rendering: Rendering | None = None) -> TokenizedSplit:
        """A split from what its encoding counted: fresh, or read back from the cache's stats.json."""
        return cls(dataset, split, int(stats["truncated"]), int(stats["dropped"]), stats.get("fitting"), rendering)

    def note(self, task: Task, max_length: int) -> str | None:
        """The log line about what max_length cost this split, or None."""
        if self.fitting is not None:
            return f"{task.name}/{self.split}: {self.fitting}"
        if self.truncated or self.dropped:
            return f"{task.name}/{self.split}: {self.truncated} examples truncated, {self.dropped} dropped at max_length={max_length}"
        return None


def _cache_key(tokenizer, task: Task, split: str, recipe: Recipe, fingerprint: str, template: str | None = None) -> str:
    parts = {
        "tokenizer": getattr(tokenizer, "name_or_path", ""),
        "vocab": len(tokenizer),
        "tokenizer_class": type(tokenizer).__name__,
        "truncation_side": getattr(tokenizer, "truncation_side", "right"),  # MMLU head lm keeps a prompt's end
        "format": CACHE_FORMAT,
        "task": task.name,
        "kind": task.kind.name,
        "fields": task.text_fields,
        "split": split,
        "max_length": recipe.data.max_length,
        "overlong": recipe.data.overlong,
        "data": fingerprint,
    }
    if task.kind.token_level:  # what else decides an SFT row's ids and labels
        parts["sft"] = {"format": recipe.task.format, "loss_on": recipe.task.loss_on or "assistant", "eos": tokenizer.eos_token_id,
                        "template": hashlib.sha256(template.encode()).hexdigest() if template is not None else None}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def tokenize_split(task: Task, split: str, tokenizer, recipe: Recipe, limit: int | None = None, shuffle_seed: int | None = None) -> TokenizedSplit:
    """Load, subsample (`limit` rows, shuffled first when `shuffle_seed` is given), tokenize and cache one split."""
    from datasets import load_from_disk

    from sparta_cli.fileio import exclusive, replace_dir, write_json
    from sparta_cli.sft import Rendering

    raw = subsample(load_split(task, recipe.task, split, recipe.data_dir()), limit, shuffle_seed)
    rows = sft_rows(raw) if task.kind.token_level else None
    template = chat_template(rows, tokenizer, recipe) if rows is not None else None
    key = _cache_key(tokenizer, task, split, recipe, raw._fingerprint, template)
    rendering = Rendering.of(rows, recipe.task.format) if rows is not None else None
    if not recipe.data.cache:
        encoded, stats = _encode_split(task, split, raw, rows, tokenizer, template, recipe)
        return TokenizedSplit.of(encoded, split, stats, rendering)
    folder = cache_root() / key
    # one writer per entry: a second run of the same split waits, then reads what the first wrote (and
    # never sweeps the first one's temporary folder as a killed writer's leftover)
    with exclusive(cache_root().parent / "locks" / f"{key}.lock", on_wait=partial(_say_waiting, task, split)):
        if (folder / "stats.json").is_file():
            cached = _read_cache(folder, split)
            if cached is not None:
                return replace(cached, rendering=rendering)
        encoded, stats = _encode_split(task, split, raw, rows, tokenizer, template, recipe)

        def write(tmp: Path) -> None:
            encoded.save_to_disk(str(tmp / "data"))
            write_json(tmp / "stats.json", {**stats, "rows": len(encoded), "sha256": _digests(tmp / "data")})

        replace_dir(write, folder)
        encoded = load_from_disk(str(folder / "data"))
    return TokenizedSplit.of(encoded, split, stats, rendering)


def _encode_split(task: Task, split: str, raw, rows, tokenizer, template: str | None, recipe: Recipe):
    if rows is not None:
        return _encode_sft(task, split, rows, tokenizer, template, recipe)
    return _encode(task, raw, tokenizer, recipe, split)


def _say_waiting(task: Task, split: str) -> None:
    from sparta_cli.console import console

    console.print(f"{task.name}/{split}: another sparta process is tokenizing this split; waiting to read its cache entry")


def chat_template(rows: Sequence, tokenizer, recipe: Recipe) -> str | None:
    """The Jinja text conversations render with (`task.chat_template`, else the tokenizer's); None for plain rows."""
    from sparta_cli.sft import resolve_chat_template

    if not rows or rows[0].messages is None:
        return None
    given = recipe.task.chat_template
    return resolve_chat_template(tokenizer, user_path(given, "task.chat_template") if given else None)


def _encode_sft(task: Task, split: str, rows: Sequence, tokenizer, template: str | None, recipe: Recipe):
    """SFT rows as input_ids and labels, fitted to data.max_length, and what fitting did."""
    from datasets import Dataset

    from sparta_cli.sft import fit_to_length, tokenize_rows

    tokenized = tokenize_rows(rows, tokenizer, template, recipe.task.loss_on or "assistant")
    fitted = fit_to_length(tokenized, recipe.data.max_length, recipe.data.overlong)
    if not fitted.rows:
        why = " (data.overlong: drop drops every row that does not fit)" if recipe.data.overlong == "drop" else ""
        raise SpartaError(f"{task.name}/{split}: no row keeps an answer token within data.max_length={recipe.data.max_length}"
                          f"{why}: raise data.max_length")
    encoded = Dataset.from_dict({"input_ids": [row.input_ids for row in fitted.rows], "labels": [row.labels for row in fitted.rows]})
    stats = {"truncated": fitted.truncated, "dropped": fitted.dropped_overlong + fitted.dropped_unsupervised,
             "fitting": fitted.note(recipe.data.max_length)}
    return encoded, stats


def _encode(task: Task, raw, tokenizer, recipe: Recipe, split: str):
    """Rows of text fields as the kind's model inputs, cut (or dropped) at data.max_length, and the counts."""
    def encode(batch):
        out = task.kind.encode(tokenizer, [batch[f] for f in task.text_fields], recipe.data.max_length)
        out["labels"] = batch["label"]
        return out

    keep = [c for c in raw.column_names if c == "subject"]
    encoded = raw.map(encode, batched=True, remove_columns=[c for c in raw.column_names if c not in keep], desc=f"tokenizing {task.name}/{split}")
    overlong = sum(encoded["overlong"])
    dropped = 0
    if recipe.data.overlong == "drop":
        encoded = encoded.filter(lambda ex: not ex["overlong"])
        dropped, overlong = overlong, 0
    return encoded.remove_columns("overlong"), {"truncated": overlong, "dropped": dropped}


def _read_cache(folder: Path, split: str) -> TokenizedSplit | None:
    """A cached tokenized split, or None (and a warning) when it is damaged: it is then rebuilt."""
    from datasets import load_from_disk

    try:
        stats = json.loads((folder / "stats.json").read_text(encoding="utf-8"))
        _verify(folder / "data", stats["sha256"])
        dataset = load_from_disk(str(folder / "data"))
        if len(dataset) != stats.get("rows", len(dataset)) or len(dataset.data.column("labels")) != len(dataset):
            raise _Damaged("its row count differs from stats.json")
        return TokenizedSplit.of(dataset, split, stats)
    except Exception as exc:  # noqa: BLE001 - any damage has one fix: tokenize again
        from rich.markup import escape

        from sparta_cli.console import console

        reason = str(exc) if isinstance(exc, _Damaged) else type(exc).__name__
        console.print(f"[yellow]warning[/]: the tokenized cache {escape(str(folder))} is damaged ({escape(reason)}): rebuilding it",
                      markup=True, highlight=False)
        return None


class _Damaged(Exception):
    """A cache entry that does not match what was recorded when it was written."""


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        with path.open("rb") as handle:
            digests[path.relative_to(folder).as_posix()] = hashlib.file_digest(handle, "sha256").hexdigest()
    return digests


def _verify(folder: Path, recorded: dict[str, str]) -> None:
    """Every file recorded when the entry was written is there with its digest (files datasets
    adds later, such as its own caches, are not the entry's)."""
    if not recorded:
        raise _Damaged("stats.json records no files")
    for name, digest in recorded.items():
        path = folder / name
        if not path.is_file():
            raise _Damaged(f"{name} is missing")
        with path.open("rb") as handle:
            if hashlib.file_digest(handle, "sha256").hexdigest() != digest:
                raise _Damaged(f"{name} differs from the checksum recorded when it was written")


def subsample(dataset, limit: int | None, seed: int | None):
    """The first `limit` rows (after a seeded shuffle when `seed` is given). Unshuffled rows that
    come sorted by subject (MMLU) are taken in turn from each subject, so a subset spans them all
    instead of being the first few subjects."""
    if limit is None or limit >= len(dataset):
        return dataset
    if seed is not None:
        dataset = dataset.shuffle(seed=seed)
    elif "subject" in dataset.column_names:
        return dataset.select(across_subjects(dataset["subject"])[:limit])
    return dataset.select(range(limit))


def across_subjects(subjects: list[str]) -> list[int]:
    """Row indices ordered round-robin over subjects: the 1st row of every subject, then every 2nd, ..."""
    seen: dict[str, int] = {}
    rank = []
    for index, subject in enumerate(subjects):
        rank.append((seen.get(subject, 0), index))
        seen[subject] = seen.get(subject, 0) + 1
    return [index for _, index in sorted(rank)]


def validation_indices(rows: int, size: int | float, seed: int) -> tuple[list[int], list[int]]:
    """(training rows, held-out validation rows) of a split of `rows` rows: `size` rows (or that
    fraction, rounded) drawn with `seed`, so the same seed always holds out the same rows."""
    count = int(size) if size >= 1 else round(size * rows)
    if not 1 <= count < rows:
        raise SpartaError(f"data.validation_size = {size} holds out {count} of the {rows} training rows: "
                          "hold out at least 1 and leave at least 1 to train on")
    order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[count:]), sorted(order[:count])


class EpochShuffleSampler(Sampler[int]):
    """A permutation that depends on (seed, epoch) alone, so every process, world size
    and resumed run sees the same order; Accelerate shards its batches across processes."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


def make_loader(dataset, tokenizer, batch_size: int, shuffle: bool, seed: int) -> DataLoader:
    """Batches padded per batch; `shuffle` uses an EpochShuffleSampler (call its set_epoch)."""
    from transformers import DataCollatorWithPadding

    columns = [c for c in MODEL_INPUTS if c in dataset.column_names]
    return DataLoader(
        dataset.with_format(columns=columns),
        batch_size=batch_size,
        sampler=EpochShuffleSampler(len(dataset), seed) if shuffle else None,
        collate_fn=DataCollatorWithPadding(tokenizer),
        # a private generator: building an iterator must not draw from the global RNG
        generator=torch.Generator().manual_seed(seed),
    )


def task_loader(task: Task, dataset, tokenizer, batch_size: int, shuffle: bool, seed: int, *, packing: bool = False,
                max_length: int | None = None) -> DataLoader:
    """The loader of a tokenized split of `task`: `make_loader`'s, or for a token-level task (SFT) its
    rows padded (`sft.collate_padded`), or with `packing` packed into `max_length` sequences
    (`sft.pack`, `sft.collate_packed`). SFT batches carry `num_tokens`, each row's real (non-pad) tokens,
    for the throughput numbers (a packed batch has no attention mask to count them by)."""
    if not task.kind.token_level:
        return make_loader(dataset, tokenizer, batch_size, shuffle, seed)
    from sparta_cli.sft import TokenizedRow, collate_packed, collate_padded, pack

    columns = dataset.with_format(None)
    rows = [TokenizedRow(input_ids=ids, labels=labels) for ids, labels in zip(columns["input_ids"], columns["labels"])]
    sequences = pack(rows, max_length or max(len(row) for row in rows)) if packing else rows
    collate = partial(_counted, collate_packed if packing else collate_padded, pad_id=tokenizer.pad_token_id)
    return DataLoader(sequences, batch_size=batch_size, sampler=EpochShuffleSampler(len(sequences), seed) if shuffle else None,
                      collate_fn=collate, generator=torch.Generator().manual_seed(seed))


def _counted(collate: Callable, sequences: Sequence, pad_id: int) -> dict[str, torch.Tensor]:
    batch = collate(sequences, pad_id=pad_id)
    batch["num_tokens"] = torch.tensor([len(sequence) for sequence in sequences])  # each row's
    return batch
