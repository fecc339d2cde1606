"""The SpaRTA adapter against a plain dense reference: masks, gradients, merge, save/load."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import ARCHS, tiny_batch, tiny_model
from torch import nn

from sparta_cli.config import AdapterConfig
from sparta_cli.errors import SpartaError
from sparta_cli.tuners import apply_adapter
from sparta_cli.tuners.sparta import SpartaLinear, SpartaModel, num_selected, select_indices
from sparta_cli.tuners.sparta.layer import sparse_weight_grad


def test_exactly_k_unique_sorted_int32_indices():
    for numel, density in [(1000, 0.01), (4096 * 11, 0.005), (300_000_000 // 10, 1e-5), (17, 1.0)]:
        idx = select_indices(numel, density, seed=3, module_name="layer.v")
        k = num_selected(numel, density)
        assert idx.numel() == k == int(round(density * numel))
        assert idx.dtype == torch.int32
        assert torch.equal(idx, idx.unique(sorted=True))  # unique and sorted
        assert int(idx.min()) >= 0 and int(idx.max()) < numel


def test_large_sampler_is_uniform():
    # the rejection sampler for big matrices: every position equally likely
    hits = torch.zeros(10)
    for s in range(400):
        idx = select_indices(2**25, 1e-4, seed=s, module_name="m").long()
        hits += torch.bincount(idx * 10 // 2**25, minlength=10)[:10]
    share = hits / hits.sum()
    assert torch.allclose(share, torch.full((10,), 0.1), atol=0.01)


def test_same_seed_same_indices_across_processes():
    code = "from sparta_cli.tuners.sparta import select_indices as s; print(s(50000, 0.01, 7, 'a.b').sum().item())"
    outs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout for _ in range(2)]
    here = select_indices(50000, 0.01, 7, "a.b")
    assert outs[0] == outs[1] == f"{here.sum().item()}\n"
    assert not torch.equal(here, select_indices(50000, 0.01, 8, "a.b"))
    assert not torch.equal(here, select_indices(50000, 0.01, 7, "a.c"))


@pytest.mark.parametrize("density", [0.001, 0.005, 0.3])  # sampled product (CPU and CUDA), sampled on CUDA only, dense
def test_sparse_weight_grad_matches_dense(density):
    torch.manual_seed(0)
    g, x = torch.randn(4, 5, 48), torch.randn(4, 5, 40)
    idx = select_indices(48 * 40, density, 1, "w")
    dense = torch.einsum("bto,bti->oi", g, x).reshape(-1)
    torch.testing.assert_close(sparse_weight_grad(g, x, idx, 40), dense[idx.long()], rtol=1e-5, atol=1e-5)


def _dense_reference_grads(arch):
    """Gradients of every weight of the same model, plain and dense."""
    ref = tiny_model(arch)
    for p in ref.parameters():
        p.requires_grad_(True)
    batch = {**tiny_batch(), "labels": torch.tensor([0, 2, 1])}
    ref(**batch).loss.backward()
    return ref, batch


@pytest.mark.parametrize("arch", ARCHS)
def test_delta_grads_equal_masked_dense_grads(arch):
    ref, batch = _dense_reference_grads(arch)
    model = tiny_model(arch)
    adapter = apply_adapter(model, AdapterConfig(targets=["v", "o", "up"], density=0.1), seed=5, head_modules=["score" if arch != "bert" else "classifier"])
    model.train(), ref.train()
    for m in (model, ref):  # dropout off, same computation
        for mod in m.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
    model(**batch).loss.backward()
    ref_params = dict(ref.named_parameters())
    assert adapter.sparta.layers
    for name, layer in adapter.sparta.layers.items():
        expected = ref_params[f"{name}.weight"].grad.reshape(-1)[layer.sparta_indices.long()]
        torch.testing.assert_close(layer.sparta_delta.grad, expected, rtol=1e-4, atol=1e-6)
    head = adapter.head_modules[0]
    for pname, p in model.get_submodule(head).named_parameters():
        torch.testing.assert_close(p.grad, ref_params[f"{head}.{pname}"].grad, rtol=1e-4, atol=1e-6)
    # no frozen tensor ever gets a .grad
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name


def test_optimizer_state_is_order_k():
    model = tiny_model("llama")
    adapter = apply_adapter(model, AdapterConfig(density=0.05), seed=0, head_modules=["score"])
    opt = torch.optim.AdamW([p for _, p in adapter.trainable()], lr=1e-2)
    batch = {**tiny_batch(), "labels": torch.tensor([0, 2, 1])}
    model.train()
    model(**batch).loss.backward()
    opt.step()
    state_numel = sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
    assert state_numel == 2 * adapter.num_trainable()
    assert adapter.num_trainable() < 0.2 * adapter.base_params
    for layer in adapter.sparta.layers.values():
        assert layer.sparta_delta.dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unmerge_is_bit_exact_and_weights_track_deltas(dtype):
    model = tiny_model("mistral", dtype=dtype)
    originals = {n: p.detach().clone() for n, p in model.named_parameters()}
    sparta = SpartaModel.inject(model, ["v", "o"], 0.2, seed=1)
    with torch.no_grad():
        for layer in sparta.layers.values():
            layer.sparta_delta.normal_(0, 0.1)
    model(**tiny_batch())  # forward writes W0 + delta
    for name, layer in sparta.layers.items():
        idx = layer.sparta_indices.long()
        expected = (originals[f"{name}.weight"].reshape(-1)[idx].float() + layer.sparta_delta).to(dtype)
        assert torch.equal(layer.weight.reshape(-1)[idx], expected)
        # repeated writes do not drift
        layer.write_weight()
        layer.write_weight()
        assert torch.equal(layer.weight.reshape(-1)[idx], expected)
    sparta.unload()
    for name, p in model.named_parameters():
        assert torch.equal(p, originals[name]), name


def test_merge_and_unload_gives_same_logits():
    model = tiny_model("llama")
    sparta = SpartaModel.inject(model, ["v", "o"], 0.2, seed=1)
    with torch.no_grad():
        for layer in sparta.layers.values():
            layer.sparta_delta.normal_(0, 0.2)
    batch = tiny_batch()
    with torch.no_grad():
        live = model(**batch).logits
        plain = sparta.merge_and_unload()
        merged = plain(**batch).logits
    assert not any(isinstance(m, SpartaLinear) for m in plain.modules())
    assert torch.equal(live, merged)


def test_density_too_small_names_module_and_fix():
    model = tiny_model("llama")
    with pytest.raises(SpartaError, match="gives 0 trainable entries"):
        SpartaModel.inject(model, ["v"], 1e-6, seed=0)


def test_unknown_target_lists_available():
    model = tiny_model("bert")
    with pytest.raises(SpartaError, match="it has q, k, v, o, up, down"):
        SpartaModel.inject(model, ["gate"], 0.1, seed=0)
    assert SpartaModel.inject(model, ["re:attention\\.self\\.key$"], 0.1, seed=0).layers
