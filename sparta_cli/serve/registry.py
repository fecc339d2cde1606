"""What the server holds: one base model, its tokenizer, and every adapter resident as a `SparseSwap`."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import Future
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparta_cli.config import ModelConfig, Recipe, TrainingConfig
from sparta_cli.errors import SpartaError
from sparta_cli.serve.mixed import Span, row_adapters
from sparta_cli.serve.swap import BaseParameters, PeftSwap, SparseSwap
from sparta_cli.tasks import Task

BASE_NAME = "base"
IN_PLACE_METHODS = ("sparta", "head")  # whose saved tensors are deltas and a head, written into the base in place
PEFT_METHODS = ("lora", "dora")  # served through PEFT's multi-adapter API on the same base
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class RequestError(Exception):
    """A request the server refuses: the HTTP status and a message naming the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(eq=False)  # compared and hashed by identity: the scheduler queues by entry, so a name can be reused at once
class ServedModel:
    """The base or one adapter: its task, its tokenisation policy (the run's data.max_length and
    data.overlong) and, for an adapter, its swap. `pending`: its requests not yet answered (an
    unload waits for them)."""

    name: str
    task: Task | None  # None: a base model with no trained head (refused for classification)
    recipe: Recipe | None
    method: str
    swap: SparseSwap | PeftSwap | None = None
    density: float | None = None
    rank: int | None = None
    trainable_params: int | None = None
    source: str = ""
    causal: bool = False  # a causal LM (an SFT run, or the base of a causal-LM server): it writes text
    template: str | None = None  # a causal LM's chat template (None: no chat, prompts are plain text)
    pending: set[Future] = field(default_factory=set)

    def describe(self) -> dict[str, Any]:
        """Its entry in GET /v1/models (OpenAI's model object plus what the run records)."""
        task = None if self.causal else self.task
        kind = "generation" if self.causal else None if task is None else ("regression" if task.is_regression else "classification")
        return {
            "id": self.name, "object": "model", "owned_by": "sparta", "source": self.source, "method": self.method,
            "task": task.name if task else None,
            "type": kind, **({"chat": self.template is not None} if self.causal else {}),
            "labels": list(task.label_names) if task and task.label_names else None,
            "text_fields": list(task.text_fields) if task else None,
            "density": self.density, "rank": self.rank, "trainable_params": self.trainable_params,
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
    """One base model and its adapters, at most one applied at a time (`activate`).

    Threads: the HTTP handlers read `entries`, which is replaced whole (never changed in place) when
    an adapter is added or removed; `lock` is held by every forward and every swap, so a change
    that touches the model (`retire`) waits for the batch running and no swap races a forward."""

    model: nn.Module
    tokenizer: Any
    entries: dict[str, ServedModel]
    device: torch.device
    autocast_dtype: torch.dtype | None  # the eval path's mixed precision (None: none)
    base_bytes: int
    model_cfg: ModelConfig | None = None  # the base's weights, which every adapter must have been trained on
    causal_lm: bool = False  # a causal LM that writes text (SFT runs), not a classifier
    adapters_dir: Path | None = None  # where POST /v1/adapters may load runs from (None: no loading at run time)
    swaps: int = 0
    swap_seconds: float = 0.0
    mixed_batches: int = 0  # forwards over several adapters' inputs (`run_mixed`)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def __post_init__(self) -> None:
        self.active: ServedModel = self.entries[BASE_NAME]
        self.base_parameters = BaseParameters(self.model)  # taken before any PEFT wrapping renames them
        self.peft_model: nn.Module | None = None  # the one PeftModel on the base, from the first LoRA/DoRA run on
        self._peft_loads = 0

    def get(self, name: Any) -> ServedModel:
        if not isinstance(name, str) or name not in self.entries:
            shown = repr(name[:80] if isinstance(name, str) else name)[:100]  # a request's text, echoed short
            raise RequestError(404, f"unknown model {shown}: this server serves {', '.join(self.entries)} (GET /v1/models)")
        return self.entries[name]

    def adapter_bytes(self) -> int:
        return sum(entry.swap.nbytes for entry in self.entries.values() if entry.swap)

    def _entry(self, model: str | ServedModel) -> ServedModel:
        return self.entries[model] if isinstance(model, str) else model

    def activate(self, model: str | ServedModel) -> None:
        """Make the model compute `model` (an entry or its name): revert the applied adapter, apply this one (O(k) each)."""
        target = self._entry(model)
        with self.lock:
            if target is self.active:
                return
            start = time.perf_counter()
            if self.active.swap is not None:
                self.active.swap.revert()
                self.active = self.entries[BASE_NAME]  # the base, until `target` is applied: a failed apply leaves no stale name
            if target.swap is not None:
                target.swap.apply()
            self.active = target
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.swaps += 1
            self.swap_seconds += time.perf_counter() - start

    def mixes(self, entry: ServedModel) -> bool:
        """Whether `entry`'s inputs may share a forward with other adapters' (`run_mixed`): a SpaRTA or
        head-only adapter of a classifier (a LoRA/DoRA run computes through PEFT's layers, one at a time)."""
        return isinstance(entry.swap, SparseSwap) and not self.causal_lm

    def run(self, model: str | ServedModel, features: list[dict[str, list[int]]]) -> list[dict[str, Any]]:
        """Classify one same-adapter batch, the adapter written into the weights: label, score and
        probabilities per input (regression: the score)."""
        entry = self._entry(model)
        with self.lock:
            self.activate(entry)
            logits = self._logits(features)
        return _answers(entry, logits)

    def run_mixed(self, models: list[str | ServedModel], features: list[dict[str, list[int]]]) -> list[dict[str, Any]]:
        """Classify a batch whose inputs name several adapters (each one that `mixes`) in one forward on
        the base weights (`mixed.row_adapters`), rows grouped by adapter. (The scheduler sends a batch
        of one adapter to `run`: writing it in place costs no compute per token.)"""
        entries = [self._entry(model) for model in models]
        positions: dict[ServedModel, list[int]] = {}
        for position, entry in enumerate(entries):
            positions.setdefault(entry, []).append(position)
        spans, start = [], 0
        for entry, rows in positions.items():
            spans.append(Span(entry.swap, start, start + len(rows)))
            start += len(rows)
        with self.lock:
            self.activate(self.entries[BASE_NAME])  # W0 in place: each row's delta is added, not written
            with row_adapters(self.base_parameters, spans):
                logits = self._logits([features[i] for rows in positions.values() for i in rows])
            self.mixed_batches += 1
        results: list[dict[str, Any]] = [{}] * len(entries)
        for (entry, rows), span in zip(positions.items(), spans):
            for position, answer in zip(rows, _answers(entry, logits[span.start:span.stop])):
                results[position] = answer
        return results

    def _logits(self, features: list[dict[str, list[int]]]) -> torch.Tensor:
        """The model's fp32 logits for a padded batch, as the eval path computes them (the caller holds the lock)."""
        batch = self.tokenizer.pad(features, return_tensors="pt")  # DataCollatorWithPadding's padding
        batch = {key: value.to(self.device) for key, value in batch.items()}
        autocast = torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype else nullcontext()
        with torch.inference_mode(), autocast:
            return self.model(**batch).logits.float()

    def warm_up(self, rows: int) -> None:
        """One forward of `rows` inputs through the base before serving, so that the memory a server
        holds from the start (and its first request's latency) include what its forwards need: kernels
        paged in, BLAS buffers (MiniLM: +60 MiB after the first requests, which a server holding no
        adapter yet would otherwise never show)."""
        with self.lock:
            self.activate(self.entries[BASE_NAME])
            self._logits([{"input_ids": [0] * 32}] * rows)

    # ------------------------------------------------------------ loading and unloading at run time

    def load_run(self, name: str, path: Path) -> ServedModel:
        """A run resident beside the base, not yet served (`add` serves it): its recipe, its task, its
        tensors read and checked, all off the model worker; refused in one line when it does not fit
        this base."""
        recipe = _run_recipe(name, path)
        if (recipe.task.type == "sft") != self.causal_lm:
            kind, other = ("an SFT run (a causal LM)", "a classifier") if self.causal_lm is False else ("a classification run", "a causal LM")
            raise SpartaError(f"adapter `{name}` ({path}) is {kind}, and this server serves {other}: "
                              "serve classification and SFT runs in servers of their own")
        if self.model_cfg is not None and not _same_base(recipe.model, self.model_cfg):
            raise SpartaError(f"adapter `{name}` was trained on {recipe.model.name_or_path}, not on {self.model_cfg.name_or_path}: "
                              "serve each base model in a server of its own")
        entry = _load_adapter(name, path, self.model, self.base_parameters, recipe, _resolve_task(recipe))
        if self.causal_lm:
            from sparta_cli.generate_cmd import prompt_template, renders_chat
            from sparta_cli.runs import read_adapter_config

            chat = renders_chat(read_adapter_config(path).get("task") or {})
            entry.causal, entry.template = True, prompt_template(self.tokenizer, recipe.task.chat_template, chat)
        if entry.method in PEFT_METHODS:
            entry.swap = self._load_peft(path)
        return entry

    def _load_peft(self, path: Path) -> PeftSwap:
        """The run as one more adapter of the one PeftModel (PEFT reads its files and adds its layers to
        the model, so this holds the model between batches), left disabled until it is activated."""
        from sparta_cli.runs.layout import PEFT_DIR

        with self.lock:
            self.activate(self.entries[BASE_NAME])  # PEFT copies the head it wraps: copy the base's
            self._peft_loads += 1
            adapter_name = f"served{self._peft_loads}"  # PEFT's names take no `.`; a reloaded name gets a new one
            try:
                if self.peft_model is None:
                    from peft import PeftModel

                    self.peft_model = PeftModel.from_pretrained(self.model, str(path / PEFT_DIR), adapter_name=adapter_name)
                else:
                    self.peft_model.load_adapter(str(path / PEFT_DIR), adapter_name=adapter_name)
            except (OSError, ValueError, KeyError, RuntimeError) as exc:
                raise SpartaError(f"PEFT could not load {path / PEFT_DIR} ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}): "
                                  "check that the run finished and was trained on this base") from None
            self.model.requires_grad_(False)
            swap = PeftSwap(self.peft_model, adapter_name)
            swap.revert()  # PEFT enables what it loads: the base computes as before
            return swap
    def check_name_free(self, name: str) -> None:
        """Refuse (409) a name already served."""
        if name in self.entries:
            raise RequestError(409, f"a model named `{name}` is already served: unload it first (DELETE /v1/adapters/{name}) "
                                    "or give another name")

    def add(self, entry: ServedModel) -> None:
        """Serve `entry` from the next request on (409 when its name is taken)."""
        self.check_name_free(entry.name)
        self.entries = {**self.entries, entry.name: entry}

    def remove(self, name: Any) -> ServedModel:
        """Stop serving `name`: from now on a request naming it gets 404 (its queued requests still run)."""
        entry = self.get(name)
        if entry.name == BASE_NAME:
            raise RequestError(400, f"`{BASE_NAME}` is the model every adapter runs on: it cannot be unloaded")
        self.entries = {key: value for key, value in self.entries.items() if key != entry.name}
        return entry

    def retire(self, entry: ServedModel) -> None:
        """After its last request: if `entry` is still applied, put the base back, and drop a PEFT
        adapter's layers (between batches)."""
        with self.lock:
            if self.active is entry:
                self.activate(self.entries[BASE_NAME])
            if isinstance(entry.swap, PeftSwap) and entry.swap.unload():
                self.peft_model = None  # the next LoRA/DoRA run wraps the plain base anew


def run_folder_under(root: Path, given: Any) -> Path:
    """The run folder a request names, relative to `--adapters-dir`, refused unless it stays inside:
    no absolute path, no `..`, no symlink (of the folder or any file in it) that leads outside."""
    if not isinstance(given, str) or not given.strip():
        raise RequestError(400, "`path` must name a run folder relative to --adapters-dir, e.g. {\"path\": \"sst2-d0.05\"}")
    relative = Path(given)
    if relative.is_absolute() or given.startswith(("/", "\\")) or relative.drive:
        raise RequestError(400, f"`path` {given!r} is absolute: name a run folder relative to --adapters-dir")
    if ".." in relative.parts or "\x00" in given:
        raise RequestError(400, f"`path` {given!r} climbs out with `..`: name a run folder under --adapters-dir")
    base = root.resolve()
    folder = root / relative
    if not _resolved(folder, given).is_relative_to(base):
        raise RequestError(403, f"`path` {given!r} is a symlink that leads outside --adapters-dir: serve only what is under it")
    if not folder.is_dir():
        raise RequestError(404, f"no run folder {given!r} under --adapters-dir (GET /v1/models lists what is served)")
    seen: set[Path] = set()
    folders = [folder]
    while folders:  # every entry, links followed into linked folders too (each real folder once: a loop ends)
        current = folders.pop()
        if (real := current.resolve()) in seen:
            continue
        seen.add(real)
        for entry in sorted(current.iterdir()):
            inside = entry.relative_to(folder)
            target = _resolved(entry, f"{given}/{inside}")
            if not target.is_relative_to(base):
                raise RequestError(403, f"{given}/{inside} is a symlink that leads outside --adapters-dir: serve only what is under it")
            if target.is_dir():
                folders.append(entry)
    return folder


def _resolved(path: Path, shown: str) -> Path:
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # a link loop (RuntimeError before Python 3.13)
        raise RequestError(400, f"{shown} is a symlink loop: remove the link") from None


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


def load_served(target: str, adapters: list[tuple[str, Path]], adapters_dir: Path | None = None) -> ServedModels:
    """The base model (TARGET's, or TARGET itself) loaded once, and every run resident on it."""
    from sparta_cli.evaluate_cmd import BASE, MERGED, RUN, eval_recipe, target_kind
    from sparta_cli.models import fit_max_length, load_for_causal_lm, load_for_classification
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
    first = _run_recipe(*runs[0]) if runs else None
    causal = _serves_causal_lm(target, kind, first)
    if kind == BASE and not runs and adapters_dir is None and not causal:
        raise SpartaError(f"{target} is a base model with no trained head and no --adapter was given: pass --adapter NAME=RUN "
                          "for each run to serve (or --adapters-dir DIR to load them at run time)")

    base_task = None
    if kind == MERGED and causal:
        base_recipe, model_cfg = None, ModelConfig(name_or_path=target)  # a causal LM: its own LM head, no task to score
    elif kind == MERGED:
        base_recipe = eval_recipe(target, MERGED, None, [])
        base_task = resolve_task(base_recipe.task)
        model_cfg = base_recipe.model
    elif kind == BASE:
        base_recipe, model_cfg = None, ModelConfig(name_or_path=target)
    else:
        base_recipe, model_cfg = None, first.model
    sizing = base_task or (_resolve_task(first) if first else None)
    if causal:
        loaded = load_for_causal_lm(model_cfg)
    elif sizing is None:  # a bare base whose runs all come later: any head will do, each run brings its own
        loaded = load_for_classification(model_cfg, 2, None, problem_type="single_label_classification")
    else:
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
    base = ServedModel(BASE_NAME, base_task, base_recipe, method, source=str(model_cfg.name_or_path), causal=causal)
    if causal:  # its own LM head is trained: `model: base` answers as the base (or merged model) does
        from sparta_cli.generate_cmd import prompt_template

        base.template = prompt_template(loaded.tokenizer, None, True)
    precision = mixed_precision(base_recipe or first or Recipe.model_construct(training=TrainingConfig()), next(model.parameters()).dtype)
    autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    served = ServedModels(model, loaded.tokenizer, {BASE_NAME: base}, device, autocast, base_bytes, model_cfg, causal, adapters_dir)
    for name, path in runs:
        served.add(served.load_run(name, path))
    return served


def _answers(entry: ServedModel, logits: torch.Tensor) -> list[dict[str, Any]]:
    """Each row's answer in `entry`'s terms, from its first num_labels logits (a mixed batch pads to its widest head)."""
    assert entry.task is not None
    logits = logits[:, : entry.task.num_labels]
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


def _serves_causal_lm(target: str, kind: str, first: Recipe | None) -> bool:
    """Whether the server holds a causal LM: a merged checkpoint's architecture says, else the first run
    (an SFT run), else, with none, whether the base's config names a ...ForCausalLM."""
    from sparta_cli.evaluate_cmd import BASE, RUN, read_model_config
    from sparta_cli.models import resolve_model_path

    if kind == RUN or (kind == BASE and first is not None):
        return first is not None and first.task.type == "sft"
    folder = Path(resolve_model_path(target))
    architectures = (read_model_config(folder).get("architectures") or []) if (folder / "config.json").is_file() else []
    return any(name.endswith("ForCausalLM") for name in architectures)


def _resolve_task(recipe: Recipe) -> Task:
    from sparta_cli.tasks import resolve_task

    return resolve_task(recipe.task)


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


def _load_adapter(name: str, path: Path, model: nn.Module, params: BaseParameters, recipe: Recipe, task: Task) -> ServedModel:
    from sparta_cli.models import fit_max_length
    from sparta_cli.runs import read_adapter_config
    from sparta_cli.tuners import check_base_matches, get_tuner

    config = read_adapter_config(path)
    method = config.get("method")
    if method not in (*IN_PLACE_METHODS, *PEFT_METHODS):
        raise SpartaError(f"adapter `{name}` ({path}) is a {method} run: serve takes SpaRTA, head-only, LoRA and DoRA runs; "
                          f"`sparta merge {path}` and serve the merged checkpoint instead")
    trained = config.get("task", {}).get("num_labels")
    if trained is not None and trained != task.num_labels:
        raise SpartaError(f"run {path} has {trained} outputs but its task now has {task.num_labels}: check its task files")
    check_base_matches(config, model)
    fit_max_length(recipe, model)
    if method in PEFT_METHODS:  # its swap is PEFT's, made by `ServedModels.load_run` between batches
        return ServedModel(name, task, recipe, method, None, None, recipe.adapter.r, config.get("trainable_params"), str(path))
    swap = SparseSwap(params, get_tuner(method).read_tensors(path), list(config.get("head_modules", [])), method)  # checked: finite, whole
    return ServedModel(name, task, recipe, method, swap, config.get("density"), None, config.get("trainable_params"), str(path))
