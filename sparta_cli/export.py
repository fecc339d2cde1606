"""`sparta export`: a run's adapter in a format another library loads, plus a model card.

- `sparta`: our own format, self-contained for sharing: flat int32 indices and fp32 (or
  bf16) deltas, 8 (or 6) bytes per entry; `sparta eval`/`load_adapter` read it.
- `peft`: Hugging Face PEFT's SHiRA (sparse values + their coordinates). SHiRA stores
  exactly r*(in+out) entries per matrix for one r shared by every target, so each
  matrix is padded to that count with zero deltas at unused positions: exact, but
  larger when the targets' k/(in+out) differ (docs/export.md). Coordinates are saved
  as int16 when the matrix allows (PEFT casts them to int on load), so an unpadded
  adapter costs 8 bytes per entry in fp32 and 6 in bf16. LoRA/DoRA runs are already
  PEFT adapters and are copied.
- `peft-sparta`: the paper authors' package (`peft_sparta`): `sparse_deltas.safetensors`
  with `indices.<param>` (n, ndim) int32 coordinates and `deltas.<param>` for every
  parameter of the headless base, `head_init.safetensors`, and the classifier's
  `config.json` with `sparta_pretrained_model`. An SFT run (a causal LM) is written for
  `peft_sparta.SpaRTAforCausalLM`: deltas for every parameter of the causal LM, no head.

An SFT run's PEFT adapter is a `CAUSAL_LM` one, loaded onto `AutoModelForCausalLM`.
"""

from __future__ import annotations

import json
import math
import shutil
from functools import partial
from pathlib import Path
from typing import Any

import torch

from sparta_cli import FORMAT_VERSION
from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_json, replace_dir, write_json, write_safetensors, write_text
from sparta_cli.merge import merged_config, meta_model
from sparta_cli.models import resolve_model_path
from sparta_cli.outputs import OUTPUT_FILES, check_replaceable, locked_output, model_inputs, output_files
from sparta_cli.runs import (
    ADAPTER_FILE,
    CHAT_TEMPLATE_FILE,
    CONFIG_FILE,
    CONFIG_YAML,
    PEFT_DIR,
    TRAINED_PREFIX,
    Run,
    kept_template_copy,
    read_run,
)
from sparta_cli.tuners import get_tuner

FORMATS = ("sparta", "peft", "peft-sparta")
VALUE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SPARTA_WEIGHTS = "sparse_deltas.safetensors"
INT16_MAX = 2**15 - 1


def shira_rank(shapes: dict[str, list[int]], counts: dict[str, int]) -> int:
    """The one r with r*(in+out) >= k for every target (SHiRA has a single r)."""
    return max(math.ceil(counts[m] / (out + inp)) for m, (out, inp) in shapes.items())


def coordinates(flat: torch.Tensor, in_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    flat = flat.long()
    return flat // in_features, flat % in_features


def shira_tensors(run: Run, value_dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], int, int]:
    """PEFT SHiRA's state dict for a SpaRTA run, its r, and the number of zero padding entries."""
    shapes = run.config["target_shapes"]
    counts = {m: run.indices[m].numel() for m in shapes}
    r = shira_rank(shapes, counts)
    tensors, padding = {}, 0
    for module, (out, inp) in shapes.items():
        size = r * (out + inp)
        if size > out * inp:
            raise SpartaError(f"SHiRA's single r={r} needs {size} entries in `{module}`, which has {out * inp}: "
                              "export with --format peft-sparta or merge with `sparta merge`")
        indices, deltas = run.indices[module].long(), run.deltas[module]
        pad = size - indices.numel()
        if pad:  # zero deltas at the first unused positions: W0 + 0 is W0, so the padding changes nothing
            candidates = torch.arange(indices.numel() + pad)
            indices = torch.cat([indices, candidates[~torch.isin(candidates, indices)][:pad]])
            deltas = torch.cat([deltas, torch.zeros(pad)])
        padding += pad
        rows, cols = coordinates(indices, inp)
        index_dtype = torch.int16 if max(out, inp) <= INT16_MAX else torch.int32
        tensors[f"base_model.model.{module}.shira_indices"] = torch.stack([rows, cols]).to(index_dtype)
        tensors[f"base_model.model.{module}.shira_weight"] = deltas.to(value_dtype)
    for name, value in run.trained.items():
        tensors[f"base_model.model.{name}"] = value.to(value_dtype) if value.is_floating_point() else value
    return tensors, r, padding


