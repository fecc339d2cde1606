"""One interface over every training method: which parameters train, and how they are saved.

`sparta` trains fp32 deltas at random entries of the target matrices; `lora`/`dora`
go through Hugging Face PEFT; `full` trains everything; `head` only the head. Every
method trains the classification head fully, as SpaRTA does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparta_cli import FORMAT_VERSION, __version__
from sparta_cli.adapter_checks import check_adapter_config, check_adapter_tensors
from sparta_cli.config import AdapterConfig
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_json, replace_dir, write_json, write_safetensors
from sparta_cli.targets import resolve_targets
from sparta_cli.tuners.sparta.model import SpartaModel, split_indices

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
PEFT_DIR = "peft"  # LoRA/DoRA runs keep PEFT's own adapter files here
TRAINED_PREFIX = "trained."  # fully trained parameters (the head; everything for `full`)


@dataclass
class Adapter:
    method: str
    model: nn.Module  # the model to run (a PeftModel for lora/dora)
    base: nn.Module  # the transformers model underneath
    head_modules: list[str]
    base_params: int  # parameters of the base model before adaptation
    sparta: SpartaModel | None = None

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return sum(p.numel() for _, p in self.trainable())

    def counts(self) -> dict[str, int]:
        """Trainable parameters per kind: each SpaRTA target, the head, the rest."""
        counts: dict[str, int] = dict(self.sparta.counts_by_target()) if self.sparta else {}
        head = sum(p.numel() for name, p in self.base.named_parameters() if p.requires_grad and _in_modules(name, self.head_modules))
        counts["head"] = head
        other = self.num_trainable() - sum(counts.values())
        if other:
            counts[self.method] = other
        return counts

    def summary_line(self) -> str:
        """Like PEFT's print_trainable_parameters, plus the count per target kind."""
        n = self.num_trainable()
        parts = ", ".join(f"{kind}: {count:,}" for kind, count in self.counts().items())
        return f"trainable params: {n:,} || all params: {self.base_params:,} || trainable%: {100 * n / self.base_params:.4f} ({parts})"

    def saved_tensors(self) -> dict[str, torch.Tensor]:
        tensors = self.sparta.state_tensors() if self.sparta else {}
        for name, param in self.base.named_parameters():
            if param.requires_grad and not name.endswith("sparta_delta"):
                tensors[TRAINED_PREFIX + name] = param.detach().cpu().clone().contiguous()
        return tensors

    def save(self, run_dir: Path, metadata: dict[str, Any]) -> None:
        """adapter_model.safetensors (+ PEFT's files for lora/dora) and adapter_config.json, each atomic."""
        if self.method in ("lora", "dora"):
            replace_dir(lambda tmp: self.model.save_pretrained(str(tmp)), run_dir / PEFT_DIR)
        else:
            write_safetensors(run_dir / ADAPTER_FILE, self.saved_tensors(), {"format": "pt"})
        config = {
            "format_version": FORMAT_VERSION,
            "sparta_version": __version__,
            "method": self.method,
            "head_modules": self.head_modules,
            "trainable_params": self.num_trainable(),
            "base_params": self.base_params,
            "trainable_by_kind": self.counts(),
            "target_shapes": self.sparta.shapes() if self.sparta else {},
            **metadata,
        }
        write_json(run_dir / CONFIG_FILE, config)


def _in_modules(param_name: str, modules: list[str]) -> bool:
    return any(param_name == m or param_name.startswith(m + ".") for m in modules)


