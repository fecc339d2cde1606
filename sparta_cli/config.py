"""The recipe: a YAML file validated by pydantic, with `key=value` overrides.

The names here are the contract with users' recipe files; unknown keys are rejected
with the closest valid key, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, Discriminator, Field, PrivateAttr, Tag, ValidationError, field_validator, model_serializer, model_validator
from pydantic_core import PydanticUndefined

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import YamlRefused, input_file, parse_yaml, read_bytes
from sparta_cli.strict import SEED_LIMIT
from sparta_cli.strict import Strict as _Strict
from sparta_cli.tuners import METHODS, get_tuner, reader_of
from sparta_cli.tuners.config import MethodConfig
from sparta_cli.tuners.sparta.config import SpartaConfig

__all__ = ["SEED_LIMIT", "AdapterConfig", "Recipe"]


class ModelConfig(_Strict):
    name_or_path: str
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # never read from a file or written to one: only `--trust-remote-code` on the command line sets it
    trust_remote_code: bool = Field(False, exclude=True)


def _method_of(section: Any) -> Any:
    """The method a section names (sparta when it names none); None for what is no section."""
    if isinstance(section, dict):
        return section.get("method", "sparta")
    return section.method if isinstance(section, MethodConfig) else None


# `adapter:`: one method's settings (tuners/<method>/config.py), picked by `method`, so a key of
# another method is refused by the chosen method's own model (`_describe` says which method reads it)
AdapterConfig = Annotated[Union[tuple(Annotated[config, Tag(name)] for name, config in METHODS.items())],  # noqa: UP007
                          Discriminator(_method_of)]
# every method's keys, in the order the methods are listed (for the closest key to a typo)
ADAPTER_KEYS = list(dict.fromkeys(key for config in METHODS.values() for key in config.model_fields))


# each kind's own task keys and their defaults: the other kind's must keep these (TaskConfig._named_or_custom)
CLASSIFICATION_KEYS: dict[str, Any] = {"text_fields": None, "label_field": "label", "head": "classifier", "shots": 0}
SFT_KEYS: dict[str, Any] = {"format": None, "chat_template": None, "loss_on": None, "instruction": None, "generation_metrics": False}


class TaskConfig(_Strict):
    name: str | None = None
    # your own data (name null or a label of your choosing); sft: a causal LM learns to write the answers
    type: Literal["classification", "regression", "sft"] | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    text_fields: list[str] | None = None
    label_field: str = "label"
    train_split: str | None = None  # the split `sparta train` trains on; null: train (mmlu has only dev locally)
    # MMLU
    head: Literal["classifier", "lm"] = "classifier"
    shots: int = Field(0, ge=0, le=5)
    # sft (docs/sft.md): null keys take their default, so a classification recipe never holds them
    format: Literal["chat", "prompt_completion", "text"] | None = None  # null: read from the rows' fields
    chat_template: str | None = None  # a Jinja file, for a tokenizer without a chat template
    loss_on: Literal["assistant", "last_assistant", "all"] | None = None  # null: assistant
    instruction: str | None = None  # sst2 / mmlu as chat: the text before each row (null: the task's own)
    generation_metrics: bool = False  # greedy answers on validation prompts, scored by exact match and ROUGE-L

    @model_validator(mode="after")
    def _named_or_custom(self) -> TaskConfig:
        if self.type is None and self.name is None:
            raise ValueError(
                "task needs `name` (e.g. sst2) or, for your own data, "
                "`type`, `train_file` and `text_fields`"
            )
        if self.type == "sft":
            for key in self._set_keys(CLASSIFICATION_KEYS):
                raise ValueError(f"task.{key} does not apply to task.type: sft (its rows are chat, prompt_completion or "
                                 "text records, docs/sft.md): remove it")
            if self.name is None and not self.from_files:
                raise ValueError("task.type: sft needs task.train_file (and task.validation_file), or task.name: sst2 or mmlu "
                                 "for a built-in task as chat")
        else:
            for key in self._set_keys(SFT_KEYS):
                raise ValueError(f"task.{key} is task.type: sft's and does not apply to "
                                 f"{'task.type: ' + self.type if self.type else 'task ' + str(self.name)}: "
                                 "remove it, or set task.type: sft")
        if self.type in ("classification", "regression"):
            if not self.train_file and not self.validation_file:
                raise ValueError("a custom task (task.type set) needs task.train_file or task.validation_file")
            if not self.text_fields:
                raise ValueError("a custom task (task.type set) needs task.text_fields, e.g. [sentence]")
        return self

    @model_serializer(mode="wrap")
    def _without_classification_keys(self, handler) -> dict[str, Any]:
        """An SFT run's config.yaml holds no classifier head or label field (the validator keeps them at
        their defaults). A classification run's record stays as it has been since SFT came, its SFT keys null."""
        data = handler(self)
        if self.type == "sft":
            for key in CLASSIFICATION_KEYS:
                data.pop(key, None)
        return data

    def _set_keys(self, defaults: dict[str, Any]) -> list[str]:
        """The keys of `defaults` set to something else: another kind of task's keys, refused (never ignored)."""
        return [key for key, default in defaults.items() if getattr(self, key) != default]

    @property
    def from_files(self) -> bool:
        """A custom task: its splits are the recipe's own files."""
        return self.type is not None and bool(self.train_file or self.validation_file or self.test_file)

    @property
    def label(self) -> str:
        """Name used in paths and reports."""
        return self.name or "custom"


