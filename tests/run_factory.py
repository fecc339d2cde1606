"""Run directories without training: a base model, an adapter with random deltas and head,
saved exactly as `sparta train` saves them (for merge and export tests, in seconds)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from sparta_cli.config import ModelConfig, Recipe, TaskConfig
from sparta_cli.fileio import write_json
from sparta_cli.models import load_for_classification
from sparta_cli.runs import ALL_RESULTS, read_adapter_config, write_run_config
from sparta_cli.tuners import apply_adapter, load_adapter, method_config

LABELS = ["negative", "positive"]


def save_tiny_llama(folder: Path, minilm_path: str, *, dtype=torch.float32, max_shard_size: str | None = None, hidden: int = 64) -> Path:
    """A random two-layer Llama causal LM checkpoint (with lm_head, like a real base) and
    MiniLM's tokenizer, whose 30,522 ids the vocabulary covers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=30522, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=128,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path) / name, folder / name)
    return folder


def make_run(run_dir: Path, base: str, *, targets=("v", "o"), density: float = 0.05, seed: int = 42,
             scale: float = 0.05, head_seed: int = 0, method: str = "sparta") -> Path:
    """A run on SST-2 labels whose trainable parameters (deltas, LoRA factors, head) get N(0, scale) noise."""
    settings = method_config(method)
    recipe = Recipe(model=ModelConfig(name_or_path=base), task=TaskConfig(name="sst2"), seed=seed, output_dir=str(run_dir),
                    adapter=settings(**settings.own_keys({"density": density, "targets": list(targets)})))
    loaded = load_for_classification(recipe.model, 2, LABELS, problem_type="single_label_classification")
    model = loaded.model
    model_dtype = next(model.parameters()).dtype
    adapter = apply_adapter(model, recipe.adapter, recipe.adapter_seed, loaded.head_modules)
    generator = torch.Generator().manual_seed(seed + head_seed)
    with torch.no_grad():
        for _, param in adapter.trainable():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * scale)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_run_config(run_dir, recipe, {"trainable_params": adapter.num_trainable()})
    adapter.save(run_dir, {
        "base_model": {"name_or_path": base, "resolved_path": loaded.source, "gguf_file": None, "revision": None,
                       "model_type": model.config.model_type, "architecture": type(model).__name__,
                       "dtype": str(model_dtype).removeprefix("torch.")},
        "density": density, "targets": list(targets), "seed": seed,
        "task": {"name": "sst2", "label_names": LABELS, "num_labels": 2, "is_regression": False},
        "pad_token_id": model.config.pad_token_id, "tokenizer": {"pad_token": loaded.tokenizer.pad_token},
    }, loaded.tokenizer)
    write_json(run_dir / ALL_RESULTS, {"eval_accuracy": 0.5, "train_loss": 0.69})
    return run_dir


@torch.no_grad()
def adapter_logits(run_dir: Path, batch: dict, *, base: str | None = None, dtype: str = "float32") -> torch.Tensor:
    """The base plus the saved adapter applied on the fly (sparta's own path)."""
    config = read_adapter_config(run_dir)
    cfg = ModelConfig(name_or_path=base or config["base_model"]["name_or_path"], dtype=dtype)
    task = config["task"]
    loaded = load_for_classification(cfg, task["num_labels"], task["label_names"], problem_type="single_label_classification")
    model = load_adapter(run_dir, loaded.model, config).model.eval()
    return model(**batch).logits


FRESH_PROCESS = """
import sys, torch
torch.set_num_threads(int(sys.argv[4]))
from transformers import AutoModelForSequenceClassification
model = AutoModelForSequenceClassification.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    logits = model(**torch.load(sys.argv[2])).logits
assert not [name for name in sys.modules if name.startswith("sparta")], "sparta was imported"
torch.save({"logits": logits, "dtype": str(next(model.parameters()).dtype)}, sys.argv[3])
"""


def fresh_process_logits(checkpoint: Path, batch: dict, tmp: Path) -> tuple[torch.Tensor, str]:
    """Logits of a checkpoint loaded by plain transformers in a new Python process (no sparta)."""
    torch.save(batch, tmp / "batch.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(checkpoint), str(tmp / "batch.pt"), str(tmp / "out.pt"),
                    str(torch.get_num_threads())], check=True, env=env, cwd=tmp)
    out = torch.load(tmp / "out.pt")
    return out["logits"], out["dtype"]


def text_batch(tokenizer_dir: str | Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = ["a gripping, beautifully made film", "dull and far too long", "it is what it is, nothing more or less than that"]
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))
