"""What every method shares: the `Tuner` interface and the `Adapter` it returns (runs.py names the run files).

A `Tuner` is one method (sparta, lora, dora, full, head) and says what it can do, so train,
merge, export, eval and report ask it instead of branching on the method's name; what a method
keeps of its own (SpaRTA's layers) only its tuner reads. Every method trains the classification
head fully, as SpaRTA does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
from torch import nn

from sparta_cli import FORMAT_VERSION, __version__
from sparta_cli.adapter_checks import damaged
from sparta_cli.dtensors import full_tensor
from sparta_cli.errors import SpartaError
from sparta_cli.fileio import write_json, write_safetensors
from sparta_cli.runs.layout import ADAPTER_FILE, CONFIG_FILE, TRAINED_PREFIX, read_adapter_config, read_adapter_tensors

if TYPE_CHECKING:
    from sparta_cli.tuners.config import MethodConfig
    from sparta_cli.tuners.sparta.model import SpartaModel


class Gathering(Protocol):
    """What a sharded model offers a tuner saving under FSDP (sharding.ShardedModel)."""

    def full_state_dict(self, module: nn.Module | None = None) -> dict[str, torch.Tensor]: ...


@dataclass(frozen=True)
class MeshRank:
    """This process's place in an FSDP2 mesh (sharding.shard), for a method that shards its own tensors."""

    rank: int
    world: int
    group: Any  # the mesh's process group
    device: torch.device  # where this rank's shards live


