"""The `sparta` command. Commands are thin: they parse, validate, and call the library."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from sparta_cli.console import console, errors
from sparta_cli.errors import SpartaError

app = typer.Typer(
    name="sparta",
    help="Fine-tune language models with SpaRTA: sparse random parameter adaptation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_debug = False

ReplaceOutput = Annotated[bool, typer.Option("--overwrite", help="replace --output when it holds an earlier output of this command")]
TrustRemoteCode = Annotated[bool, typer.Option("--trust-remote-code", help="run the Python code a model folder ships (never read from a file)")]
Overrides = Annotated[list[str] | None, typer.Argument(help="key=value overrides, e.g. adapter.density=0.005", show_default=False)]


def _print_version(given: bool) -> None:
    if given:
        from sparta_cli import __version__

        console.print(f"sparta {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="show Python tracebacks and libraries' warnings; check SpaRTA's weight writes")] = False,
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="print the version and exit")] = False,
) -> None:
    global _debug
    _debug = debug or os.environ.get("SPARTA_DEBUG") == "1"
    if _debug:
        from sparta_cli.tuners.sparta.layer import CHECK_WEIGHTS_ENV

        os.environ.setdefault(CHECK_WEIGHTS_ENV, "1")  # every SpaRTA forward verifies W0 + delta (a host sync per layer)
    else:
        from sparta_cli.console import quiet_libraries

        quiet_libraries()


@app.command()
def validate(recipe: Path, overrides: Overrides = None) -> None:
    """Check a recipe without loading weights (model folder, data folder, targets, trackers) and print it resolved."""
    import yaml

    from sparta_cli.config import load_recipe
    from sparta_cli.preflight import check_heldout_rows, preflight
    from sparta_cli.tasks import check_trainable, resolve_task

    resolved = load_recipe(recipe, overrides or [])
    resolve_task(resolved.task)
    check_trainable(resolved.task)
    check_heldout_rows(resolved, preflight(resolved))
    console.print(yaml.safe_dump(resolved.to_dict(), sort_keys=False).rstrip())
    console.print(f"[green]ok[/]: {recipe} is valid")


@app.command()
def train(
    recipe: Path,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace the earlier run in output_dir (never files a run did not write)")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint in output_dir")] = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Train an adapter from a YAML recipe."""
    from sparta_cli.config import load_recipe
    from sparta_cli.preflight import preflight
    from sparta_cli.tasks import check_trainable
    from sparta_cli.train import train as run_training

    if overwrite and resume:
        raise SpartaError("--overwrite and --resume contradict each other: pass one")
    resolved = load_recipe(recipe, overrides or [], trust_remote_code=trust_remote_code)
    check_trainable(resolved.task)
    preflight(resolved)
    run_training(resolved, overwrite=overwrite, resume=resume)


