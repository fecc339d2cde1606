"""Splits downloaded from the Hugging Face Hub, for a task with no local copy (no `data.dir`)."""

from __future__ import annotations

import datasets

from sparta_cli.errors import SpartaError
from sparta_cli.tasks.base import Task, features


def from_hub(repo: str, config: str | None, split: str) -> datasets.Dataset:
    """One split of a Hub dataset; no internet, a missing split or a bad cache is one line."""
    what = f"{repo} ({config})" if config else repo
    try:
        return datasets.load_dataset(repo, config, split=split)
    except ConnectionError:
        raise SpartaError(
            f"cannot download {what} from the Hugging Face Hub: no internet: "
            "set data.dir or $SPARTA_DATA_DIR to a local copy"
        ) from None
    except (OSError, ValueError) as exc:  # missing repo or split, HTTP errors, a bad cache
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SpartaError(
            f"cannot load {what} split {split} from the Hugging Face Hub ({reason}): "
            "check your connection, or set data.dir or $SPARTA_DATA_DIR to a local copy"
        ) from None


def hub_split(task: Task, repo: str, config: str | None, split: str) -> datasets.Dataset:
    """A split trimmed to the task's columns and typed like a local copy."""
    return from_hub(repo, config, split).select_columns([*task.text_fields, "label"]).cast(features(task))
