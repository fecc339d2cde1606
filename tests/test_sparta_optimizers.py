"""Every optimizer choice trains what the forward sees: after N steps the SpaRTA model's logits
equal those of a fresh model whose weights are W0 + delta written densely (a plain reference)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_batch, tiny_model
from torch import nn

from sparta_cli.optim import OPTIMIZERS, build_optimizer, resolve_optimizer
from sparta_cli.tuners import apply_adapter
from sparta_cli.tuners.sparta.config import SpartaConfig
from sparta_cli.tuners.sparta.layer import CHECK_WEIGHTS_ENV
from sparta_cli.tuners.sparta.model import SpartaModel

LABELS = torch.tensor([0, 2, 1])


def _sparta_llama():
    model = tiny_model("llama")
    adapter = apply_adapter(model, SpartaConfig(targets=["v", "o"], density=0.1), seed=3, head_modules=["score"])
    return model, adapter


def _dense_reference(adapter) -> nn.Module:
    """A fresh copy of the base whose weights hold W0 + delta (and the trained head), no SpaRTA layer."""
    ref = tiny_model("llama")
    params = dict(ref.named_parameters())
    with torch.no_grad():
        for name, layer in adapter.sparta.layers.items():
            weight = params[f"{name}.weight"]
            idx = layer.sparta_indices.long()
            weight.view(-1)[idx] = (weight.view(-1)[idx].float() + layer.sparta_delta).to(weight.dtype)
        for pname, p in adapter.model.score.named_parameters():
            params[f"score.{pname}"].copy_(p)
    return ref


def _logits(model: nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tiny_batch(seed=7)).logits


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains_what_the_forward_sees(name):
    from accelerate import Accelerator

    model, adapter = _sparta_llama()
    untrained = _logits(model)
    optimizer = build_optimizer(adapter, name, lr=0.05, head_lr=None, weight_decay=0.01)
    run_model, optimizer = Accelerator(cpu=True).prepare(model, optimizer)  # the wrapped optimizer, as in train()
    run_model.train()
    for step in range(3):
        loss = run_model(**tiny_batch(seed=step), labels=LABELS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    deltas = torch.cat([layer.sparta_delta.detach() for layer in adapter.sparta.layers.values()])
    assert deltas.abs().max() > 1e-3  # the steps moved the deltas
    trained = _logits(model)
    assert not torch.allclose(trained, untrained, atol=1e-4)  # and the forward sees them
    torch.testing.assert_close(trained, _logits(_dense_reference(adapter)), rtol=0, atol=0)


def test_fused_adamw_leaves_the_version_counter_alone():
    # why the write cannot be inferred from `_version`: this torch's fused AdamW does not bump it
    model, adapter = _sparta_llama()
    optimizer = torch.optim.AdamW([p for _, p in adapter.trainable()], lr=0.1, fused=True)
    model.train()
    model(**tiny_batch(), labels=LABELS).loss.backward()
    layer = next(iter(adapter.sparta.layers.values()))
    before = layer.sparta_delta._version
    optimizer.step()
    assert layer.sparta_delta._version == before and layer.sparta_delta.abs().max() > 0


def test_deltas_written_through_data_are_seen_after_the_step_hook(monkeypatch):
    model, adapter = _sparta_llama()
    optimizer = build_optimizer(adapter, "sgd", lr=0.1, head_lr=None, weight_decay=0.0)
    with torch.no_grad():
        for layer in adapter.sparta.layers.values():
            layer.sparta_delta.data.normal_(0, 0.3)  # no version bump, no autograd trace
    monkeypatch.setenv(CHECK_WEIGHTS_ENV, "1")
    with pytest.raises(RuntimeError, match="does not hold W0 \\+ delta"):
        _logits(model)  # the debug check catches the stale weight
    optimizer.step()  # no gradients: nothing moves, but the post-hook writes W0 + delta
    torch.testing.assert_close(_logits(model), _logits(_dense_reference(adapter)), rtol=0, atol=0)


def test_loading_deltas_writes_the_weights():
    model, adapter = _sparta_llama()
    with torch.no_grad():
        for layer in adapter.sparta.layers.values():
            layer.sparta_delta.normal_(0, 0.3)
    adapter.sparta.write_weights()
    fresh = tiny_model("llama")
    fresh.score.load_state_dict(model.score.state_dict())
    tensors = adapter.sparta.state_tensors()
    loaded = SpartaModel.attach(fresh, {k.removesuffix(".indices"): v for k, v in tensors.items() if k.endswith(".indices")})
    loaded.load_deltas(tensors)
    assert all(layer.weight_is_written() for layer in loaded.layers.values())
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


def test_auto_optimizer_is_fused_on_cuda_only():
    assert resolve_optimizer("auto", "cuda") == "adamw_fused"
    assert resolve_optimizer("auto", torch.device("cpu")) == "adamw"
    assert resolve_optimizer("sgd", "cuda") == "sgd"