@app.command("eval")
def evaluate(
    target: Annotated[str, typer.Argument(help="a run directory, a merged checkpoint, or a base model name/path")],
    overrides: Overrides = None,
    task: Annotated[str | None, typer.Option(help="task to score (default: the run's task)")] = None,
    split: Annotated[str | None, typer.Option(help="split to score (default: the task's evaluation splits)")] = None,
    output: Annotated[Path | None, typer.Option(help="results file (default: eval_results_<task>_<split>.json in the run, or runs/eval/<model>/)")] = None,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Evaluate a run, a merged checkpoint or an untouched base model on a task."""
    from sparta_cli.evaluate_cmd import run_eval

    run_eval(target, task=task, split=split, output=output, overrides=overrides or [], trust_remote_code=trust_remote_code)


@app.command()
def predict(
    target: Annotated[str, typer.Argument(help="a run directory or a merged checkpoint")],
    output: Annotated[Path, typer.Option("--output", "-o", help="file for the predictions (index<TAB>prediction lines)")],
    overrides: Overrides = None,
    split: Annotated[str | None, typer.Option(help="split to predict (default: test; MNLI: test_matched or test_mismatched)")] = None,
    file: Annotated[Path | None, typer.Option(help="your own CSV/TSV/JSONL with the task's text fields (no labels needed)")] = None,
    task: Annotated[str | None, typer.Option(help="task of a merged checkpoint (default: the one it records)")] = None,
    overwrite: ReplaceOutput = False,
) -> None:
    """Predict a split or your own unlabeled file, one line per row in GLUE's submission format."""
    from sparta_cli.predict import run_predict

    run_predict(target, split=split, file=file, output=output, overwrite=overwrite, task=task, overrides=overrides or [])


@app.command()
def generate(
    target: Annotated[str, typer.Argument(help="an SFT run, a merged causal-LM checkpoint, or a base model name/path")],
    overrides: Annotated[list[str] | None, typer.Argument(help="model.* overrides for a base model, e.g. model.gguf_file=F", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(help="one prompt (a user turn when the model has a chat template)")] = None,
    file: Annotated[Path | None, typer.Option(help='JSONL of {"prompt": ...} or {"messages": [...]} rows')] = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="JSONL file for the {prompt, completion} rows (default: stdout)")] = None,
    max_new_tokens: Annotated[int | None, typer.Option("--max-new-tokens", help="most tokens generated per prompt (default: 128)", show_default=False)] = None,
    temperature: Annotated[float, typer.Option(help="0: greedy; above 0: sampled")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="sample from the smallest set of tokens holding this probability")] = 1.0,
    seed: Annotated[int, typer.Option(help="seed of the sampling (the same seed gives the same completions)")] = 0,
    batch_size: Annotated[int, typer.Option("--batch-size", help="prompts generated at once")] = 8,
    overwrite: ReplaceOutput = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Generate completions from a causal LM with its chat template applied, as a JSONL of {prompt, completion}."""
    from sparta_cli.generate_cmd import run_generate
    from sparta_cli.generation import Sampling

    sampling = Sampling.of(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, batch_size=batch_size)
    run_generate(target, prompt=prompt, file=file, output=output, sampling=sampling, overwrite=overwrite, overrides=overrides or [],
                 trust_remote_code=trust_remote_code)


@app.command()
def merge(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories on the same base")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the merged checkpoint")],
    base: Annotated[str | None, typer.Option(help="base model (default: the one recorded in the adapter)")] = None,
    dtype: Annotated[str | None, typer.Option(help="bf16, fp16 or fp32 (default: the base model's own)")] = None,
    weights: Annotated[str | None, typer.Option(help="comma-separated weight per run, e.g. 1,0.5")] = None,
    head_from: Annotated[Path | None, typer.Option("--head-from", help="run whose classification head to keep")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="largest output shard, e.g. 2GB or 500MB")] = "2GB",
    overwrite: ReplaceOutput = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Write a full Hugging Face checkpoint with the adapter(s) merged in."""
    from sparta_cli.merge import merge_runs

    merge_runs(run_dirs, output=output, base=base, dtype=dtype, weights=weights, head_from=head_from, max_shard_size=max_shard_size,
               trust_remote_code=trust_remote_code, overwrite=overwrite)


