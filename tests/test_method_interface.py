"""What every method answers through its Tuner and its settings: writing an adapter into a base in
place and putting the base back bit for bit (for serving many adapters on one base), the
recipe's `adapter:` as one model per method, and the import graph that keeps them apart."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_batch, tiny_model
from pydantic import ValidationError

from sparta_cli.config import Recipe, build_recipe
from sparta_cli.errors import SpartaError
from sparta_cli.tuners import METHODS, apply_adapter, get_tuner
from sparta_cli.tuners.base import TRAINED_PREFIX
from sparta_cli.tuners.head.config import HeadConfig
from sparta_cli.tuners.lora.config import LoraConfig
from sparta_cli.tuners.sparta.config import SpartaConfig

ROOT = Path(__file__).resolve().parents[1]


def _trained_tensors(cfg, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """A saved adapter of `cfg`'s method with random deltas and head (what `read_tensors` returns)."""
    adapter = apply_adapter(tiny_model("llama", dtype=dtype), cfg, seed=4, head_modules=["score"])
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for _, param in adapter.trainable():
            param.add_(torch.randn(param.shape, generator=generator).to(param.dtype) * 0.1)
    adapter.write_weights()
    return adapter.saved_tensors()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparta_applied_in_place_is_the_dense_sum_and_reverts_bit_for_bit(dtype):
    tensors = _trained_tensors(SpartaConfig(density=0.1, targets=["q", "v", "o"]), dtype)
    model = tiny_model("llama", dtype=dtype)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    overwritten = get_tuner("sparta").apply_in_place(model, tensors)
    params = dict(model.named_parameters())
    modules = [key.removesuffix(".indices") for key in tensors if key.endswith(".indices")]
    assert modules and len(overwritten.entries) == len(modules)
    for module in modules:  # the dense reference: W0 + a dense delta holding the k values, summed in fp32
        w0 = before[f"{module}.weight"]
        dense = torch.zeros(w0.numel())
        dense[tensors[f"{module}.indices"].long()] = tensors[f"{module}.delta"]
        expected = (w0.float() + dense.view_as(w0)).to(dtype)
        assert torch.equal(params[f"{module}.weight"], expected)
    head = [key.removeprefix(TRAINED_PREFIX) for key in tensors if key.startswith(TRAINED_PREFIX)]
    assert head and all(torch.equal(params[name], tensors[TRAINED_PREFIX + name]) for name in head)
    get_tuner("sparta").revert(model, overwritten)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


def test_in_place_scores_as_the_adapter_does():
    cfg = SpartaConfig(density=0.1, targets=["v", "o"])
    adapter = apply_adapter(tiny_model("llama"), cfg, seed=4, head_modules=["score"])
    with torch.no_grad():
        for _, param in adapter.trainable():
            param.add_(torch.randn(param.shape) * 0.1)
    adapter.write_weights()
    batch = tiny_batch()
    with torch.no_grad():
        expected = adapter.model(**batch).logits
        base = tiny_model("llama")
        get_tuner("sparta").apply_in_place(base, adapter.saved_tensors())
        assert torch.equal(base(**batch).logits, expected)


def test_head_applies_in_place_and_reverts():
    tensors = _trained_tensors(HeadConfig())
    model = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    overwritten = get_tuner("head").apply_in_place(model, tensors)
    assert torch.equal(model.score.weight, tensors["trained.score.weight"])
    get_tuner("head").revert(model, overwritten)
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())


@pytest.mark.parametrize("method", ["lora", "dora", "full"])
def test_methods_whose_files_are_not_deltas_refuse_to_apply_in_place(method):
    with pytest.raises(SpartaError, match=f"{method} adapters are not written into a base in place"):
        get_tuner(method).apply_in_place(tiny_model("llama"), {})


def test_the_adapter_model_itself_refuses_another_methods_key():
    """Not build_recipe's doing: the recipe model's `adapter` is the chosen method's settings."""
    recipe = Recipe.model_validate({"model": {"name_or_path": "m"}, "task": {"name": "sst2"}, "adapter": {"method": "lora", "r": 4}})
    assert isinstance(recipe.adapter, LoraConfig) and recipe.adapter.r == 4
    assert isinstance(Recipe.model_validate({"model": {"name_or_path": "m"}, "task": {"name": "sst2"}}).adapter, SpartaConfig)
    with pytest.raises(ValidationError, match="density"):
        Recipe.model_validate({"model": {"name_or_path": "m"}, "task": {"name": "sst2"}, "adapter": {"method": "lora", "density": 0.1}})


