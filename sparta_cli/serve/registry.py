"""What the server holds: one base model, its tokenizer, and every adapter resident as a `SparseSwap`."""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparta_cli.config import ModelConfig, Recipe
from sparta_cli.errors import SpartaError
from sparta_cli.serve.swap import SparseSwap
from sparta_cli.tasks import Task

BASE_NAME = "base"
SERVED_METHODS = ("sparta", "head")  # whose saved tensors are deltas and a head (LoRA/DoRA via PEFT come later)
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class ServedModel:
    """The base or one adapter: its task, its tokenisation policy (the run's data.max_length and
    data.overlong) and, for an adapter, its swap."""

    name: str
    task: Task | None  # None: a base model with no trained head (refused for classification)
    recipe: Recipe | None
    method: str
    swap: SparseSwap | None = None
    density: float | None = None
    trainable_params: int | None = None
    source: str = ""

    def describe(self) -> dict[str, Any]:
        """Its entry in GET /v1/models (OpenAI's model object plus what the run records)."""
        task = self.task
        return {
            "id": self.name, "object": "model", "owned_by": "sparta", "source": self.source, "method": self.method,
            "task": task.name if task else None,
            "type": None if task is None else ("regression" if task.is_regression else "classification"),
            "labels": list(task.label_names) if task and task.label_names else None,
            "text_fields": list(task.text_fields) if task else None,
            "density": self.density, "trainable_params": self.trainable_params,
            "resident_bytes": self.swap.nbytes if self.swap else 0,
        }

    def encode(self, inputs: list[Any], tokenizer) -> list[dict[str, list[int]]]:
        """Token ids per input, as `data.tokenize_split` makes them: truncated to data.max_length, or
        refused when the run drops over-long rows (data.overlong: drop)."""
        assert self.task is not None and self.recipe is not None
        fields = len(self.task.text_fields)
        max_length = self.recipe.data.max_length
        encoded = []
        for position, item in enumerate(inputs):
            texts = _texts(item, fields, position, self.name)
            full = len(tokenizer(*texts, truncation=False)["input_ids"])
            if full > max_length and self.recipe.data.overlong == "drop":
                raise RequestError(400, f"input[{position}] has {full} tokens, over data.max_length={max_length} of `{self.name}`, "
                                        "whose run drops over-long rows (data.overlong: drop): shorten it")
            ids = tokenizer(*texts, truncation=True, max_length=max_length)
            encoded.append({key: list(value) for key, value in ids.items()})
        return encoded


def _texts(item: Any, fields: int, position: int, name: str) -> list[str]:
    """One input as the task's text fields: a string, or a [text, text] pair for a pair task."""
    if fields == 1:
        if isinstance(item, str):
            return [item]
        if isinstance(item, list):
            raise RequestError(400, f"input[{position}] is a list, but `{name}` classifies single texts: send a string")
        raise RequestError(400, f"input[{position}] is {type(item).__name__}, not a string")
    if isinstance(item, list) and len(item) == fields and all(isinstance(text, str) for text in item):
        return item
    raise RequestError(400, f"input[{position}] must be a pair [text, text] of strings: `{name}` classifies text pairs")


@dataclass
class ServedModels:
    """One base model and its adapters, at most one applied at a time (`activate`)."""

    model: nn.Module
    tokenizer: Any
    entries: dict[str, ServedModel]
    device: torch.device
    autocast_dtype: torch.dtype | None  # the eval path's mixed precision (None: none)
    base_bytes: int
    active: str = BASE_NAME
    swaps: int = 0
    swap_seconds: float = 0.0

    def get(self, name: Any) -> ServedModel:
        if not isinstance(name, str) or name not in self.entries:
            shown = repr(name[:80] if isinstance(name, str) else name)[:100]  # a request's text, echoed short
            raise RequestError(404, f"unknown model {shown}: this server serves {', '.join(self.entries)} (GET /v1/models)")
        return self.entries[name]

    def adapter_bytes(self) -> int:
        return sum(entry.swap.nbytes for entry in self.entries.values() if entry.swap)

    def activate(self, name: str) -> None:
        """Make the model compute `name`: revert the applied adapter, apply this one (O(k) each)."""
        if name == self.active:
            return
        start = time.perf_counter()
        current = self.entries[self.active].swap
        if current is not None:
            current.revert()
        target = self.entries[name].swap
        if target is not None:
            target.apply()
        self.active = name
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.swaps += 1
        self.swap_seconds += time.perf_counter() - start

    def run(self, name: str, features: list[dict[str, list[int]]]) -> list[dict[str, Any]]:
        """Classify one same-adapter batch: label, score and probabilities per input (regression: the score)."""
        entry = self.entries[name]
        assert entry.task is not None
        self.activate(name)
        batch = self.tokenizer.pad(features, return_tensors="pt")  # DataCollatorWithPadding's padding
        batch = {key: value.to(self.device) for key, value in batch.items()}
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with torch.inference_mode(), autocast:
            logits = self.model(**batch).logits.float()
        if entry.task.is_regression:
            return [{"score": float(value)} for value in logits.squeeze(-1).cpu()]
        probabilities = torch.softmax(logits.double(), dim=-1).cpu()
        labels = entry.task.label_names
        results = []
        for row in probabilities:
            best = int(row.argmax())
            results.append({"label": labels[best], "score": float(row[best]),
                            "probabilities": {label: float(p) for label, p in zip(labels, row)}})
        return results


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, Path]]:
    """`NAME=RUN` pairs from --adapter, names unique, never `base`."""
    pairs: list[tuple[str, Path]] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise SpartaError(f"--adapter {spec}: write NAME=RUN, e.g. --adapter sst2=runs/sst2-d0.01")
        if not ADAPTER_NAME.fullmatch(name) or name == BASE_NAME:
            raise SpartaError(f"--adapter {spec}: the name must be letters, digits, `.`, `_` or `-` (at most 64), and not `{BASE_NAME}`")
        pairs.append((name, Path(path).expanduser()))
    return pairs


