"""The fused output-layer cross-entropy equals autograd's through the plain head, in value and in gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from finetune.modeling.ops import gemm
from finetune.modeling.ops import loss as loss_mod
from finetune.modeling.ops.loss import CausalLMLoss


class _Head(nn.Module):
    """Just enough of a causal LM for CausalLMLoss.token_loss: an output layer and a config."""

    def __init__(self, hidden: int, vocab: int, softcap: float | None):
        super().__init__()
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.config = type("Config", (), {"final_logit_softcapping": softcap})()

    def get_decoder(self):
        return None

    def get_output_embeddings(self):
        return self.lm_head


def _reference(hidden, weight, targets, softcap):
    logits = F.linear(hidden, weight).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


@pytest.mark.parametrize("onednn", [False, True], ids=["torch-matmuls", "onednn-matmuls"])
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("rows_per_chunk", [1000, 7])  # one chunk, and many (with a ragged last one)
def test_fused_loss_and_gradient_match_autograd_fp32(softcap, rows_per_chunk, onednn, monkeypatch):
    vocab = 97
    monkeypatch.setattr(loss_mod, "_CPU_CHUNK_ROWS", rows_per_chunk)
    if onednn and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(gemm, "_onednn", onednn)
    torch.manual_seed(0)
    model = _Head(16, vocab, softcap).requires_grad_(False)
    hidden = torch.randn(45, 16) * 3
    targets = torch.randint(0, vocab, (45,))
    scale = torch.tensor(0.37)  # the normalisation a training step applies

    h1 = hidden.clone().requires_grad_(True)
    fused = CausalLMLoss(model).token_loss(h1, targets)
    (fused * scale).backward()
    h2 = hidden.clone().requires_grad_(True)
    expected = _reference(h2, model.lm_head.weight, targets, softcap)
    (expected * scale).backward()

    torch.testing.assert_close(fused, expected, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-5, atol=1e-7)
    assert h1.grad.abs().max() > 1e-3  # a gradient that is there to compare


def test_fused_loss_under_bf16_autocast_matches_autograd():
    torch.manual_seed(1)
    model = _Head(32, 211, None).to(torch.bfloat16).requires_grad_(False)
    hidden = torch.randn(60, 32, dtype=torch.bfloat16)
    targets = torch.randint(0, 211, (60,))
    grads, losses = [], []
    for fn in (lambda h: CausalLMLoss(model).token_loss(h, targets),
               lambda h: _reference(h, model.lm_head.weight, targets, None)):
        h = hidden.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            value = fn(h)
        (value / 60).backward()
        losses.append(value.detach())
        grads.append(h.grad.float())
    assert grads[0].dtype == grads[1].dtype
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-4)
    # Both round the logits' gradient to bf16 before the matmul; ours rounds once more after it (the scale).
    torch.testing.assert_close(grads[0], grads[1], rtol=2e-2, atol=2e-4)


def test_no_grad_evaluation_and_trained_heads_take_the_right_path(monkeypatch):
    torch.manual_seed(2)
    model = _Head(8, 31, None)
    hidden, targets = torch.randn(10, 8), torch.randint(0, 31, (10,))
    calls = []
    original = loss_mod._HeadCrossEntropy.apply
    monkeypatch.setattr(loss_mod._HeadCrossEntropy, "apply", lambda *a: calls.append(a[-1]) or original(*a))

    # A trained head (LoRA or modules_to_save on lm_head) needs its weight gradient: plain autograd.
    hidden_t = hidden.clone().requires_grad_(True)
    trained = CausalLMLoss(model).token_loss(hidden_t, targets)
    trained.backward()
    assert calls == [] and model.lm_head.weight.grad is not None

    model.requires_grad_(False)
    with torch.no_grad():
        value = CausalLMLoss(model).token_loss(hidden, targets)
    assert calls == [False]  # evaluation computes no gradient
    torch.testing.assert_close(value, _reference(hidden, model.lm_head.weight, targets, None))