def peft_sparta_tensors(run: Run, base_params: dict[str, list[int]], value_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`indices.<param>` as (n, ndim) int32 coordinates and `deltas.<param>` for every base parameter
    (the loader looks each one up), plus a classifier's fully trained `score.weight` as deltas over a zero init."""
    tensors = {}
    for name, shape in base_params.items():
        module = name.removesuffix(".weight")
        if name.endswith(".weight") and module in run.indices:
            rows, cols = coordinates(run.indices[module], shape[1])
            tensors[f"indices.{name}"] = torch.stack([rows, cols], dim=1).to(torch.int32)
            tensors[f"deltas.{name}"] = run.deltas[module].to(value_dtype)
        else:
            tensors[f"indices.{name}"] = torch.empty((0, len(shape)), dtype=torch.int32)
            tensors[f"deltas.{name}"] = torch.empty(0, dtype=value_dtype)
    if "score.weight" not in run.trained:  # a causal LM: nothing but the body's deltas
        return tensors
    head = run.trained["score.weight"]
    tensors["indices.score.weight"] = torch.ones(head.shape).nonzero().to(torch.int32).contiguous()  # every entry, as peft_sparta samples a full head
    tensors["deltas.score.weight"] = head.reshape(-1).to(value_dtype)
    return tensors


def base_reference(run: Run) -> str:
    """The base as the user named it (a Hub id, a path, `pkg:<package>/<folder>`), never the folder it
    resolved to on the training machine (a virtualenv's path means nothing elsewhere); readers
    resolve it (`sparta_cli.models.resolve_model_path`)."""
    return run.base.get("name_or_path") or ""


# ---------------------------------------------------------------- writers


def _write_sparta(run: Run, out: Path, value_dtype: torch.dtype) -> dict[str, Any]:
    tensors = {}
    for module, indices in run.indices.items():
        tensors[f"{module}.indices"] = indices
        tensors[f"{module}.delta"] = run.deltas[module].to(value_dtype)
    for name, value in run.trained.items():
        tensors[TRAINED_PREFIX + name] = value.to(value_dtype) if value.is_floating_point() else value
    write_safetensors(out / ADAPTER_FILE, tensors, {"format": "pt", "sparta_format": str(FORMAT_VERSION)})
    base = {key: value for key, value in run.base.items() if key != "resolved_path"}  # this machine's folder
    write_json(out / CONFIG_FILE, {**run.config, "base_model": base})
    return {"library": "sparta", "kind": "SpaRTA"}


def _write_peft(run: Run, out: Path, value_dtype: torch.dtype) -> dict[str, Any]:
    try:
        from peft import ShiraConfig
    except ImportError:
        raise SpartaError("--format peft needs PEFT: pip install 'sparta[peft]'") from None
    if get_tuner(run.method).peft_native:  # already a PEFT adapter
        from safetensors.torch import load_file

        tensors = load_file(str(run.path / PEFT_DIR / ADAPTER_FILE))  # PEFT's file names, which sparta's own share
        write_safetensors(out / ADAPTER_FILE, {k: v.to(value_dtype) if v.is_floating_point() else v for k, v in tensors.items()}, {"format": "pt"})
        config = read_json(run.path / PEFT_DIR / CONFIG_FILE)
        write_json(out / CONFIG_FILE, {**config, "base_model_name_or_path": base_reference(run)})  # not this machine's folder
        return {"library": "peft", "kind": run.method}
    tensors, r, padding = shira_tensors(run, value_dtype)
    config = ShiraConfig(r=r, mask_type="sparta", target_modules=sorted(run.indices), modules_to_save=list(run.config.get("head_modules", [])),
                         task_type="CAUSAL_LM" if run.causal_lm else "SEQ_CLS", inference_mode=True, base_model_name_or_path=base_reference(run),
                         revision=run.base.get("revision"))
    write_safetensors(out / ADAPTER_FILE, tensors, {"format": "pt"})
    config.save_pretrained(str(out))
    return {"library": "peft", "kind": "SHiRA", "r": r, "padding": padding}


def _write_peft_sparta(run: Run, out: Path, value_dtype: torch.dtype, trust_remote_code: bool = False) -> dict[str, Any]:
    task = run.config.get("task") or {}
    heads = sorted(run.trained)
    if run.causal_lm and heads:
        raise SpartaError(f"peft_sparta's SpaRTAforCausalLM adds sparse deltas to its base and has no trained head; this run trained "
                          f"{', '.join(heads)} whole: use --format sparta or --format peft, or `sparta merge`")
    if not run.causal_lm and (heads != ["score.weight"] or task.get("is_regression")):
        raise SpartaError(f"peft_sparta's loader runs classifiers with one bias-free `score` head (decoder models); this run "
                          f"({run.base.get('architecture')}) trained {', '.join(heads) or 'no head'}: use --format peft or `sparta merge`")
    if run.base.get("gguf_file"):
        raise SpartaError("peft_sparta loads its base with AutoModel.from_pretrained, which cannot read this run's GGUF base: "
                          "use --format peft or `sparta merge`")
    reference = resolve_model_path(base_reference(run))  # peft_sparta loads it with from_pretrained: no `pkg:`
    config = merged_config(reference, run, getattr(torch, run.base.get("dtype") or "float32", torch.float32),
                           trust_remote_code=trust_remote_code)
    model = meta_model(config, run.causal_lm)
    prefix = "" if run.causal_lm else model.base_model_prefix + "."  # the classifier's loader adapts the headless body
    base_params = {name: list(p.shape) for name, p in model.named_parameters() if name.startswith(prefix)}
    write_safetensors(out / SPARTA_WEIGHTS, peft_sparta_tensors(run, base_params, value_dtype), {"format": "pt"})
    if not run.causal_lm:
        head = run.trained["score.weight"]
        write_safetensors(out / "head_init.safetensors", {"head": torch.zeros(head.shape, dtype=head.dtype)}, {"format": "pt"})
    config.sparta_pretrained_model = reference
    config.save_pretrained(str(out))
    return {"library": "peft_sparta", "kind": "SpaRTA"}


# ---------------------------------------------------------------- model card


def model_card(run: Run, fmt: str, info: dict[str, Any], size: int, files: list[str]) -> str:
    """The README.md of an export; its front matter lists `files`, all that `export --overwrite` may replace."""
    config = run.config
    task = config.get("task") or {}
    trainable = int(config.get("trainable_params") or 0)
    results = run.results or {}
    command = _recipe_command(run.path)
    labels = ", ".join(task.get("label_names") or []) or ("regression" if task.get("is_regression") else "")
    if run.causal_lm:
        labels = f"SFT, loss on {task.get('loss_on') or 'assistant'}"
    by_kind = ", ".join(f"{kind}: {count:,}" for kind, count in (config.get("trainable_by_kind") or {}).items())
    rows = [
        ("base model", f"`{config.get('base_model', {}).get('name_or_path')}`" + (f" ({run.base['gguf_file']})" if run.base.get("gguf_file") else "")),
        ("architecture", str(run.base.get("architecture"))),
        ("task", f"{task.get('name')} ({labels})"),
        ("method", run.method),
        ("density", str(config.get("density"))),
        ("targets", ", ".join(config.get("targets") or [])),
        ("trainable parameters", f"{trainable:,}" + (f" ({by_kind})" if by_kind else "")),
        ("seed", str(config.get("seed"))),
        ("format", f"{fmt} ({info['kind']}{', r=' + str(info['r']) if 'r' in info else ''})"),
        ("file size", f"{size:,} bytes, {size / max(1, trainable):.2f} bytes per trainable parameter"),
    ]
    lines = ["---", f"library_name: {info['library']}", f"base_model: {base_reference(run)}", "tags: [sparta, sparse-fine-tuning]",
             f"{OUTPUT_FILES}: {json.dumps(files)}", "---", "",
             f"# SpaRTA adapter: {task.get('name')} on {run.base.get('name_or_path')}", "",
             "| | |", "|---|---|", *(f"| {key} | {value} |" for key, value in rows), ""]
    if info.get("padding"):
        lines += [f"SHiRA stores r*(in+out) entries per matrix for a single r; {info['padding']:,} zero-valued entries pad each "
                  "matrix up to that count (they change no weight).", ""]
    lines += ["## Metrics", ""]
    lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in results.items())] if results else ["(no all_results.json in the run)"]
    lines += ["", "## Reproduce", "", "The recipe is `config.yaml` in this folder:", "", "```bash", "sparta train config.yaml", "```"]
    if command:
        lines += ["", "The run was started with:", "", "```bash", command, "```"]
    lines += ["", "## Load", "", "```python", *_load_snippet(fmt, run, info), "```", ""]
    return "\n".join(lines)


