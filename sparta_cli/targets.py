"""Short target names (q, k, v, o, gate, up, down) resolved to a model's linear layers.

One table for every method, so `targets: [v, o]` means the same matrices for SpaRTA,
LoRA and DoRA. A target written `re:<regex>` matches full module names directly, for
architectures the table does not know.
"""

from __future__ import annotations

import re

from torch import nn

from sparta_cli.errors import SpartaError

_DECODER = {
    "q": r"\.q_proj$",
    "k": r"\.k_proj$",
    "v": r"\.v_proj$",
    "o": r"\.o_proj$",
    "gate": r"\.gate_proj$",
    "up": r"\.up_proj$",
    "down": r"\.down_proj$",
}
_BERT = {
    "q": r"\.attention\.self\.query$",
    "k": r"\.attention\.self\.key$",
    "v": r"\.attention\.self\.value$",
    "o": r"\.attention\.output\.dense$",
    "up": r"\.intermediate\.dense$",
    "down": r"\.layer\.\d+\.output\.dense$",
}
PATTERNS: dict[str, dict[str, str]] = {
    **dict.fromkeys(
        ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "gemma3_text", "granite", "phi3", "olmo2"),
        _DECODER,
    ),
    **dict.fromkeys(("bert", "roberta", "xlm-roberta", "electra", "camembert"), _BERT),
}

# Classification heads are trained fully, by every method.
HEAD_NAMES = ("score", "classifier")


def _linear_names(model: nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]


def _patterns_for(model: nn.Module) -> dict[str, str]:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    return PATTERNS.get(model_type or "", _DECODER)


def available_targets(model: nn.Module) -> list[str]:
    """The short names that match at least one linear layer of this model."""
    names = [n for n in _linear_names(model) if not is_head(n)]
    return [short for short, pattern in _patterns_for(model).items() if any(re.search(pattern, n) for n in names)]


def is_head(module_name: str) -> bool:
    return module_name.split(".")[0] in HEAD_NAMES


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, str]:
    """Map each chosen linear layer's full name to the target (short name or regex) that chose it."""
    names = [n for n in _linear_names(model) if not is_head(n)]
    patterns = _patterns_for(model)
    model_type = getattr(getattr(model, "config", None), "model_type", "unknown")
    if not names:
        raise SpartaError(
            f"this {model_type} model has no nn.Linear layers to adapt (its layers are of another kind, e.g. GPT-2's Conv1D): "
            f"pick a model of a family sparta targets ({', '.join(sorted(PATTERNS))})"
        )
    chosen: dict[str, str] = {}
    for target in targets:
        if target.startswith("re:"):
            try:
                pattern = re.compile(target[3:])
            except re.error as exc:
                raise SpartaError(f"target `{target}` is not a valid regex ({exc}): fix adapter.targets") from None
        elif target in patterns:
            pattern = re.compile(patterns[target])
        else:
            have = ", ".join(available_targets(model)) or "none"
            raise SpartaError(
                f"target `{target}` does not exist in this {model_type} model: it has {have} "
                "(or write re:<regex> to match module names)"
            )
        hits = [n for n in names if pattern.search(n)]
        if not hits:
            have = ", ".join(available_targets(model)) or "none"
            raise SpartaError(
                f"target `{target}` matches no linear layer of this {model_type} model: it has {have} "
                "(or write re:<regex> to match module names)"
            )
        for name in hits:
            chosen.setdefault(name, target)
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, target in chosen.items():
        if embeddings is not None and model.get_submodule(name).weight is embeddings.weight:
            raise SpartaError(f"target `{target}` chooses {name}, whose weight is the input embeddings' (tie_word_embeddings): "
                              "training it would change every input token's embedding too, which no merge or export "
                              "reproduces; leave it out of adapter.targets")
    return dict(sorted(chosen.items(), key=lambda item: names.index(item[0])))


def lora_matched_density(model: nn.Module, targets: list[str], r: int = 8, lora_targets: tuple[str, ...] = ("q", "v")) -> float:
    """SpaRTA's density on `targets` at which it trains as many entries as LoRA rank `r` on `lora_targets`
    (r * (in + out) per matrix): the equal-budget point the paper compares at."""
    lora = sum(r * (model.get_submodule(n).in_features + model.get_submodule(n).out_features)
               for n in resolve_targets(model, list(lora_targets)))
    pool = sum(model.get_submodule(n).weight.numel() for n in resolve_targets(model, targets))
    return lora / pool