@pytest.mark.parametrize(("adapter", "message"), [
    ({"method": "dora", "density": 0.1}, "adapter.density (SpaRTA's fraction of each target matrix) does not apply to "
                                         "adapter.method=dora: remove it (its size is adapter.r)"),
    ({"method": "head", "dropout": 0.1}, "adapter.dropout (the LoRA/DoRA dropout) does not apply to adapter.method=head: "
                                         "remove it (it trains only the classification head)"),
    ({"method": "full", "r": 2}, "adapter.r (the LoRA/DoRA rank) does not apply to adapter.method=full: remove it (it trains every weight)"),
    ({"method": "lora", "densty": 0.1}, "unknown key `adapter.densty` in the recipe: did you mean `density`?"),
    ({"method": "lorra"}, "invalid `adapter.method` = 'lorra': Input should be 'sparta', 'lora', 'dora', 'full' or 'head'"),
])
def test_a_key_of_another_method_names_the_method_that_reads_it(adapter, message):
    with pytest.raises(SpartaError) as error:
        build_recipe({"model": {"name_or_path": "m"}, "task": {"name": "sst2"}, "adapter": adapter})
    assert str(error.value) == message


def test_every_methods_settings_say_what_reports_and_run_names_need():
    for name, settings in METHODS.items():
        cfg = settings()
        assert cfg.method == name and settings.display_name and settings.size_text and cfg.auto_lr() > 0
        assert set(cfg.recorded()) == {"density", "targets"}  # adapter_config.json's keys, for every method
    assert SpartaConfig(density=0.02).sizes() == {"density": 0.02} and LoraConfig(r=4).sizes() == {"r": 4}
    assert HeadConfig().sizes() == {} and HeadConfig().name_setting() == ""


def test_reading_a_recipe_imports_no_tuner_code():
    code = ("import sys, sparta_cli.config; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith(('sparta_cli.tuners.base', 'sparta_cli.models')) "
            "or m.endswith('.tuner')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


def _import_graph() -> dict[str, set[str]]:
    """sparta_cli's modules and the ones each imports (imports inside functions and under TYPE_CHECKING counted)."""
    package = ROOT / "sparta_cli"
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here.split(".")[: len(here.split(".")) - node.level + 1] + [node.module or ""]) if node.level else node.module or ""
                targets = [base.rstrip("."), *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def test_no_import_cycle_among_sparta_modules():
    graph = _import_graph()
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = path[path.index(name):] + [name]
            pytest.fail(f"import cycle: {' -> '.join(cycle)}")
        if name in done:
            return
        for target in sorted(graph[name]):
            visit(target, [*path, name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])


SPARTA_PRIVATE = {"SpartaLinear", "ShardedSpartaLinear", "ShardedSparta", "ShardedSpartaModel", "SpartaModel",
                  "sparta_delta", "sparta_indices", "sparta_origin", "sparta_local"}


def test_nothing_outside_tuners_sparta_reads_spartas_own_state():
    """`Adapter.sparta` and SpaRTA's layers are read by tuners/sparta/ only: the rest of sparta asks the
    Tuner (FSDP too: `Tuner.shard`). tuners/base.py declares the field, so it may name its type."""
    allowed = {"sparta_cli/tuners/base.py": {"SpartaModel"}}
    found = []
    for path in sorted((ROOT / "sparta_cli").rglob("*.py")):
        where = path.relative_to(ROOT).as_posix()
        if where.startswith("sparta_cli/tuners/sparta/"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = {node.attr} if isinstance(node, ast.Attribute) else {node.id} if isinstance(node, ast.Name) else set()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = {alias.name.rpartition(".")[2] for alias in node.names}
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                names = {node.value}
            if isinstance(node, ast.Attribute) and node.attr == "sparta":
                found.append(f"{where}:{node.lineno} .sparta")
            found += [f"{where}:{node.lineno} {name}" for name in sorted(names & SPARTA_PRIVATE - allowed.get(where, set()))]
    assert not found, found
