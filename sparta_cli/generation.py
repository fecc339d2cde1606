"""Generation from causal LMs, and the generation metrics of SFT evaluation (docs/sft.md, Generation).

Prompts are the ids the SFT layer renders (`sft.generation_prompt`): a conversation goes through the
same chat template as in training and ends in its generation prompt, so a model answers exactly the
prompt it was trained to answer. Rows are generated in batches, left-padded (a causal LM continues
from the last position, so padding goes before the prompt), greedy unless `temperature` > 0, and stop
at EOS or at the template's end-of-turn token (`<|im_end|>`, `<|eot_id|>`). A sampled run is
reproducible: the seed sets a forked RNG, so the caller's random state is left as it was.

The metrics are pure functions of the texts: exact match after SQuAD's normalisation and ROUGE-L F1
(token LCS), averaged over the rows.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sparta_cli.errors import SpartaError
from sparta_cli.sft import SftRow, generation_prompt
from sparta_cli.strict import SEED_LIMIT

DEFAULT_MAX_NEW_TOKENS = 128
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


@dataclass(frozen=True)
class Sampling:
    """How tokens are chosen: greedy at temperature 0 (the default), else sampled from the top-p nucleus."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SpartaError(f"--max-new-tokens {self.max_new_tokens} generates nothing: use 1 or more")
        if not 0 <= self.temperature < math.inf:  # also refuses NaN
            what = "is not a number" if math.isnan(self.temperature) else "is infinite" if self.temperature > 0 else "is negative"
            raise SpartaError(f"--temperature {self.temperature} {what}: use 0 (greedy) or more")
        if not 0 < self.top_p <= 1:
            raise SpartaError(f"--top-p {self.top_p} is not in (0, 1]: use e.g. 0.9, or 1 for no cut")
        if self.batch_size < 1:
            raise SpartaError(f"--batch-size {self.batch_size} holds no prompt: use 1 or more")
        if not 0 <= self.seed < SEED_LIMIT:  # torch.manual_seed takes no more
            raise SpartaError(f"--seed {self.seed} is out of range: use 0 to {SEED_LIMIT - 1}")

    @classmethod
    def of(cls, **settings: float | int | None) -> Sampling:
        """The settings given, the defaults for those left None (a command line's unset options)."""
        return cls(**{key: value for key, value in settings.items() if value is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


# ---------------------------------------------------------------- metrics (pure)


def normalize_answer(text: str) -> str:
    """SQuAD's normaliser: lower case, no punctuation, no articles (a, an, the), single spaces."""
    text = "".join(char for char in text.lower() if char not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_tokens(text: str) -> list[str]:
    """rouge_score's default tokenisation without stemming: lower case, runs of letters and digits."""
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row kept)."""
    row = [0] * (len(b) + 1)
    for token in a:
        diagonal = 0
        for j, other in enumerate(b, 1):
            diagonal, row[j] = row[j], diagonal + 1 if token == other else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: precision and recall of the token LCS; 0 when either text has no token."""
    predicted, wanted = rouge_tokens(prediction), rouge_tokens(reference)
    common = lcs_length(predicted, wanted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(wanted)
    return 2 * precision * recall / (precision + recall)


def score_generations(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """Mean exact match and ROUGE-L F1 over the rows."""
    if len(predictions) != len(references) or not predictions:
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    count = len(predictions)
    return {"exact_match": sum(map(exact_match, predictions, references)) / count,
            "rouge_l": sum(map(rouge_l, predictions, references)) / count}


# ---------------------------------------------------------------- generation


def stop_ids(tokenizer, template: str | None = None) -> list[int]:
    """The ids that end an answer: the tokenizer's EOS, and the special token the chat template closes
    an assistant turn with (found by rendering one: `y<|im_end|>\\n` gives `<|im_end|>`)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if template is not None:
        user = [{"role": "user", "content": "x"}]
        before = tokenizer.apply_chat_template(user, chat_template=template, tokenize=False, add_generation_prompt=True)
        after = tokenizer.apply_chat_template([*user, {"role": "assistant", "content": "y"}], chat_template=template, tokenize=False)
        if after.startswith(before) and "y" in after[len(before):]:
            closing = after[len(before):].split("y", 1)[1]
            first = tokenizer(closing, add_special_tokens=False)["input_ids"][:1] if closing else []
            if first and first[0] in tokenizer.all_special_ids and first[0] not in ids:
                ids += first
    return ids


def prompt_ids(rows: Sequence[SftRow], tokenizer, template: str | None = None) -> list[list[int]]:
    """Each row's prompt as the model sees it in training (`sft.generation_prompt`)."""
    return [generation_prompt(row, tokenizer, template)[0] for row in rows]


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, padded on the left to the longest prompt."""
    width = max(len(ids) for ids in prompts)
    return {"input_ids": torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in prompts]),
            "attention_mask": torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])}


def completion_ids(generated: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The generated ids up to (not including) the first stop id."""
    out = []
    for token in generated:
        if token in stops:
            break
        out.append(int(token))
    return out


def pad_id_of(tokenizer, stops: Sequence[int]) -> int:
    """The id left padding uses: the tokenizer's pad token, else the first stop id."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else 0)


@torch.no_grad()
def generate_ids(model, prompts: Sequence[Sequence[int]], sampling: Sampling, stops: Sequence[int], pad_id: int,
                 **hooks) -> list[list[int]]:
    """The ids generated after each prompt, stop ids and the padding after them included (`completion_ids`
    cuts them): batches of `sampling.batch_size` prompts, left-padded. `hooks` go to `model.generate`
    (a `streamer`, `stopping_criteria`: what `sparta serve` streams and cancels with)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    options = {"max_new_tokens": sampling.max_new_tokens, "do_sample": not sampling.greedy, "eos_token_id": list(stops) or None,
               "pad_token_id": pad_id, "top_k": None, "temperature": None, "top_p": None, **hooks}
    if not sampling.greedy:
        options.update(temperature=sampling.temperature, top_p=sampling.top_p)
    generated: list[list[int]] = []
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(sampling.seed)
            for start in range(0, len(prompts), sampling.batch_size):
                batch = left_padded(prompts[start:start + sampling.batch_size], pad_id)
                width = batch["input_ids"].shape[1]
                output = model.generate(**{key: value.to(device) for key, value in batch.items()}, **options)
                generated += output[:, width:].tolist()
    finally:
        model.train(was_training)
    return generated


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], sampling: Sampling = Sampling(),
             template: str | None = None) -> list[str]:
    """The decoded completion of each prompt (without the prompt, the stop token or special tokens)."""
    stops = stop_ids(tokenizer, template)
    generated = generate_ids(model, prompts, sampling, stops, pad_id_of(tokenizer, stops))
    return [tokenizer.decode(completion_ids(row, stops), skip_special_tokens=True) for row in generated]


def generation_metrics(model, tokenizer, rows: Sequence[SftRow], template: str | None = None,
                       sampling: Sampling = Sampling()) -> dict[str, float]:
    """Exact match and ROUGE-L of the model's greedy answers to `rows` (validation rows) against their
    reference answers: `task.generation_metrics` with `training.eval_generate_samples` rows."""
    prompts, references = zip(*(generation_prompt(row, tokenizer, template) for row in rows))
    return score_generations(generate(model, tokenizer, prompts, sampling, template), references)


# ---------------------------------------------------------------- generation metrics at evaluation

ANSWER_ROOM = 16  # tokens a model may write past the longest reference answer before generation stops


@dataclass(frozen=True)
class GenerationSet:
    """The validation prompts a model answers at each evaluation, and their reference answers."""

    split: str
    suffix: str  # the split's metric suffix (`_mismatched`), as evaluate_split names its metrics
    prompts: list[list[int]]
    references: list[str]
    template: str | None
    max_new_tokens: int  # the longest reference's tokens, plus ANSWER_ROOM

    def score(self, model, tokenizer, batch_size: int) -> dict[str, float]:
        """`exact_match` and `rouge_l` of the greedy answers (with the split's suffix)."""
        sampling = Sampling(max_new_tokens=self.max_new_tokens, batch_size=batch_size)
        scores = score_generations(generate(model, tokenizer, self.prompts, sampling, self.template), self.references)
        return {f"{key}{self.suffix}": value for key, value in scores.items()}


def generation_sets(task, recipe, tokenizer, splits: Sequence[str]) -> list[GenerationSet]:
    """With `task.generation_metrics`, the first `training.eval_generate_samples` rows of each split
    (default: the rows evaluated, `data.max_eval_samples`), rendered as training renders them; built
    before training starts, so a split without prompts (text rows) is an error then, not at step N."""
    if not getattr(recipe.task, "generation_metrics", False):
        return []
    from sparta_cli.data import chat_template, subsample
    from sparta_cli.tasks import load_split, sft_rows

    limit = recipe.training.eval_generate_samples or recipe.data.max_eval_samples
    sets = []
    for split in splits:
        rows = sft_rows(subsample(load_split(task, recipe.task, split, recipe.data_dir()), limit, None))
        template = chat_template(rows, tokenizer, recipe)
        prompts, references = zip(*(generation_prompt(row, tokenizer, template) for row in rows))
        longest = max(len(tokenizer(reference, add_special_tokens=False)["input_ids"]) for reference in references)
        sets.append(GenerationSet(split, task.metric_suffixes.get(split, ""), list(prompts), list(references), template, longest + ANSWER_ROOM))
    return sets
