"""Full fine-tuning: every parameter of the model trains (the reference the sparse methods aim at).

A full run saves what every other tool loads: a plain transformers checkpoint (`save_pretrained`,
with the tokenizer, id2label/label2id and `finetuning_task`) in the run folder, not an adapter
file that only sparta reads. Its adapter config goes to sparta_config.json, because transformers
treats an adapter_config.json next to config.json as a PEFT adapter to load.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import checkpoint_files, ordinary_permissions
from sparta_cli.models import forget_gguf_quantizer
from sparta_cli.runs.layout import CHECKPOINT_CONFIG_FILE
from sparta_cli.tuners.base import Adapter, Tuner, check_base_matches, count_params
from sparta_cli.tuners.full.config import FullConfig

if TYPE_CHECKING:
    from sparta_cli.tuners.base import Gathering


class FullTuner(Tuner):
    config = FullConfig
    standalone = True
    config_file = CHECKPOINT_CONFIG_FILE

    def apply(self, model: nn.Module, cfg: FullConfig, seed: int, head_modules: list[str]) -> Adapter:
        model.requires_grad_(True)
        return Adapter(self, model, model, head_modules, count_params(model))

    def gathered_for_save(self, adapter: Adapter, sharded: Gathering) -> dict[str, torch.Tensor]:
        return sharded.full_state_dict(adapter.base)

    def save_weights(self, adapter: Adapter, run_dir: Path, metadata: dict[str, Any], tokenizer: Any = None,
                     gathered: dict[str, torch.Tensor] | None = None) -> None:
        """`save_pretrained` of the model (and tokenizer) into a temporary folder, then each file
        renamed into the run folder: a kill leaves the previous file or the new one. Sharded, the
        weights written are `gathered` (the whole state dict)."""
        model = adapter.base
        forget_gguf_quantizer(model)
        model.config.finetuning_task = (metadata.get("task") or {}).get("name")  # `sparta eval` scores this task
        model.config.architectures = [type(model).__name__]
        staging = Path(tempfile.mkdtemp(prefix=".checkpoint.", suffix=".tmp", dir=run_dir))
        try:
            model.save_pretrained(staging, state_dict=gathered)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(staging))
            ordinary_permissions(staging)
            for path in staging.iterdir():
                os.replace(path, run_dir / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def read_tensors(self, run_dir: Path) -> dict[str, torch.Tensor]:
        return {}  # the run folder is the checkpoint: merge copies it

    def merge_note(self, run_dir: Path, dtype_name: str) -> str:
        return f"{run_dir} is a {self.name} run, already a whole checkpoint: copied, in {dtype_name}"

    @torch.no_grad()
    def load(self, run_dir: Path, model: nn.Module, config: dict[str, Any]) -> Adapter:
        """Every tensor of the run's checkpoint copied into the freshly loaded base (same names)."""
        from safetensors.torch import load_file

        check_base_matches(config, model)
        base_params = count_params(model)
        files = checkpoint_files(run_dir)
        if files is None:
            raise SpartaError(f"{run_dir} has no model.safetensors: not a finished full fine-tuning run (retrain it)")
        state = model.state_dict()
        loaded: set[str] = set()
        for path in files:
            for name, value in load_file(str(path)).items():
                if name not in state or state[name].shape != value.shape:
                    raise SpartaError(f"`{name}` {list(value.shape)} in {path} does not fit this base model: load it on its own base")
                state[name].copy_(value)
                loaded.add(name)
        storage = {state[name].data_ptr() for name in loaded}
        missing = [name for name, p in model.named_parameters() if name not in loaded and p.data_ptr() not in storage]
        if missing:
            raise SpartaError(f"{run_dir} lacks {len(missing)} trained weight(s) (e.g. `{missing[0]}`): the checkpoint is incomplete; retrain it")
        return self._loaded(model, config, base_params)