def _freeze_all_but_heads(model: nn.Module, head_modules: list[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(_in_modules(name, head_modules))


def apply_adapter(model: nn.Module, cfg: AdapterConfig, seed: int, head_modules: list[str]) -> Adapter:
    """Freeze `model` and make the method's parameters trainable, in place."""
    base_params = sum(p.numel() for p in model.parameters())
    method = cfg.method
    if method == "full":
        model.requires_grad_(True)
        return Adapter(method, model, model, head_modules, base_params)
    _freeze_all_but_heads(model, head_modules)
    if method == "head":
        return Adapter(method, model, model, head_modules, base_params)
    if method == "sparta":
        sparta = SpartaModel.inject(model, cfg.targets, cfg.density, seed)
        return Adapter(method, model, model, head_modules, base_params, sparta)
    return _apply_peft(model, cfg, head_modules, base_params)


def _apply_peft(model: nn.Module, cfg: AdapterConfig, head_modules: list[str], base_params: int) -> Adapter:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise SpartaError(f"adapter.method={cfg.method} needs PEFT: pip install 'sparta[peft]'") from None
    targets = list(resolve_targets(model, cfg.targets))
    peft_config = LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=targets,
        use_dora=cfg.method == "dora",
        modules_to_save=head_modules,
    )
    peft_model = get_peft_model(model, peft_config)
    return Adapter(cfg.method, peft_model, model, head_modules, base_params)


# ---------------------------------------------------------------- loading


def read_adapter_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CONFIG_FILE
    if not run_dir.exists():
        raise SpartaError(f"{run_dir} does not exist: give the folder of a run that `sparta train` wrote (check for a typo)")
    if not run_dir.is_dir():
        raise SpartaError(f"{run_dir} is a file: give the folder of a run that `sparta train` wrote")
    if not path.is_file():
        hint = " (it holds checkpoints: finish it with `sparta train RECIPE --resume`)" if any(run_dir.glob("checkpoint-*")) else ""
        raise SpartaError(f"{run_dir} has no {CONFIG_FILE}: not a finished sparta run{hint}")
    config = read_json(path)
    version = config.get("format_version") if isinstance(config, dict) else None
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise SpartaError(
            f"{path} has format version {version}, newer than this sparta understands ({FORMAT_VERSION}): upgrade sparta"
        )
    check_adapter_config(config, path)
    return config


def read_adapter_tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = run_dir / ADAPTER_FILE
    if not path.is_file():
        raise SpartaError(f"{run_dir} has no {ADAPTER_FILE}: not a finished sparta run")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise SpartaError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0]}): retrain or restore the file") from None
    check_adapter_tensors(tensors, read_adapter_config(run_dir), path)  # the one read path: eval, merge, export
    return tensors


def check_base_matches(config: dict[str, Any], model: nn.Module) -> None:
    """Refuse to apply an adapter to a base of another kind (recorded model_type) or with other target shapes."""
    recorded = config.get("base_model", {})
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if recorded.get("model_type") and kind and recorded["model_type"] != kind:
        raise SpartaError(
            f"the adapter was made for {recorded.get('name_or_path')}, a {recorded['model_type']} model, not for this "
            f"{kind} model: load it on its own base (model.name_or_path={recorded.get('name_or_path')})"
        )
    for name, shape in config.get("target_shapes", {}).items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise SpartaError(
                f"the adapter was made for {config.get('base_model', {}).get('name_or_path')} and targets `{name}`, "
                "which this base model lacks: load it on its own base"
            ) from None
        if list(weight.shape) != list(shape):
            raise SpartaError(
                f"the adapter was made for {config.get('base_model', {}).get('name_or_path')}: `{name}` has shape "
                f"{list(weight.shape)} here but {shape} there: load it on its own base"
            )


def load_adapter(run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
    """Put a saved adapter onto a freshly loaded base model (same head size)."""
    method = config["method"]
    head_modules = list(config.get("head_modules", []))
    base_params = sum(p.numel() for p in model.parameters())
    if method in ("lora", "dora"):
        from peft import PeftModel

        peft_model = PeftModel.from_pretrained(model, str(run_dir / PEFT_DIR))
        return Adapter(method, peft_model, model, head_modules, base_params)
    check_base_matches(config, model)
    tensors = read_adapter_tensors(run_dir)
    sparta = None
    if method == "sparta":
        sparta = SpartaModel.attach(model, split_indices(tensors))
        sparta.load_deltas(tensors)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            if not key.startswith(TRAINED_PREFIX):
                continue
            name = key.removeprefix(TRAINED_PREFIX)
            if name not in params or params[name].shape != value.shape:
                raise SpartaError(f"adapter parameter `{name}` {list(value.shape)} does not fit this base model: load it on its own base")
            params[name].copy_(value)
    model.requires_grad_(False)
    return Adapter(method, model, model, head_modules, base_params, sparta)