class DataConfig(_Strict):
    dir: str | None = None  # null: $SPARTA_DATA_DIR, else the Hugging Face Hub
    max_length: int = Field(128, ge=8)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    overlong: Literal["truncate", "drop"] = "truncate"
    cache: bool = True
    # held out of the training rows (after max_train_samples) with the run's seed, for model selection:
    # a fraction (< 1) or a count (>= 1); null: evaluate on the task's evaluation split(s) as before
    validation_size: int | float | None = Field(None, gt=0)
    packing: bool = False  # sft: training rows packed end to end into max_length sequences (docs/sft.md)

    @model_validator(mode="after")
    def _whole_count(self) -> DataConfig:
        size = self.validation_size
        if size is not None and size >= 1 and size != int(size):
            raise ValueError(f"data.validation_size = {size}: give a fraction below 1 (e.g. 0.1) or a whole number of rows (e.g. 500)")
        return self


class TrainingConfig(_Strict):
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(16, ge=1)
    eval_batch_size: int = Field(64, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float | Literal["auto"] = 5.0e-5  # auto: sparta_cli.lr_rule's rate, resolved by Recipe.resolve_lr
    head_lr: float | None = Field(None, gt=0.0)  # null: same as lr
    weight_decay: float = Field(0.0, ge=0.0)
    optimizer: Literal["auto", "adamw", "adamw_fused", "sgd"] = "auto"  # auto: adamw_fused on CUDA, adamw on CPU
    warmup_steps: int = Field(0, ge=0)
    scheduler: Literal["linear", "cosine", "constant"] = "linear"
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    eval_every: int | None = Field(None, ge=1)
    log_every: int = Field(10, ge=1)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    gradient_checkpointing: bool = False
    save_every: int | None = Field(None, ge=1)
    keep_checkpoints: int | None = Field(None, ge=1)
    # model selection on data.validation_size's held-out rows
    best_metric: str | None = None  # null: the task's main metric; `loss` (lower is better) or any metric it reports
    early_stopping_patience: int | None = Field(None, ge=1)  # evaluations without improvement before stopping
    eval_generate_samples: int | None = Field(None, ge=1)  # sft with task.generation_metrics: validation prompts answered
    # fsdp: frozen weights sharded by FSDP2 and SpaRTA deltas by the same rows (torchrun; docs/scaling.md)
    sharding: Literal["none", "fsdp"] = "none"

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _no_is_a_word(cls, value: Any) -> Any:
        """YAML reads a bare `no` (recipe or `training.mixed_precision=no`) as false: it means "no", as in Accelerate."""
        return "no" if value is False else value

    @field_validator("lr", mode="before")
    @classmethod
    def _rate_or_auto(cls, value: Any) -> Any:
        if value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0):
            return value
        raise ValueError("training.lr must be a positive number (e.g. 2e-3) or auto (the rule of docs/learning_rates.md)")

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        if self.keep_checkpoints is not None and self.save_every is None:
            raise ValueError(
                "training.keep_checkpoints is set but training.save_every is not, so no checkpoint is written: "
                "set training.save_every (steps between checkpoints) or drop keep_checkpoints"
            )
        return self