def _recipe_command(run_dir: Path) -> str | None:
    from sparta_cli.config import read_yaml

    path = run_dir / CONFIG_YAML
    if not path.is_file():
        return None
    return (read_yaml(path).get("run") or {}).get("command")


def _load_snippet(fmt: str, run: Run, info: dict[str, Any]) -> list[str]:
    task = run.config.get("task") or {}
    if fmt == "sparta":
        return ["# from the shell: `sparta eval ADAPTER_DIR`, or `sparta merge ADAPTER_DIR --output DIR` for a plain checkpoint"]
    if fmt == "peft-sparta" and run.causal_lm:
        return ["from peft_sparta import SpaRTAforCausalLM", "", "model = SpaRTAforCausalLM('ADAPTER_DIR')  # the base with the deltas merged"]
    if fmt == "peft-sparta":
        return ["from peft_sparta import SpaRTAforSequenceClassification", "", "model = SpaRTAforSequenceClassification('ADAPTER_DIR')",
                "print(model.decide_class(['your text']))"]
    base = base_reference(run)
    auto = "AutoModelForCausalLM" if run.causal_lm else "AutoModelForSequenceClassification"
    lines = ["from peft import PeftModel", f"from transformers import {auto}", ""]
    if base.startswith("pkg:"):  # a model shipped inside a Python package
        lines += ["from sparta_cli.models import resolve_model_path", ""]
        base_arg = f"resolve_model_path('{base}')"
    else:
        base_arg = f"'{base}'"
    head = "" if run.causal_lm else f", num_labels={task.get('num_labels')}"
    return [*lines, f"base = {auto}.from_pretrained({base_arg}{head})", "model = PeftModel.from_pretrained(base, 'ADAPTER_DIR')"]