@app.command()
def export(
    run_dir: Path,
    format: Annotated[str, typer.Option("--format", help="sparta, peft or peft-sparta")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for the exported adapter")],
    values: Annotated[str, typer.Option(help="fp32 or bf16 delta values")] = "fp32",
    overwrite: ReplaceOutput = False,
    trust_remote_code: TrustRemoteCode = False,
) -> None:
    """Export an adapter to a format other libraries load."""
    from sparta_cli.export import export_run

    export_run(run_dir, format=format, output=output, values=values, trust_remote_code=trust_remote_code, overwrite=overwrite)


@app.command()
def report(
    runs: Annotated[list[str], typer.Argument(help="run directories, folders holding runs, or globs such as 'runs/sst2/*'")],
    output: Annotated[Path, typer.Option("--output", "-o", help="folder for report.csv, report.md and the plots")] = Path("report"),
    metric: Annotated[str | None, typer.Option(help="metric to compare, e.g. accuracy (default: each task's main metric)")] = None,
    x: Annotated[str, typer.Option("--x", help="x axis of the plot: density or trainable_params")] = "density",
) -> None:
    """Compare runs: mean and std over seeds per task, method and density, as a table, CSV, Markdown and plots."""
    from sparta_cli.report import write_report

    write_report(runs, output=output, metric=metric, x=x)


@app.command()
def tune(
    recipe: Path,
    overrides: Overrides = None,
    trials: Annotated[int | None, typer.Option(help="trials in the study (default: tune.trials, else 20)")] = None,
    workers: Annotated[int | None, typer.Option(help="trials at once on this machine, one GPU each when there are GPUs")] = None,
    storage: Annotated[str | None, typer.Option(help="shared study storage: an RDB URL or a journal file path (default: the study folder's journal)")] = None,
    study: Annotated[str | None, typer.Option(help="study name in the storage (default: the recipe file's name)")] = None,
    output: Annotated[str | None, typer.Option("--output", "-o", help="study folder (default: tunes/<study>)")] = None,
    pruner: Annotated[str | None, typer.Option(help="median, halving, hyperband or none")] = None,
    sampler: Annotated[str | None, typer.Option(help="tpe, random or grid")] = None,
    space: Annotated[list[str] | None, typer.Option(help="KEY=SPEC searched key, e.g. adapter.density=log:1e-3..0.2 (repeatable)")] = None,
) -> None:
    """Search density, learning rate or any recipe key on a held-out validation set (Optuna); resumable."""
    from sparta_cli.tune.run import tune as run_tune

    flags = {"trials": trials, "workers": workers, "storage": storage, "study": study, "output_dir": output,
             "pruner": pruner, "sampler": sampler}
    run_tune(recipe, overrides or [], flags=flags, space=space or [])


@app.command()
def serve(
    target: Annotated[str, typer.Argument(help="a run directory (its base is loaded once), or a base model or merged checkpoint")],
    adapter: Annotated[list[str] | None, typer.Option("--adapter", help="NAME=RUN: one more run (SpaRTA, head, LoRA, DoRA) on the same base (repeatable)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on (anything but loopback exposes the server: pass --api-key-file)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    api_key_file: Annotated[Path | None, typer.Option("--api-key-file", help="file holding the key /v1/* requests must send as `Authorization: Bearer KEY`")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", help="most inputs per forward, all for one adapter")] = 8,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", help="longest an input waits for its batch to fill")] = 5.0,
    adapters_dir: Annotated[Path | None, typer.Option("--adapters-dir", help="folder whose run folders POST /v1/adapters may load at run time")] = None,
) -> None:
    """Serve classification or SFT runs over HTTP: one base model, adapters swapped in place (docs/serve.md)."""
    from sparta_cli.serve import serve as run_server

    run_server(target, adapters=adapter or [], host=host, port=port, api_key_file=api_key_file, max_batch=max_batch, max_wait_ms=max_wait_ms,
               adapters_dir=adapters_dir)


GLOBAL_OPTIONS = {"--debug", "--version", "-V", "--help", "-h"}
_OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
_COMMAND_LINE = re.compile(r"`[a-z][\w.-]* [^`]*`")  # a quoted command line (`sparta train ...`, `torchrun ...`) names its own options


@functools.cache
def command_options(command: str) -> frozenset[str]:
    """The options `sparta COMMAND` takes, the global ones included (cached: building the click group
    takes ~60 ms, and the error-message audit asks once per message)."""
    params = typer.main.get_command(app).commands[command].params
    return frozenset(GLOBAL_OPTIONS) | {name for param in params for name in (*param.opts, *param.secondary_opts) if name.startswith("-")}


def foreign_options(message: str, command: str) -> list[str]:
    """The options a message names that `sparta COMMAND` does not take (a fix must name one it does)."""
    text = _COMMAND_LINE.sub(lambda match: " " * len(match.group()), message)
    have = command_options(command)
    return [match.group() for match in _OPTION.finditer(text) if match.group() not in have]


def _raised_in(exc: BaseException) -> str | None:
    """The installed package whose code raised the exception (its innermost frame, `.../site-packages/PKG/...`);
    None when that frame is sparta's own or a script's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    match = re.search(r"site-packages[/\\]([A-Za-z0-9_]+)[/\\](\S*)", tb.tb_frame.f_code.co_filename) if tb else None
    if match is None:
        return None
    return "tokenizers" if match.group(1) == "transformers" and "tokenization" in match.group(2) else match.group(1)


def library_error(exc: BaseException) -> SpartaError | None:
    """The expected failures of the libraries sparta calls (safetensors, Optuna, tokenizers, datasets), as
    one line saying what failed and what to do, for those no command caught closer to their cause."""
    from sparta_cli.errors import RunFailure

    kind, module = type(exc).__name__, type(exc).__module__.split(".")[0]
    first = (str(exc).strip().splitlines() or [kind])[0][:160]
    inner = _raised_in(exc) or module
    if kind == "SafetensorError" or inner == "safetensors":
        return SpartaError(f"a safetensors file cannot be read ({first}): it is damaged, cut off or not a safetensors file; "
                           "restore it, or rerun the command that wrote it")
    if module in ("optuna", "sqlalchemy") or inner in ("optuna", "sqlalchemy"):
        return RunFailure(f"the study storage failed ({kind}: {first}): check its database server or journal file, then rerun "
                          "the same `sparta tune` to resume the study")
    if module == "tokenizers" or inner == "tokenizers":
        return SpartaError(f"the model's tokenizer files cannot be read ({kind}: {first}): its tokenizer.json is damaged or needs "
                           "a newer library; restore the model folder, or pip install -U tokenizers transformers")
    if module == "datasets" or inner in ("datasets", "pyarrow"):
        return SpartaError(f"the datasets library could not read the data ({kind}: {first}): check the files under data.dir or "
                           "$SPARTA_DATA_DIR, or remove the cache in $SPARTA_CACHE_DIR and rerun")
    return None


def one_line(text: str) -> str:
    """Messages quote user input (an override, a file's cell): escape anything that would break the line."""
    return "".join(repr(c)[1:-1] if c.splitlines() != [c] else c for c in text)


def check_no_empty_argument(args: list[str]) -> None:
    """An empty argument is a shell variable that was never set (`--output "$OUT"`); taken as the
    option's default (or the current folder) it would start work no one asked for."""
    for position, arg in enumerate(args):
        if arg == "":
            after = f" after {args[position - 1]}" if position else ""
            raise SpartaError(f"argument {position + 1}{after} is empty (an unset shell variable?): give it a value")


def main() -> None:
    """Entry point: one-line errors with exit code 2 (usage) or 1 (run failure); tracebacks only with --debug."""
    try:
        check_no_empty_argument(sys.argv[1:])
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except SpartaError as exc:
        if _debug:
            raise
        errors.print(f"error: {one_line(str(exc))}", markup=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        errors.print("interrupted", markup=False)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        # Click's usage errors (missing argument, unknown option), from click or the copy newer Typer vendors
        if callable(getattr(exc, "format_message", None)) and isinstance(getattr(exc, "exit_code", None), int):
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `sparta`: the help is the message
                exc.show()
                sys.exit(exc.exit_code)
            message = " ".join(exc.format_message().split())
            errors.print(f"error: {message} (see `sparta --help`)", markup=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        if isinstance(exc, typer.Abort):
            sys.exit(130)
        if _debug:
            raise
        from sparta_cli.fileio import explain_os_error

        known = explain_os_error(exc) or library_error(exc)  # a full disk, a name too long, a damaged file, whichever library hit it
        if known is not None:
            errors.print(f"error: {one_line(str(known))}", markup=False, soft_wrap=True)
            sys.exit(known.exit_code)
        first = str(exc).splitlines()[0] if str(exc) else ""
        errors.print(f"error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)", markup=False, soft_wrap=True)
        sys.exit(1)
