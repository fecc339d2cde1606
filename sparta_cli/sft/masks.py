"""Token ids and loss labels of an SFT row: the chat template renders it, the loss covers the answer.

Most chat templates (SmolLM2's, Llama 3's) carry no `{% generation %}` markers, so the assistant's
tokens are found by rendering incrementally: assistant turn i spans from the end of
render(messages[:i], add_generation_prompt=True) to the end of render(messages[:i + 1]), i.e. its
content and the template's end-of-turn marker (`<|im_end|>`, `<|eot_id|>`), which the model must learn
to emit. The whole conversation is tokenised once, as generation will see it, and a token is
supervised when its characters overlap a supervised span (the offset mapping of a fast tokenizer).

The spans are verified, since a wrong one would train on the wrong tokens without a sign: each
rendering must extend the one before (a template that rewrites earlier turns once later ones follow,
dropping past reasoning say, fails), and a turn's span must open with its content (a template that
alters the content, or that has no generation prompt so the span would take in the role header,
fails). Either is a one-line error naming the row.

Labels are -100 where the loss is off; position 0 is always off (no token predicts it), which also
keeps a packed row from being predicted from the row before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from sparta_cli.errors import SpartaError
from sparta_cli.fileio import read_text
from sparta_cli.sft.formats import SftRow

IGNORE = -100
LossOn = Literal["assistant", "last_assistant", "all"]
LOSS_ON: tuple[str, ...] = ("assistant", "last_assistant", "all")
_FIX = "set task.chat_template to a Jinja template that renders each turn verbatim, the same whatever follows"


@dataclass(frozen=True)
class TokenizedRow:
    input_ids: list[int]
    labels: list[int]  # IGNORE where the loss is off

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def supervised(self) -> int:
        """Tokens the loss covers."""
        return sum(label != IGNORE for label in self.labels)


def resolve_chat_template(tokenizer, template_file: Path | None = None) -> str:
    """The Jinja text chat rows are rendered with: the file's if given, else the tokenizer's own.

    Templates run in transformers' sandboxed Jinja environment, so a file cannot reach beyond the
    messages it is given. One sample render here turns a broken file into one error, not one per row."""
    if template_file is not None:
        if template_file.is_dir():
            raise SpartaError(f"task.chat_template {template_file} is a folder, not a file: name the template's Jinja file")
        if not template_file.is_file():
            raise SpartaError(f"task.chat_template {template_file} not found: fix the path")
        template = read_text(template_file)
        origin = f"task.chat_template {template_file}"
    else:
        template = tokenizer.chat_template
        if isinstance(template, dict):  # named templates (tool use, RAG): the plain chat one is "default"
            template = template.get("default")
        if not isinstance(template, str) or not template.strip():
            raise SpartaError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model') or 'this model'} has no chat "
                              "template: set task.chat_template to a Jinja file (the model card's template, e.g.)")
        origin = "the tokenizer's chat template"
    try:
        _render(tokenizer, template, [{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    except _template_errors() as exc:
        try:  # a template may demand a system turn first: the data's conversations then have one
            _render(tokenizer, template, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                    add_generation_prompt=True)
        except _template_errors():
            raise SpartaError(f"{origin} does not render ({type(exc).__name__}: {_first_line(exc)}): fix the template") from None
    return template


def tokenize_row(row: SftRow, tokenizer, template: str | None = None, loss_on: LossOn = "assistant") -> TokenizedRow:
    """Ids and labels of one row; `template` (from `resolve_chat_template`) is needed for conversations.

    loss_on: `assistant` every assistant turn (of the completion, for prompt_completion rows),
    `last_assistant` the last one only, `all` every token. Plain rows train on the completion (all of
    a text row), or on everything with `all`, and end in the tokenizer's EOS, as TRL's SFT does."""
    if loss_on not in LOSS_ON:
        raise SpartaError(f"task.loss_on {loss_on!r} is not one of {', '.join(LOSS_ON)}: fix task.loss_on")
    _require_fast(tokenizer)
    if row.messages is None:
        return _tokenize_plain(row, tokenizer, loss_on)
    if template is None:
        raise ValueError("a conversation needs its chat template: call resolve_chat_template first")
    text, spans = render_with_spans(row, tokenizer, template)
    if loss_on == "last_assistant":
        spans = spans[-1:]
    elif loss_on == "all":
        spans = [(0, len(text))]
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    return TokenizedRow(input_ids=ids, labels=_labels(ids, encoded["offset_mapping"], spans))


def tokenize_rows(rows: Sequence[SftRow], tokenizer, template: str | None = None, loss_on: LossOn = "assistant") -> list[TokenizedRow]:
    return [tokenize_row(row, tokenizer, template, loss_on) for row in rows]


def render_with_spans(row: SftRow, tokenizer, template: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each supervised assistant turn, verified."""
    messages = list(row.messages or ())
    full = _render_row(row, tokenizer, template, messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or index < row.prompt_messages:
            continue
        before = _render_row(row, tokenizer, template, messages[:index], add_generation_prompt=True)
        through = _render_row(row, tokenizer, template, messages[:index + 1], add_generation_prompt=False)
        turn = f"message {index + 1} (assistant)"
        if not through.startswith(before):
            raise SpartaError(f"{row.where}: the chat template does not open {turn} with its generation prompt "
                              "(add_generation_prompt), so the answer's tokens cannot be told apart and the loss mask "
                              f"would be wrong: {_FIX}")
        if not full.startswith(through):
            raise SpartaError(f"{row.where}: the chat template renders {turn} differently once later turns follow, "
                              f"so the loss mask would be wrong: {_FIX}")
        answer = through[len(before):]
        content = message["content"].strip()
        start = answer.find(content)
        if start < 0 or answer[:start].strip():
            raise SpartaError(f"{row.where}: the chat template renders {turn} as {answer[:60]!r}, not as the data's text, "
                              f"so the loss mask would be wrong: {_FIX}")
        spans.append((len(before), len(through)))
    return full, spans


def generation_prompt(row: SftRow, tokenizer, template: str | None = None) -> tuple[list[int], str]:
    """The ids a model generates the row's (last) answer from, and that answer: for generation metrics.

    A conversation is cut before its last assistant turn and ends in the generation prompt; one that is
    all prompt (`formats.parse_prompts`) is rendered whole, with no reference answer."""
    if row.messages is None:
        if not row.prompt:
            raise SpartaError(f"{row.where}: the row has no prompt to generate from: generation metrics need "
                              "chat or prompt_completion data")
        return list(tokenizer(row.prompt, add_special_tokens=True)["input_ids"]), row.completion
    if template is None:
        raise ValueError("a conversation needs its chat template: call resolve_chat_template first")
    if row.prompt_messages == len(row.messages):
        last, answer = len(row.messages), ""
    else:
        last = max(index for index, message in enumerate(row.messages) if message["role"] == "assistant")
        answer = row.messages[last]["content"]
    text = _render_row(row, tokenizer, template, list(row.messages[:last]), add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), answer


def _tokenize_plain(row: SftRow, tokenizer, loss_on: str) -> TokenizedRow:
    text = row.prompt + row.completion
    encoded = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    eos = tokenizer.eos_token_id
    if eos is not None and ids[-1] != eos:
        ids.append(eos)
        offsets.append((len(text), len(text)))
    start = 0 if loss_on == "all" else len(row.prompt)
    labels = _labels(ids, offsets, [(start, len(text))])
    if eos is not None:  # the EOS (at the end, zero-width) ends the completion: learn to stop
        labels[-1] = eos
    return TokenizedRow(input_ids=ids, labels=labels)


def _labels(ids: list[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """A token is supervised when its characters overlap a span: a token that merges the prompt's last
    character with the answer's first still carries the answer, and the model must learn to emit it."""
    labels = [token if any(start < end_span and end > start_span for start_span, end_span in spans) else IGNORE
              for token, (start, end) in zip(ids, offsets)]
    labels[0] = IGNORE
    return labels


def _render_row(row: SftRow, tokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    try:
        return _render(tokenizer, template, messages, add_generation_prompt)
    except _template_errors() as exc:
        raise SpartaError(f"{row.where}: the chat template refused this conversation ({_first_line(exc)}): "
                          "fix that row, or set task.chat_template") from None


def _render(tokenizer, template: str, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def _template_errors() -> tuple[type[BaseException], ...]:
    """What a template's own fault raises: Jinja's errors (its `raise_exception` included) and the
    Python errors a template's expressions can hit."""
    import jinja2

    return (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError, RecursionError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _require_fast(tokenizer: Any) -> None:
    if not getattr(tokenizer, "is_fast", False):
        raise SpartaError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no fast (Rust) version, "
                          "which SFT needs to find the answer's tokens: use a model that ships a tokenizer.json")