# ---------------------------------------------------------------- the command


def export_run(run_dir: Path, *, format: str, output: Path, values: str = "fp32", trust_remote_code: bool = False,
               overwrite: bool = False) -> dict[str, Any]:
    """Write the run's adapter as `format` into `output` (atomically), with a model card."""
    if format not in FORMATS:
        raise SpartaError(f"--format {format} is not one sparta writes: use {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    if values not in VALUE_DTYPES:
        raise SpartaError(f"--values {values} is not supported: use fp32 or bf16")
    output = Path(output)
    run = read_run(run_dir)
    check_replaceable(output, command="export", inputs=[run_dir, *model_inputs(run.base.get("name_or_path"))], overwrite=overwrite)
    tuner = get_tuner(run.method)
    if tuner.standalone:
        auto = "AutoModelForCausalLM" if run.causal_lm else "AutoModelForSequenceClassification"
        raise SpartaError(f"{run_dir} is a {run.method} run: its folder already is a transformers checkpoint "
                          f"({auto}.from_pretrained loads it): share the folder as it is")
    if format not in tuner.export_formats:
        other = f"export it with --format {' or '.join(tuner.export_formats)}, or " if tuner.export_formats else ""
        raise SpartaError(f"{run_dir} is a {run.method} run, which has no sparse adapter to export as {format}: "
                          f"{other}merge it into a checkpoint with `sparta merge`")
    value_dtype = VALUE_DTYPES[values]
    writer = {"sparta": _write_sparta, "peft": _write_peft,
              "peft-sparta": partial(_write_peft_sparta, trust_remote_code=trust_remote_code)}[format]
    result: dict[str, Any] = {}

    def build(tmp: Path) -> None:
        info = writer(run, tmp, value_dtype)
        size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
        if (run.path / CONFIG_YAML).is_file():
            shutil.copy(run.path / CONFIG_YAML, tmp / CONFIG_YAML)
        kept = kept_template_copy(run.path, (run.config.get("task") or {}).get("chat_template"))
        if kept:
            shutil.copy(kept, tmp / CHAT_TEMPLATE_FILE)  # the template the run trained with goes with it
        write_text(tmp / "README.md", model_card(run, format, info, size, sorted([*output_files(tmp), "README.md"])))
        trainable = int(run.config.get("trainable_params") or 0)
        result.update(info, bytes=size, trainable_params=trainable, bytes_per_param=size / max(1, trainable))

    with locked_output(output):
        replace_dir(build, output)
    console.print(f"[green]exported[/] {run_dir} as {format} ({result['kind']}) to {output}: {result['bytes']:,} bytes for "
                  f"{result['trainable_params']:,} trainable parameters = {result['bytes_per_param']:.2f} bytes per trainable parameter ({values} values)")
    return result
