"""`sparta generate TARGET (--prompt TEXT | --file F)`: completions from a causal LM, as a JSONL of
{prompt, completion} rows (docs/sft.md, Generation).

TARGET is an SFT run (its base with the adapter, its task's chat template), a merged causal-LM
checkpoint or a base model (a folder, `pkg:` name or Hub name, with `model.*` overrides such as
`model.gguf_file=F`). Prompts are rendered with the chat template when there is one (the run's
`task.chat_template`, else the tokenizer's), as training rendered them; without one, or for a run
trained on plain text (text rows, prompt_completion rows of strings: what the run records,
`renders_chat`), they are given to the model as they are. The output is written atomically,
replaces only an earlier output of generate and only with `--overwrite`, and is never one of the
command's inputs; without `--output` the rows go to stdout.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparta_cli.config import ModelConfig
from sparta_cli.console import console
from sparta_cli.errors import SpartaError
from sparta_cli.generation import Sampling, generate, prompt_ids
from sparta_cli.runs import Run
from sparta_cli.sft import SftRow, parse_prompts, read_prompt_file, resolve_chat_template

# before runs recorded `chat`, a run that recorded one of these as its task.format (the one it was given,
# null when left out) had its prompts given as plain text, every other one through the chat template
PLAIN_FORMATS = ("text", "prompt_completion")


@dataclass
class Target:
    """What TARGET names, before any weight loads: the model to load and how prompts are rendered."""

    model: ModelConfig
    run: Run | None  # an SFT run: its adapter goes onto the model
    template_file: str | None  # the run's task.chat_template
    chat: bool  # prompts go through a chat template when there is one
    inputs: list[Path]  # what it reads on this machine (an output may not be one)


@dataclass
class Generator:
    """A loaded causal LM and how its prompts are rendered."""

    model: Any
    tokenizer: Any
    template: str | None  # None: prompts go in as plain text


def resolve_target(target: str, overrides: list[str] | None = None, trust_remote_code: bool = False) -> Target:
    """An SFT run, a merged causal LM or a base model; a classifier is refused."""
    from sparta_cli.config import build_model_config
    from sparta_cli.evaluate_cmd import MERGED, RUN, causal_target, eval_recipe, target_kind
    from sparta_cli.outputs import recipe_inputs
    from sparta_cli.runs import read_run

    kind = target_kind(target)
    path = Path(target).expanduser()
    if kind == MERGED and not causal_target(kind, target):
        raise SpartaError(f"{target} is a sequence classifier, which predicts labels, not text: use `sparta predict`")
    if kind != RUN:
        chat = merged_renders_chat(path) if kind == MERGED else True
        return Target(build_model_config(target, list(overrides or []), trust_remote_code=trust_remote_code), None, None, chat,
                      [path] if path.exists() else [])
    run = read_run(path, tensors=False)
    if not run.causal_lm:
        raise SpartaError(f"{target} is a classification run, which predicts labels, not text: use `sparta predict` "
                          "(sparta generate runs SFT runs, task.type: sft)")
    recipe = eval_recipe(target, kind, None, list(overrides or []), trust_remote_code)
    return Target(recipe.model, run, recipe.task.chat_template, renders_chat(run.config.get("task") or {}),
                  [path, *recipe_inputs(recipe)])


def renders_chat(task: Mapping[str, Any]) -> bool:
    """Whether an SFT run's prompts go through the chat template, as its training rows did: the `chat` its
    adapter config records of its task (kinds.SFT.recorded); for a run written before it recorded one, as
    generation did then (unless its recorded task.format is text or prompt_completion)."""
    chat = task.get("chat")
    return chat if isinstance(chat, bool) else task.get("format") not in PLAIN_FORMATS


def merged_renders_chat(folder: Path) -> bool:
    """Whether a merged checkpoint's prompts go through its chat template: not for the merge of a run
    trained on plain text (its marker records `chat: false`); every other checkpoint's do."""
    from sparta_cli.fileio import read_json
    from sparta_cli.outputs import MERGE_MARKER

    marker = folder / MERGE_MARKER
    return not marker.is_file() or read_json(marker).get("chat") is not False


def load_generator(target: Target) -> Generator:
    """The model, on the GPU when there is one, in eval mode, and its chat template (if prompts use one)."""
    import torch

    from sparta_cli.models import load_for_causal_lm
    from sparta_cli.tuners import load_adapter

    loaded = load_for_causal_lm(target.model)
    model = loaded.model
    if target.run is not None:
        model = load_adapter(target.run.path, model, target.run.config).model
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return Generator(model, loaded.tokenizer, prompt_template(loaded.tokenizer, target.template_file, target.chat))


def prompt_template(tokenizer, template_file: str | None, chat: bool) -> str | None:
    """The chat template prompts are rendered with (a run's task.chat_template, else the tokenizer's),
    or None when they go in as plain text: a run trained on plain text (`chat` False), or no template."""
    from sparta_cli.config import user_path

    if not chat or (template_file is None and not tokenizer.chat_template):
        return None
    return resolve_chat_template(tokenizer, user_path(template_file, "task.chat_template") if template_file else None)


def prompt_rows(prompt: str | None, file: Path | None, chat: bool | None) -> list[SftRow]:
    if (prompt is None) == (file is None):
        raise SpartaError("sparta generate needs one input: --prompt TEXT or --file PROMPTS.jsonl")
    if file is not None:
        return read_prompt_file(Path(file).expanduser(), chat)
    return parse_prompts([("--prompt", {"prompt": prompt})], chat)


def shown_prompt(row: SftRow) -> str | list[dict[str, str]]:
    """A row's prompt as the output records it: the text given, or the messages answered."""
    return row.prompt if row.prompt or row.messages is None else [dict(message) for message in row.messages]


def run_generate(target: str, *, prompt: str | None = None, file: Path | None = None, output: Path | None = None,
                 sampling: Sampling = Sampling(), overwrite: bool = False, overrides: list[str] | None = None,
                 trust_remote_code: bool = False) -> list[dict[str, Any]]:
    """Generate a completion for every prompt and write the {prompt, completion} rows (JSONL)."""
    from sparta_cli.fileio import write_text
    from sparta_cli.outputs import check_not_an_input, check_overwritable_file

    prompt_rows(prompt, file, chat=None)  # both inputs or none, a bad row: refused before the model loads
    if output is not None:
        output = Path(output)
        given = [Path(target).expanduser(), *([Path(file).expanduser()] if file is not None else [])]
        check_not_an_input(output, given, fix="choose another file for --output")  # before the target is even read
    source = resolve_target(target, overrides, trust_remote_code)
    if output is not None:
        check_not_an_input(output, source.inputs, fix="choose another file for --output")  # the run's base and data too
        check_overwritable_file(output, command="generate", overwrite=overwrite, example="completions.jsonl")
    generator = load_generator(source)
    rows = prompt_rows(prompt, file, chat=generator.template is not None)
    completions = generate(generator.model, generator.tokenizer, prompt_ids(rows, generator.tokenizer, generator.template),
                           sampling, generator.template)
    records = [{"prompt": shown_prompt(row), "completion": completion} for row, completion in zip(rows, completions)]
    text = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
    if output is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text(output, text)
        console.print(f"[green]wrote[/] {len(records):,} completion(s) to {output}")
    return records