class OwnedShards(Protocol):
    """What a method shards itself beside FSDP (`Tuner.shard`; SpaRTA's deltas, split by the weights'
    rows): what FSDP must leave alone, and the conversions between whole tensors and this rank's parts
    that sharding.ShardedModel asks of them. `gather` is a collective: every rank calls it."""

    def ignored_params(self) -> set[nn.Parameter]: ...  # left out of `fully_shard`: already sharded

    def owns(self, tensor: torch.Tensor) -> bool: ...  # one of its sharded tensors (a parameter or buffer)

    def computed(self, tensor: torch.Tensor) -> bool: ...  # built alike on every rank, so never sent by rank 0

    def whole_shape(self, tensor: torch.Tensor) -> torch.Size: ...

    def gather(self, tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor: ...  # `value`, shaped like `tensor`, whole

    def part(self, tensor: torch.Tensor, whole: torch.Tensor) -> torch.Tensor: ...  # this rank's part of `whole`

    def check_layout(self) -> None: ...  # after `fully_shard`: the weights are split as it assumed

    def write_weights(self) -> None: ...  # after a load: what the forward reads follows its tensors


@dataclass
class Overwritten:
    """What `Tuner.apply_in_place` overwrote in a base model, kept to put it back bit for bit."""

    entries: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # weight -> (flat indices, values before)
    whole: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter -> the tensor it held before


class Tuner(ABC):
    """One training method: which parameters train, how they are saved, loaded, merged, exported."""

    config: ClassVar[type[MethodConfig]]  # its `adapter:` settings (tuners/<method>/config.py)
    export_formats: ClassVar[tuple[str, ...]] = ()  # `sparta export --format` values it supports
    # its saved tensors are deltas and trained tensors that add up with other runs' in one `sparta merge`
    # and write into a base in place (`apply_in_place`)
    adds_up: ClassVar[bool] = False
    peft_native: ClassVar[bool] = False  # saved as PEFT's own adapter files (under peft/)
    shardable: ClassVar[bool] = True  # trains under accelerate's FSDP / DeepSpeed ZeRO-3 plugins
    standalone: ClassVar[bool] = False  # its run folder is a whole transformers checkpoint (no base needed)
    trains_body: ClassVar[bool] = True  # False (head): only head modules train; for SFT that is the LM head
    config_file: ClassVar[str] = CONFIG_FILE  # where the run's adapter config is recorded

    @property
    def name(self) -> str:
        return self.config.name()

    @property
    def display_name(self) -> str:
        """How reports, plots and messages name it."""
        return self.config.display_name

    @property
    def config_keys(self) -> tuple[str, ...]:
        """The `adapter.*` keys it reads besides `method` and `seed`."""
        return tuple(key for key in self.config.model_fields if key not in ("method", "seed"))

    def resolve_settings(self, cfg: MethodConfig, model: nn.Module) -> MethodConfig:
        """The settings as they train on `model` (a loaded model or a meta-device skeleton): what only
        the model can fix resolved (SpaRTA: adapter.budget to its density); the settings themselves by default."""
        return cfg

    @abstractmethod
    def apply(self, model: nn.Module, cfg: MethodConfig, seed: int, head_modules: list[str]) -> Adapter:
        """Freeze `model` and make the method's parameters trainable, in place."""

    def load(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
        """Put a saved adapter onto a freshly loaded base model (same head size), for inference."""
        check_base_matches(config, model)
        base_params = count_params(model)
        load_trained(model, self.read_tensors(run_dir))
        return self._loaded(model, config, base_params)

    def _loaded(self, model: nn.Module, config: dict[str, Any], base_params: int, sparta: SpartaModel | None = None) -> Adapter:
        """A loaded adapter is for inference: nothing trains."""
        model.requires_grad_(False)
        return Adapter(self, model, model, list(config.get("head_modules", [])), base_params, sparta)

    # ------------------------------------------------------------ what an adapter holds

    def num_trainable(self, adapter: Adapter) -> int:
        """The whole adapter's count, also when sharded (DTensors report their global size)."""
        return sum(p.numel() for _, p in adapter.trainable())

    def counts_by_target(self, adapter: Adapter) -> dict[str, int]:
        """Trainable entries per target kind (`v`, `o`, ...), for methods that count them that way."""
        return {}

    def target_shapes(self, adapter: Adapter) -> dict[str, list[int]]:
        """The shape of every matrix it adapts, recorded so a load on another base is refused."""
        return {}

    def mask_digests(self, adapter: Adapter) -> dict[str, str]:
        """What a checkpoint must have trained (SpaRTA: a digest of each layer's indices), checked on resume."""
        return {}

    def saved_tensors(self, adapter: Adapter) -> dict[str, torch.Tensor]:
        """What its adapter file holds: the trained parameters as `trained.<name>`, whole, on CPU."""
        return trained_tensors(adapter)

    def follow_steps_of(self, adapter: Adapter, optimizer: torch.optim.Optimizer) -> None:
        """Register what must happen after each step of `optimizer` (SpaRTA writes W0 + delta into its weights)."""

    def write_weights(self, adapter: Adapter) -> None:
        """After trainable tensors were loaded in place (resume, best adapter): what the forward reads follows them."""

    def shard(self, adapter: Adapter, place: MeshRank) -> OwnedShards | None:
        """Under FSDP2, before `fully_shard`: turn what the method shards itself into this rank's part
        and return it (SpaRTA: its deltas, by the weights' rows), or None when FSDP shards all of it."""
        return None

    # ------------------------------------------------------------ files

    def gathered_for_save(self, adapter: Adapter, sharded: Gathering) -> dict[str, torch.Tensor]:
        """Under FSDP, what `save_weights` writes, gathered whole beforehand (a collective: every rank calls it)."""
        return adapter.saved_tensors()

    def save_weights(self, adapter: Adapter, run_dir: Path, metadata: dict[str, Any], tokenizer: Any = None,
                     gathered: dict[str, torch.Tensor] | None = None) -> None:
        """The trained tensors, atomically: deltas and fully trained parameters in one safetensors file
        (`gathered`: `gathered_for_save`'s tensors, when the model is sharded)."""
        write_safetensors(run_dir / ADAPTER_FILE, adapter.saved_tensors() if gathered is None else gathered, {"format": "pt"})

    def read_tensors(self, run_dir: Path) -> dict[str, torch.Tensor]:
        """The saved deltas (`<module>.indices/.delta`) and trained tensors (`trained.<name>`) that load,
        merge and export read, checked (`check_tensors`); empty for a method that keeps another library's format."""
        tensors = read_adapter_tensors(run_dir)
        self.check_tensors(tensors, read_adapter_config(run_dir), run_dir / ADAPTER_FILE)
        return tensors

    def check_tensors(self, tensors: dict[str, torch.Tensor], config: dict[str, Any], path: Path) -> None:
        """Refuse a damaged or edited adapter file before any of it is used: only trained tensors, all finite."""
        check_trained(tensors, path)

    # ------------------------------------------------------------ merge and serve

    def merged_in_memory(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> nn.Module | None:
        """The loaded base `model` with the run merged in by the method's own library (PEFT), or None
        when `sparta merge` adds the saved tensors itself (and can stream the base shard by shard)."""
        return None

    def merge_note(self, run_dir: Path, dtype_name: str) -> str | None:
        """What `sparta merge` tells about how it merged this method, if anything."""
        return None

    @torch.no_grad()
    def apply_in_place(self, model: nn.Module, tensors: dict[str, torch.Tensor]) -> Overwritten:
        """Write a saved adapter's values (`read_tensors`) into the plain base `model`, in place, and
        return what they replaced (`revert` puts it back bit for bit): switching adapters on one base
        in memory, with no copy of the model. The trained tensors (the head) take the place of the
        base's by reference, so a head of another size (a regression head beside a classifier's) fits."""
        if not self.adds_up:
            raise SpartaError(f"{self.name} adapters are not written into a base in place: merge the run with `sparta merge`")
        params = dict(model.named_parameters())
        trained = {key.removeprefix(TRAINED_PREFIX): value for key, value in tensors.items() if key.startswith(TRAINED_PREFIX)}
        missing = sorted(set(trained) - set(params))
        if missing:
            raise SpartaError(f"adapter parameter `{missing[0]}` is not in this base model: load it on its own base")
        overwritten = Overwritten(whole={name: params[name].data for name in trained})
        for name, value in trained.items():
            params[name].data = value.to(params[name].device)
        return overwritten

    @torch.no_grad()
    def revert(self, model: nn.Module, overwritten: Overwritten) -> None:
        """Put back what `apply_in_place` overwrote: the base as it was, bit for bit."""
        params = dict(model.named_parameters())
        for name, (indices, values) in overwritten.entries.items():
            params[name].view(-1).index_copy_(0, indices, values)
        for name, value in overwritten.whole.items():
            params[name].data = value


@dataclass
class Adapter:
    tuner: Tuner
    model: nn.Module  # the model to run (a PeftModel for lora/dora)
    base: nn.Module  # the transformers model underneath
    head_modules: list[str]
    base_params: int  # parameters of the base model before adaptation
    # SpaRTA's layers: read by tuners/sparta/ only (tests/test_method_interface.py checks)
    sparta: SpartaModel | None = None

    @property
    def method(self) -> str:
        return self.tuner.name

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(name, p) for name, p in self.model.named_parameters() if p.requires_grad]

    def num_trainable(self) -> int:
        return self.tuner.num_trainable(self)

    def counts(self) -> dict[str, int]:
        """Trainable parameters per kind: each SpaRTA target, the head, the rest."""
        counts = self.tuner.counts_by_target(self)
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
        return self.tuner.saved_tensors(self)

    def follow_steps_of(self, optimizer: torch.optim.Optimizer) -> None:
        """What the method does after each optimizer step, registered on `optimizer`."""
        self.tuner.follow_steps_of(self, optimizer)

    def write_weights(self) -> None:
        """After trainable tensors were loaded in place: what the forward reads follows them."""
        self.tuner.write_weights(self)

    def mask_digests(self) -> dict[str, str]:
        return self.tuner.mask_digests(self)

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
            "target_shapes": self.tuner.target_shapes(self),
            **metadata,
        }
        write_json(run_dir / self.tuner.config_file, config)


def check_trained(tensors: dict[str, torch.Tensor], path: Path, own: tuple[str, ...] = ()) -> None:
    """Every tensor is a finite `trained.<name>` or, by its name's ending (`own`), the method's own."""
    for key, value in tensors.items():
        if not (key.startswith(TRAINED_PREFIX) or (own and key.endswith(own))):
            raise damaged(path, f"unknown tensor `{key}`")
        if key.startswith(TRAINED_PREFIX) and value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise damaged(path, f"`{key}` holds inf or NaN")


def trained_tensors(adapter: Adapter, skip: str | None = None) -> dict[str, torch.Tensor]:
    """Every trained parameter (but those named `*<skip>`) as `trained.<name>`, whole (FSDP's shards gathered), on CPU."""
    return {TRAINED_PREFIX + name: full_tensor(param.detach()).cpu().clone().contiguous()
            for name, param in adapter.base.named_parameters() if param.requires_grad and not (skip and name.endswith(skip))}


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
