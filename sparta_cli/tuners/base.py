"""What every method shares: the `Tuner` interface and the `Adapter` it returns (runs.py names the run files).

A `Tuner` is one method (sparta, lora, dora, full, head) and says what it can do, so train,
merge, export, eval and report ask it instead of branching on the method's name. Every
method trains the classification head fully, as SpaRTA does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from sparta_cli import FORMAT_VERSION, __version__
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import write_json, write_safetensors
from sparta_cli.runs import ADAPTER_FILE, CONFIG_FILE, TRAINED_PREFIX, read_adapter_tensors

if TYPE_CHECKING:  # config.py asks the tuners which keys apply: no import cycle at run time
    from sparta_cli.config import AdapterConfig
    from sparta_cli.sharding import ShardedModel
    from sparta_cli.tuners.sparta.model import SpartaModel


class Tuner:
    """One training method: which parameters train, how they are saved, loaded, merged, exported."""

    name: ClassVar[str]
    display_name: ClassVar[str]  # how reports and plots name it
    config_keys: ClassVar[tuple[str, ...]] = ()  # the method-specific `adapter.*` keys it reads
    size_text: ClassVar[str]  # what sizes it, for messages
    export_formats: ClassVar[tuple[str, ...]] = ()  # `sparta export --format` values it supports
    adds_up: ClassVar[bool] = False  # its saved deltas add up with other runs' in one `sparta merge`
    peft_native: ClassVar[bool] = False  # saved as PEFT's own adapter files (under peft/)
    shardable: ClassVar[bool] = True  # trains under accelerate's FSDP / DeepSpeed ZeRO-3 plugins
    standalone: ClassVar[bool] = False  # its run folder is a whole transformers checkpoint (no base needed)
    config_file: ClassVar[str] = CONFIG_FILE  # where the run's adapter config is recorded
    default_lr: ClassVar[float]  # what `training.lr: auto` gives it (the rates compare_methods.sh used)

    def auto_lr(self, cfg: AdapterConfig) -> float:
        """The rate `training.lr: auto` resolves to (docs/learning_rates.md)."""
        return self.default_lr

    def applies(self, key: str) -> bool:
        """Whether the method-specific key `adapter.<key>` means something for this method."""
        return key in self.config_keys

    def name_setting(self, cfg: AdapterConfig) -> str:
        """The setting that sizes it, as it appears in default run names (`-d0.01`, `-r16`; none for full/head)."""
        return ""

    def apply(self, model: nn.Module, cfg: AdapterConfig, seed: int, head_modules: list[str]) -> Adapter:
        """Freeze `model` and make the method's parameters trainable, in place."""
        raise NotImplementedError

    def load(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
        """Put a saved adapter onto a freshly loaded base model (same head size), for inference."""
        check_base_matches(config, model)
        base_params = count_params(model)
        load_trained(model, read_adapter_tensors(run_dir))
        return self._loaded(model, config, base_params)

    def _loaded(self, model: nn.Module, config: dict[str, Any], base_params: int, sparta: SpartaModel | None = None) -> Adapter:
        """A loaded adapter is for inference: nothing trains."""
        model.requires_grad_(False)
        return Adapter(self, model, model, list(config.get("head_modules", [])), base_params, sparta)

    def gathered_for_save(self, adapter: Adapter, sharded: ShardedModel) -> dict[str, torch.Tensor]:
        """Under FSDP, what `save_weights` writes, gathered whole beforehand (a collective: every rank calls it)."""
        return adapter.saved_tensors()

    def save_weights(self, adapter: Adapter, run_dir: Path, metadata: dict[str, Any], tokenizer: Any = None,
                     gathered: dict[str, torch.Tensor] | None = None) -> None:
        """The trained tensors, atomically: deltas and fully trained parameters in one safetensors file
        (`gathered`: `gathered_for_save`'s tensors, when the model is sharded)."""
        write_safetensors(run_dir / ADAPTER_FILE, adapter.saved_tensors() if gathered is None else gathered, {"format": "pt"})

    def read_tensors(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """The saved deltas (`<module>.indices/.delta`) and trained tensors (`trained.<name>`) that merge
        and export read; empty for a method that keeps another library's format."""
        return read_adapter_tensors(run_dir)

    def merge_into(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """The base `model` with this run merged in, for methods whose saved tensors are not plain deltas."""
        raise SpartaError(f"{self.name} runs merge from their saved tensors, not through merge_into")


@dataclass
class Adapter:
    tuner: Tuner
    model: nn.Module  # the model to run (a PeftModel for lora/dora)
    base: nn.Module  # the transformers model underneath
    head_modules: list[str]
    base_params: int  # parameters of the base model before adaptation
    sparta: SpartaModel | None = None

    @property
    def method(self) -> str:
        return self.tuner.name

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        """The whole adapter's count, also when sharded (DTensors report their global size; the
        deltas are counted by the SpaRTA layers, whose local parameters may be a rank's slice)."""
        layers = self.sparta.layers.values() if self.sparta else []
        deltas = sum(layer.sparta_indices.numel() for layer in layers if layer.sparta_delta.requires_grad)
        return deltas + sum(p.numel() for name, p in self.trainable() if not name.endswith("sparta_delta"))

    def counts(self) -> dict[str, int]:
        """Trainable parameters per kind: each SpaRTA target, the head, the rest."""
        counts: dict[str, int] = dict(self.sparta.counts_by_target()) if self.sparta else {}
        head = sum(p.numel() for name, p in self.base.named_parameters() if p.requires_grad and in_modules(name, self.head_modules))
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
        from sparta_cli.sharding import full_tensor  # FSDP's DTensor shards, gathered

        tensors = self.sparta.state_tensors() if self.sparta else {}
        for name, param in self.base.named_parameters():
            if param.requires_grad and not name.endswith("sparta_delta"):
                tensors[TRAINED_PREFIX + name] = full_tensor(param.detach()).cpu().clone().contiguous()
        return tensors

    def save(self, run_dir: Path, metadata: dict[str, Any], tokenizer: Any = None,
             gathered: dict[str, torch.Tensor] | None = None) -> None:
        """The method's weight files and its adapter config, each atomic (`tokenizer` goes with a
        standalone checkpoint; `gathered`: the tuner's `gathered_for_save`, when the model is sharded)."""
        self.tuner.save_weights(self, run_dir, metadata, tokenizer, gathered)
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
        write_json(run_dir / self.tuner.config_file, config)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def in_modules(param_name: str, modules: list[str]) -> bool:
    return any(param_name == m or param_name.startswith(m + ".") for m in modules)


def freeze_all_but_heads(model: nn.Module, head_modules: list[str]) -> None:
    for name, param in model.named_parameters():
        param.requires_grad_(in_modules(name, head_modules))


# ---------------------------------------------------------------- putting a saved run onto a base


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


@torch.no_grad()
def load_trained(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the saved `trained.<name>` tensors into the model's parameters of the same name and shape."""
    params = dict(model.named_parameters())
    for key, value in tensors.items():
        if not key.startswith(TRAINED_PREFIX):
            continue
        name = key.removeprefix(TRAINED_PREFIX)
        if name not in params or params[name].shape != value.shape:
            raise SpartaError(f"adapter parameter `{name}` {list(value.shape)} does not fit this base model: load it on its own base")
        params[name].copy_(value)