class LoggingConfig(_Strict):
    tensorboard: bool = False
    wandb: bool = False


# MMLU's default data.max_length (128 cut 22% of 0-shot prompts, every 5-shot one): measured on its 1,531 val prompts with
# MiniLM's (BERT) tokenizer, 0-shot prompts are at most 756 tokens (99th percentile 442), 5-shot
# ones at most 2,919 (99th percentile 2,647; scripts/mmlu_prompt_lengths.py, BENCHMARKS.md).
MMLU_MAX_LENGTH = 512
MMLU_MAX_LENGTH_SHOTS = 3072

# `${name}`: the method with the setting that sizes it and the seed (sparta-d0.01-s42, lora-r16-s42,
# full-s42), so runs that differ in that setting never share a folder.
DEFAULT_OUTPUT_DIR = "runs/${task.name}/${name}"

def read_by_another_method(key: str, method: str) -> bool:
    """Whether `adapter.<key>` is a key some method reads but `method` does not (a density given to
    LoRA is refused, not ignored without a word)."""
    return reader_of(key) is not None and key not in METHODS[method].model_fields


class Recipe(_Strict):
    model: ModelConfig
    adapter: AdapterConfig = Field(default_factory=SpartaConfig)
    task: TaskConfig
    data: DataConfig = Field(default_factory=DataConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    seed: int = Field(42, ge=0, lt=SEED_LIMIT)
    output_dir: str = DEFAULT_OUTPUT_DIR
    _lr_auto: bool = PrivateAttr(False)  # training.lr was `auto`: the value is the rule's (printed by train)
    _max_length_default: bool = PrivateAttr(False)  # data.max_length is MMLU's default, not the user's: it may be capped

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if not self.output_dir.strip():  # an empty path is the current folder
            raise ValueError("output_dir is empty: name the run's folder, e.g. output_dir=runs/${task.name}/${name}")
        selection = [key for key in ("best_metric", "early_stopping_patience") if getattr(self.training, key) is not None]
        if selection and self.data.validation_size is None:
            raise ValueError(
                f"training.{selection[0]} selects on a held-out validation set, but data.validation_size is not set: "
                "set data.validation_size (e.g. 0.1 or 500) or drop it"
            )
        if self.training.early_stopping_patience is not None and self.training.eval_every is None:
            raise ValueError(
                "training.early_stopping_patience counts evaluations, but training.eval_every is not set: "
                "set training.eval_every (steps between evaluations) or drop early_stopping_patience"
            )
        sft = self.task.type == "sft"
        if self.data.packing and not sft:
            raise ValueError("data.packing is task.type: sft's (it packs rows end to end) and does not apply to this task: remove it")
        if self.training.eval_generate_samples is not None and not self.task.generation_metrics:
            raise ValueError("training.eval_generate_samples is set but task.generation_metrics is not: "
                             "set task.generation_metrics: true (task.type: sft) or drop eval_generate_samples")
        if (self.training.eval_every and self.task.from_files and not self.task.validation_file
                and self.data.validation_size is None):
            raise ValueError(
                "training.eval_every is set but the custom task has no task.validation_file to evaluate on: "
                "add a validation file, set data.validation_size, or drop eval_every"
            )
        return self

    def resolve_lr(self) -> None:
        """`training.lr: auto` as the method's rate, once its settings give one: a SpaRTA budget gives its
        density, and so its rate, only against the model (`resolve_adapter`)."""
        if self.training.lr == "auto" and (lr := self.adapter.auto_lr()) is not None:
            self.training.lr = lr

    def resolve_adapter(self, model) -> None:
        """The adapter settings as they train on `model` (a loaded model or a meta-device skeleton): what
        only the model fixes (SpaRTA's budget -> density), then the rate `auto` gives them."""
        self.adapter = get_tuner(self.adapter.method).resolve_settings(self.adapter, model)
        self.resolve_lr()

    @property
    def lr_from_rule(self) -> bool:
        """True when the recipe said `training.lr: auto` and the rule chose training.lr."""
        return self._lr_auto

    @property
    def max_length_is_default(self) -> bool:
        """True when data.max_length is MMLU's default rather than the user's (models.fit_max_length caps it)."""
        return self._max_length_default

    @property
    def adapter_seed(self) -> int:
        return self.seed if self.adapter.seed is None else self.adapter.seed

    def data_dir(self) -> Path | None:
        """`data.dir`, else `$SPARTA_DATA_DIR`, else None (the Hub)."""
        chosen = self.data.dir or os.environ.get("SPARTA_DATA_DIR")
        return user_path(chosen, "data.dir") if chosen else None

    def to_dict(self) -> dict[str, Any]:
        """The recipe as plain data: the adapter's are its method's keys only (others would reload as mistakes)."""
        return self.model_dump(mode="json")

    @property
    def run_name(self) -> str:
        """The method, the setting that sizes it, and the seed: sparta-d0.01-s42, lora-r16-s42, full-s42."""
        return f"{self.adapter.method}{self.adapter.name_setting()}-s{self.seed}"


# ---------------------------------------------------------------- loading


def user_path(text: str, setting: str) -> Path:
    """`text` with `~` expanded; a `~name` that is no user here is the recipe's mistake, not a crash."""
    try:
        return Path(text).expanduser()
    except RuntimeError:
        raise SpartaError(f"{setting} = {text}: `{text.split('/')[0]}` is no user's home on this machine: write the full path") from None


def _closest(name: str, choices: list[str]) -> str | None:
    found = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    return found[0] if found else None


def _section(model: Any, part: str, method: str) -> Any:
    """The model of section `part` of `model` (`adapter`: the settings of `method`), or None."""
    if model is Recipe and part == "adapter":
        return METHODS.get(method)
    annotation = getattr(getattr(model, "model_fields", {}).get(part), "annotation", None)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _fields_at(loc: tuple[Any, ...], method: str) -> list[str]:
    """Valid key names of the section a validation error points into (the adapter's: every method's,
    so a typo finds its key whichever method reads it)."""
    if tuple(loc[:-1]) == ("adapter",):
        return ADAPTER_KEYS
    model: Any = Recipe
    for part in loc[:-1]:
        model = _section(model, str(part), method)
        if model is None:
            return []
    return list(model.model_fields)


# Names from the Hugging Face Trainer / PEFT that users bring along, and sparta's key for each.
HF_NAMES: dict[str, str] = {
    "learning_rate": "training.lr",
    "per_device_train_batch_size": "training.batch_size",
    "train_batch_size": "training.batch_size",
    "per_device_eval_batch_size": "training.eval_batch_size",
    "num_train_epochs": "training.epochs",
    "warmup_ratio": "training.warmup_steps (a number of steps, not a ratio)",
    "gradient_accumulation_steps": "training.grad_accum",
    "lr_scheduler_type": "training.scheduler",
    "logging_steps": "training.log_every",
    "eval_steps": "training.eval_every",
    "evaluation_strategy": "training.eval_every (steps between evaluations)",
    "eval_strategy": "training.eval_every (steps between evaluations)",
    "save_steps": "training.save_every",
    "save_total_limit": "training.keep_checkpoints",
    "bf16": "training.mixed_precision=bf16",
    "fp16": "training.mixed_precision=fp16",
    "model_name_or_path": "model.name_or_path",
    "torch_dtype": "model.dtype",
    "max_seq_length": "data.max_length",
    "dataset_name": "task.name",
    "target_modules": "adapter.targets",
    "lora_r": "adapter.r",
    "lora_alpha": "adapter.alpha",
    "lora_dropout": "adapter.dropout",
    "report_to": "logging.tensorboard or logging.wandb",
}
# Keys that live in another section than the one written (`lr:` at the top, `density:` under training).
_SECTION_OF = {name: section for section, fields in (("model", ModelConfig.model_fields), ("adapter", ADAPTER_KEYS),
                                                     ("task", TaskConfig.model_fields), ("data", DataConfig.model_fields),
                                                     ("training", TrainingConfig.model_fields), ("logging", LoggingConfig.model_fields))
               for name in fields}


def _example(loc: tuple[Any, ...], given: Any, kind: str, method: str) -> str:
    """An example of the form a key takes, written as an override: `adapter.targets=[v,o]`."""
    where = ".".join(str(p) for p in loc)
    if kind == "list_type":
        items = [part.strip() for part in given.split(",")] if isinstance(given, str) else [str(given)]
        return f"write a list, e.g. {where}=[{','.join(items)}] (in YAML: `{loc[-1]}: [{', '.join(items)}]`)"
    field = _field_at(loc, method)
    default = getattr(field, "default", None)
    if default is None or isinstance(default, (dict, list)) or not isinstance(default, (bool, int, float, str)):
        return ""
    form = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[type(default)]
    return f"write {form}, e.g. {where}={str(default).lower() if isinstance(default, bool) else default}"


def _field_at(loc: tuple[Any, ...], method: str) -> Any:
    model: Any = Recipe
    field = None
    for part in loc:
        field = getattr(model, "model_fields", {}).get(str(part))
        if field is None:
            return None
        model = _section(model, str(part), method)
    return field


def default_of(section: str, key: str, method: str = "sparta") -> Any:
    """The default of recipe key `section.key` (None for a key with no default, or none such): what a
    run written before the key existed trained with."""
    field = _field_at((section, key), method)
    default = getattr(field, "default", None)
    return None if default is PydanticUndefined else default


UNRESOLVED = {("adapter.density", None), ("training.lr", "auto")}  # what Recipe.resolve_adapter fills in at load


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(dotted key, value there, value now) for every recipe key whose value differs from a saved
    recipe's; a key the saved recipe lacks, added to sparta since, held its default there. A value the
    model has yet to resolve (a budget's density, the rate `auto` gives it) matches what the run resolved."""
    method = (saved.get("adapter") or {}).get("method", "sparta")

    def there(section: str, key: str) -> Any:
        recorded = saved.get(section) or {}
        return recorded[key] if key in recorded else default_of(section, key, method)

    keys = [(f"{section}.{key}", there(section, key), value)
            for section in now if isinstance(now[section], dict) for key, value in now[section].items()]
    keys += [(key, saved.get(key), now.get(key)) for key in ("seed",)]
    return [(name, old, new) for name, old, new in sorted(keys, key=lambda k: k[0]) if old != new and (name, new) not in UNRESOLVED]


def recipe_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """`section.key: OLD there, NEW now` for each key `changed_keys` finds."""
    return [f"{name}: {old!r} there, {new!r} now" for name, old, new in changed_keys(saved, now)]


def _describe(error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    method = "sparta"
    if loc[:1] == ("adapter",) and len(loc) > 1 and loc[1] in METHODS:  # the union's tag: not a key the user wrote
        method, loc = str(loc[1]), (loc[0], *loc[2:])
    where = ".".join(str(p) for p in loc) or "recipe"
    if error["type"] in ("union_tag_invalid", "union_tag_not_found") and isinstance(error["input"], dict):  # an unknown adapter.method
        given = error["input"].get("method")
        return f"invalid `{where}.method` = {_short(repr(given))}: Input should be {_choices(list(METHODS))}"
    if error["type"] == "extra_forbidden" and loc[:1] == ("adapter",) and len(loc) == 2 and read_by_another_method(str(loc[1]), method):
        key = str(loc[1])
        use = reader_of(key).model_fields[key].description
        return f"adapter.{key} ({use}) does not apply to adapter.method={method}: remove it ({METHODS[method].size_text})"
    if error["type"] == "extra_forbidden":
        if str(loc[-1]) in HF_NAMES:
            return f"unknown key `{where}` in the recipe: `{loc[-1]}` is the Hugging Face Trainer's name; sparta's is {HF_NAMES[str(loc[-1])]}"
        if len(loc) > 1 and str(loc[-1]) in Recipe.model_fields:
            return f"unknown key `{where}` in the recipe: `{loc[-1]}` belongs at the top level of the recipe, not under `{loc[0]}`"
        section = _SECTION_OF.get(str(loc[-1]))
        if section and (len(loc) == 1 or str(loc[0]) != section):
            return f"unknown key `{where}` in the recipe: did you mean `{section}.{loc[-1]}`?"
        hint = _closest(str(loc[-1]), _fields_at(loc, method))
        valid = ", ".join(_fields_at(loc, method))
        fix = f"did you mean `{hint}`?" if hint else f"valid keys: {valid}"
        return f"unknown key `{where}` in the recipe: {fix}"
    if error["type"] == "missing":
        return f"the recipe is missing `{where}`: add it (see configs/ for examples)"
    given = error.get("input")
    shown = "a mapping" if isinstance(given, dict) else _short(repr(given))
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] in ("model_type", "model_attributes_type", "dict_type", "union_tag_not_found"):
        return f"`{where}` in the recipe must be a section of `key: value` lines, not {shown}: see configs/ for examples"
    if error["type"] == "value_error" and isinstance(given, dict):  # a section's own check names its keys
        return message
    if error["type"].endswith(("_type", "_parsing")):
        example = _example(loc, given, error["type"], method)
        return f"invalid `{where}` = {shown}: {message}" + (f"; {example}" if example else "")
    return f"invalid `{where}` = {shown}: {message}"


def _choices(names: list[str]) -> str:
    """'a', 'b' or 'c': as pydantic lists a literal's values."""
    quoted = [repr(name) for name in names]
    return f"{', '.join(quoted[:-1])} or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SpartaError(f"override `{dotted}`: `{part}` is not a section; use a dotted key such as adapter.density=0.005")
        node = child
    node[parts[-1]] = value


MAX_OVERRIDE_CHARS = 10_000
_OVERRIDE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)=(.*)$", re.S)


def parse_override(text: str) -> tuple[str, Any]:
    """`adapter.density=0.005` -> ("adapter.density", 0.005); values are typed like YAML."""
    match = _OVERRIDE.match(text)
    if not match:
        raise SpartaError(f"malformed override `{text}`: write dotted key=value, e.g. adapter.density=0.005")
    key, raw = match.groups()
    if len(raw) > MAX_OVERRIDE_CHARS:
        raise SpartaError(f"override `{key}` has a value of {len(raw):,} characters: at most {MAX_OVERRIDE_CHARS:,}; "
                          "put long values in the recipe file")
    try:
        value = parse_yaml(raw) if raw.strip() else None
    except YamlRefused as exc:
        raise SpartaError(f"override `{key}`: {exc}") from None
    except RecursionError:
        raise SpartaError(f"override `{key}` is nested too deeply to read: give a plain value or a short list") from None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _yaml_float(value)
    return key, value


def _yaml_float(text: str) -> Any:
    """PyYAML reads `1e-4` as a string (YAML 1.1); users mean a float."""
    try:
        return float(text) if re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", text) else text
    except ValueError:
        return text


def _floats_everywhere(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _floats_everywhere(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_floats_everywhere(v) for v in node]
    return _yaml_float(node) if isinstance(node, str) else node


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a run's config.yaml a few thousand


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SpartaError(f"recipe not found: {path} (give the path to a YAML file, e.g. configs/quickstart.yaml)")
    if path.is_dir():
        raise SpartaError(f"recipe {path} is a folder: give the path to a YAML file")
    # a FIFO or a device is named, never read: reading one blocks, or never ends (/dev/zero)
    input_file(path, f"recipe not found: {path}", "give the path to a YAML file", setting="recipe ")
    if path.stat().st_size > MAX_RECIPE_BYTES:  # parsing megabytes of YAML takes minutes: not a recipe
        raise SpartaError(f"recipe {path} is {path.stat().st_size:,} bytes, past the {MAX_RECIPE_BYTES:,} a recipe needs: "
                          "give the recipe's YAML file, not a data file")
    try:
        text = read_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise SpartaError(f"recipe {path} is not UTF-8 text: save it as UTF-8") from None
    try:
        data = parse_yaml(text)
    except YamlRefused as exc:
        raise SpartaError(f"recipe {path}: {exc}") from None
    except RecursionError:
        raise SpartaError(f"recipe {path} is nested too deeply to read: a recipe is sections of key: value lines") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "syntax error"
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SpartaError(f"YAML syntax error in {path}{where}: {problem}; fix the file") from None
    if data is None:
        raise SpartaError(f"recipe {path} is empty: it needs at least model and task")
    if not isinstance(data, dict):
        raise SpartaError(f"recipe {path} must be a mapping of sections (model:, task:, ...), not a {type(data).__name__}")
    return _floats_everywhere(data)


_INTERPOLATION = re.compile(r"\$\{([^}]+)\}")


def _interpolate(template: str, values: dict[str, Any], chain: tuple[str, ...] = ("output_dir",)) -> str:
    """`${key}` replaced by the recipe's value of key; a value that holds `${...}` itself is resolved
    in turn, and a key that leads back to one on its way (`output_dir: ${output_dir}/x`) is refused."""
    def lookup(match: re.Match[str]) -> str:
        node: Any = values
        key = match.group(1)
        if key in chain:
            path = " -> ".join(f"${{{k}}}" if i else k for i, k in enumerate((*chain, key)))
            raise SpartaError(f"output_dir refers to itself ({path}): a `${{...}}` cannot lead back to a key on its way; "
                              "write that part out, e.g. output_dir=runs/${task.name}/${name}")
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                method = values["adapter"]["method"]
                if key.startswith("adapter.") and read_by_another_method(key.removeprefix("adapter."), method):
                    raise SpartaError(f"output_dir uses `${{{key}}}`, which adapter.method={method} does not have: "
                                      "use ${name} (the method and its settings, e.g. lora-r16-s42)")
                raise SpartaError(f"output_dir refers to unknown `${{{key}}}`: use keys of the recipe, e.g. ${{task.name}}, "
                                  "or ${name} (the method and its settings, e.g. sparta-d0.01-s42)")
            node = node[part]
        if isinstance(node, str) and _INTERPOLATION.search(node):
            return _interpolate(node, values, (*chain, key))
        return str(node if node is not None else "custom")

    return _INTERPOLATION.sub(lookup, template)


def _drop_trust_remote_code(tree: dict[str, Any], trusted: bool) -> None:
    """A recipe, a run's config.yaml or an override never turns remote code on: only the person,
    with `--trust-remote-code` on that command's line. An old config's `false` is harmless."""
    model = tree.get("model")
    if not isinstance(model, dict) or "trust_remote_code" not in model:
        return
    model = tree["model"] = dict(model)
    if model.pop("trust_remote_code") not in (False, None) and not trusted:
        raise SpartaError("the recipe sets model.trust_remote_code, but sparta never runs a model's own Python code because a "
                          "file says so: remove the key, and if you trust that model say so on the command line "
                          "(`sparta train RECIPE --trust-remote-code`; eval, generate, merge and export take it too)")


def build_recipe(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), *, trust_remote_code: bool = False) -> Recipe:
    """Validate a raw recipe mapping after applying `key=value` overrides.

    A run's config.yaml is a recipe too: its `run:` section (versions, world size, command)
    records where it came from and is not part of the recipe; a `tune:` section is `sparta tune`'s
    search over the recipe, so the same file also trains as is."""
    tree = copy.deepcopy(raw)  # overrides edit nested sections: never the caller's mapping
    from_run = tree.pop("run", None) is not None
    tree.pop("tune", None)
    overridden: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        set_dotted(tree, key, value)
        overridden.add(key)
    _drop_keys_of_the_old_method(tree, overridden, from_run)
    _drop_alternatives_of_overridden(tree, overridden)
    _drop_trust_remote_code(tree, trust_remote_code)
    if trust_remote_code and isinstance(tree.get("model"), dict):
        tree["model"] = {**tree["model"], "trust_remote_code": True}
    try:
        # a run's config.yaml records what the run resolved (SpaRTA's budget beside the density it gave)
        recipe = Recipe.model_validate(tree, context={"recorded": from_run})
    except ValidationError as exc:
        # an unknown key first: `modle:` also makes `model` missing, and the typo is the cause
        first = min(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise SpartaError(_describe(first)) from None
    if recipe.training.lr == "auto":  # config.yaml records the number, so a rerun of it trains at the same rate
        recipe._lr_auto = True
        recipe.resolve_lr()
    if "max_length" not in recipe.data.model_fields_set and re.sub(r"[-_]", "", str(recipe.task.name).lower()) == "mmlu":
        recipe.data.max_length = MMLU_MAX_LENGTH_SHOTS if recipe.task.shots else MMLU_MAX_LENGTH
        recipe._max_length_default = True
    values = recipe.to_dict()
    values["task"]["name"] = recipe.task.label
    values["name"] = recipe.run_name
    recipe.output_dir = _interpolate(recipe.output_dir, values)
    return recipe


def build_model_config(name_or_path: str, overrides: list[str] | tuple[str, ...] = (), *, trust_remote_code: bool = False) -> ModelConfig:
    """The model of a command that needs no task (`sparta generate BASE model.gguf_file=F`), from `model.*`
    overrides, validated and described as a recipe's model section is."""
    tree: dict[str, Any] = {"model": {"name_or_path": name_or_path}}
    for text in overrides:
        key, value = parse_override(text)
        if key.split(".")[0] != "model":
            raise SpartaError(f"override {text}: a base model takes model.* settings only (model.gguf_file=..., model.dtype=...): drop it")
        set_dotted(tree, key, value)
    _drop_trust_remote_code(tree, trust_remote_code)
    if trust_remote_code and isinstance(tree.get("model"), dict):
        tree["model"] = {**tree["model"], "trust_remote_code": True}
    try:
        return ModelConfig.model_validate(tree["model"])
    except ValidationError as exc:
        first = min(exc.errors(), key=lambda error: error["type"] != "extra_forbidden")
        raise SpartaError(_describe({**first, "loc": ("model", *first["loc"])})) from None


def _drop_keys_of_the_old_method(tree: dict[str, Any], overridden: set[str], from_run: bool) -> None:
    """Drop the adapter keys of the method the file named when an override chose another
    (`adapter.method=lora` on a SpaRTA recipe drops its density), and those a run's config.yaml of an
    older sparta recorded for every method. Any other key of another method is refused by the chosen
    method's settings (`_describe` names it)."""
    adapter = tree.get("adapter")
    if not isinstance(adapter, dict):
        return
    method = adapter.get("method", "sparta")
    switched = from_run or bool({"adapter", "adapter.method"} & overridden)
    if method not in METHODS or not switched:
        return  # validation names the valid methods
    tree["adapter"] = {key: value for key, value in adapter.items()
                       if not read_by_another_method(key, method) or f"adapter.{key}" in overridden}


def _drop_alternatives_of_overridden(tree: dict[str, Any], overridden: set[str]) -> None:
    """An override of a key that sizes the adapter one way drops the file's keys that size it another
    (`adapter.budget=...` on a recipe with a density, or on a run's config.yaml that records both)."""
    adapter = tree.get("adapter")
    if not isinstance(adapter, dict) or adapter.get("method", "sparta") not in METHODS:
        return
    for group in METHODS[adapter.get("method", "sparta")].one_of:
        if any(f"adapter.{key}" in overridden for key in group):
            tree["adapter"] = {key: value for key, value in tree["adapter"].items()
                               if key not in group or f"adapter.{key}" in overridden}


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *, trust_remote_code: bool = False) -> Recipe:
    return build_recipe(read_yaml(Path(path)), overrides, trust_remote_code=trust_remote_code)