def load_served(target: str, adapters: list[tuple[str, Path]]) -> ServedModels:
    """The base model (TARGET's, or TARGET itself) loaded once, and every run resident on it."""
    from sparta_cli.evaluate_cmd import BASE, MERGED, RUN, eval_recipe, target_kind
    from sparta_cli.models import fit_max_length, load_for_classification
    from sparta_cli.placement import mixed_precision
    from sparta_cli.tasks import resolve_task

    kind = target_kind(target)
    runs = list(adapters)
    if kind == RUN:
        run_dir = Path(target).expanduser()
        name = run_dir.resolve().name
        if not ADAPTER_NAME.fullmatch(name) or name == BASE_NAME:
            raise SpartaError(f"run folder name `{name}` cannot name a model: serve its base and pass --adapter NAME={target}")
        runs.insert(0, (name, run_dir))
    names = [name for name, _ in runs]
    duplicate = next((name for name in names if names.count(name) > 1), None)
    if duplicate:
        raise SpartaError(f"two adapters are named `{duplicate}`: give each --adapter its own NAME")
    if kind == BASE and not runs:
        raise SpartaError(f"{target} is a base model with no trained head and no --adapter was given: pass --adapter NAME=RUN "
                          "for each run to serve")
    recipes = {name: _run_recipe(name, path) for name, path in runs}
    tasks = {name: resolve_task(recipe.task) for name, recipe in recipes.items()}

    base_task = None
    if kind == MERGED:
        base_recipe = eval_recipe(target, MERGED, None, [])
        base_task = resolve_task(base_recipe.task)
        model_cfg = base_recipe.model
    elif kind == BASE:
        base_recipe, model_cfg = None, ModelConfig(name_or_path=target)
    else:
        base_recipe, model_cfg = None, recipes[runs[0][0]].model
    for name, recipe in recipes.items():
        if not _same_base(recipe.model, model_cfg):
            raise SpartaError(f"adapter `{name}` was trained on {recipe.model.name_or_path}, not on {model_cfg.name_or_path}: "
                              "serve each base model in a server of its own")
    sizing = base_task or tasks[runs[0][0]]
    loaded = load_for_classification(model_cfg, sizing.num_labels, list(sizing.label_names or []) or None,
                                     problem_type="regression" if sizing.is_regression else "single_label_classification")
    model = loaded.model
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval().requires_grad_(False)
    for module in loaded.head_modules:  # heads are trained and saved in fp32, as the eval path keeps them
        model.get_submodule(module).float()
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(b.numel() * b.element_size() for b in model.buffers())
    if base_recipe is not None:
        fit_max_length(base_recipe, model)
    method = "merged" if kind == MERGED else "base"
    entries = {BASE_NAME: ServedModel(BASE_NAME, base_task, base_recipe, method, source=str(model_cfg.name_or_path))}
    for name, path in runs:
        entries[name] = _load_adapter(name, path, model, recipes[name], tasks[name])
    precision = mixed_precision(base_recipe or recipes[runs[0][0]], next(model.parameters()).dtype)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    return ServedModels(model, loaded.tokenizer, entries, device, autocast, base_bytes)


def _run_recipe(name: str, path: Path) -> Recipe:
    """The run's own recipe, as `sparta eval` reads it: its task and its tokenisation policy."""
    from sparta_cli.evaluate_cmd import RUN, eval_recipe

    recipe = eval_recipe(str(path), RUN, None, [])
    if recipe.task.head == "lm":
        raise SpartaError(f"adapter `{name}` ({path}) scores multiple choice with the LM head: serve takes classification and regression runs")
    return recipe


def _same_base(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether two recipes name the same weights (a local folder by where it is, a Hub name by name)."""
    from sparta_cli.models import resolve_model_path

    def where(cfg: ModelConfig) -> str:
        path = Path(resolve_model_path(cfg.name_or_path))
        return str(path.resolve()) if path.exists() else cfg.name_or_path

    return where(a) == where(b) and (a.revision, a.gguf_file, a.dtype) == (b.revision, b.gguf_file, b.dtype)


def _load_adapter(name: str, path: Path, model: nn.Module, recipe: Recipe, task: Task) -> ServedModel:
    from sparta_cli.models import fit_max_length
    from sparta_cli.runs import read_adapter_config, read_adapter_tensors
    from sparta_cli.tuners import check_base_matches

    config = read_adapter_config(path)
    method = config.get("method")
    if method not in SERVED_METHODS:
        raise SpartaError(f"adapter `{name}` ({path}) is a {method} run: serve takes SpaRTA and head-only runs for now; "
                          f"`sparta merge {path}` and `sparta eval` or `sparta predict` the merged checkpoint instead")
    trained = config.get("task", {}).get("num_labels")
    if trained is not None and trained != task.num_labels:
        raise SpartaError(f"run {path} has {trained} outputs but its task now has {task.num_labels}: check its task files")
    check_base_matches(config, model)
    fit_max_length(recipe, model)
    swap = SparseSwap(model, read_adapter_tensors(path), list(config.get("head_modules", [])), method)
    return ServedModel(name, task, recipe, method, swap, config.get("density"), config.get("trainable_params"), str(path))
