"""LoRA / DoRA: PEFT's low-rank adapters on the target matrices, plus the head (PEFT's modules_to_save)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import replace_dir
from sparta_cli.runs.layout import PEFT_DIR
from sparta_cli.targets import resolve_targets
from sparta_cli.tuners.base import Adapter, Tuner, count_params, freeze_all_but_heads
from sparta_cli.tuners.lora.config import DoraConfig, LoraConfig

if TYPE_CHECKING:
    from sparta_cli.tuners.base import Gathering


class LoraTuner(Tuner):
    config = LoraConfig
    export_formats = ("peft",)
    peft_native = True

    def apply(self, model: nn.Module, cfg: LoraConfig, seed: int, head_modules: list[str]) -> Adapter:
        base_params = count_params(model)
        freeze_all_but_heads(model, head_modules)
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SpartaError(f"adapter.method={cfg.method} needs PEFT: pip install 'sparta[peft]'") from None
        peft_config = LoraConfig(
            r=cfg.r,
            lora_alpha=cfg.alpha,
            lora_dropout=cfg.dropout,
            target_modules=list(resolve_targets(model, cfg.targets)),
            use_dora=self.name == "dora",
            modules_to_save=head_modules,
        )
        return Adapter(self, get_peft_model(model, peft_config), model, head_modules, base_params)

    def load(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
        from peft import PeftModel

        base_params = count_params(model)
        peft_model = PeftModel.from_pretrained(model, str(run_dir / PEFT_DIR))
        return Adapter(self, peft_model, model, list(config.get("head_modules", [])), base_params)

    def gathered_for_save(self, adapter: Adapter, sharded: Gathering) -> dict[str, torch.Tensor]:
        return sharded.full_state_dict(adapter.model)  # PEFT keeps the adapter's keys of it

    def save_weights(self, adapter: Adapter, run_dir: Path, metadata: dict[str, Any], tokenizer: Any = None,
                     gathered: dict[str, torch.Tensor] | None = None) -> None:
        replace_dir(lambda tmp: adapter.model.save_pretrained(str(tmp), state_dict=gathered), run_dir / PEFT_DIR)

    def read_tensors(self, run_dir: Path) -> dict[str, torch.Tensor]:
        return {}  # PEFT's own files: merge goes through merged_in_memory, export copies them

    def merged_in_memory(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> nn.Module:
        """PEFT's merge_and_unload of the saved adapter into the loaded base."""
        return self.load(run_dir, model, config).model.merge_and_unload()

    def merge_note(self, run_dir: Path, dtype_name: str) -> str:
        return f"{self.display_name} weights merged by PEFT's merge_and_unload, with the base loaded whole"


class DoraTuner(LoraTuner):
    config = DoraConfig
