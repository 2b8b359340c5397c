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


def test_band_rows_follow_the_vocabulary_on_cpus_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert loss_mod._band_rows(8192, 128, cpu) == 128  # up to 32K: the whole chunk at once, as before
    assert loss_mod._band_rows(131072, 128, cpu) == 32
    assert loss_mod._band_rows(10**8, 128, cpu) == 1
    assert loss_mod._band_rows(131072, 128, gpu) == 128


@pytest.mark.parametrize("rows_per_chunk", [1000, 7])
def test_loss_in_bands_of_rows_is_the_unbanded_arithmetic(rows_per_chunk, monkeypatch):
    """A large vocabulary's chunks run their softmax a band of rows at a time. Rows are independent, so bands
    compute exactly what whole chunks do: in bf16 the loss and gradient are bit for bit the unbanded ones (only
    the loss's fp32 sum is taken in another order: one rounding of fp32, ~6e-8 relative per addition), and in
    fp32 they match autograd's unchunked cross-entropy as the fused loss always has (test above)."""
    vocab = 301
    monkeypatch.setattr(loss_mod, "_CPU_CHUNK_ROWS", rows_per_chunk)
    torch.manual_seed(3)
    banded_calls = []
    original = loss_mod._rows_loss
    monkeypatch.setattr(loss_mod, "_rows_loss", lambda x, *a: banded_calls.append(x.shape[0]) or original(x, *a))
    for dtype in (torch.bfloat16, torch.float32):
        model = _Head(24, vocab, None).to(dtype).requires_grad_(False)
        hidden = (torch.randn(45, 24) * 3).to(dtype)
        targets = torch.randint(0, vocab, (45,))
        results = []
        for band_logits in (10**9, 4 * vocab):  # whole chunks; bands of 4 rows (the last band of a chunk ragged)
            monkeypatch.setattr(loss_mod, "_CPU_BAND_LOGITS", band_logits)
            banded_calls.clear()
            h = hidden.clone().requires_grad_(True)
            value = CausalLMLoss(model).token_loss(h, targets)
            (value * 0.37).backward()
            every = loss_mod._head_rows(hidden, model.lm_head.weight, targets, None, rows_per_chunk, False)[1]
            results.append((value.detach(), h.grad, every))  # every: each row's log-probability (DPO's)
            assert max(banded_calls) == min(rows_per_chunk, 45 if band_logits > 10**8 else 4)
        (whole, whole_grad, whole_every), (banded, banded_grad, banded_every) = results
        torch.testing.assert_close(banded, whole, rtol=1e-6, atol=0)
        assert torch.equal(banded_every, whole_every)
        if dtype == torch.bfloat16:
            assert torch.equal(banded_grad, whole_grad)
        else:
            h = hidden.clone().requires_grad_(True)
            (_reference(h, model.lm_head.weight, targets, None) * 0.37).backward()
            torch.testing.assert_close(banded, _reference(hidden, model.lm_head.weight, targets, None),
                                       rtol=1e-6, atol=1e-5)
            torch.testing.assert_close(banded_grad, h.grad, rtol=1e-5, atol=1e-7)
        assert banded_grad.abs().max() > 1e-3
