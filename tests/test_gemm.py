"""fp32 CPU products through oneDNN equal ``F.linear``; the library follows the machine and falls back to torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from finetune.modeling.ops import gemm

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear")


@needs_onednn
@pytest.mark.parametrize("layout", ["out-in", "transposed-view"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_onednn_linear_equals_torch(layout: str, with_bias: bool, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gemm, "_onednn", True)
    torch.manual_seed(0)
    x = torch.randn(70, 48)
    # nn.Linear keeps [out, in]; GPT-2's Conv1D keeps [in, out] and the fused layer passes its transpose (a view)
    weight = torch.randn(96, 48) if layout == "out-in" else torch.randn(48, 96).t()
    bias = torch.randn(96) if with_bias else None
    got = gemm.linear(x, weight, bias)
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)
    # the same product in float64: oneDNN differs from it only by fp32 rounding, as MKL does
    exact = F.linear(x.double(), weight.double(), bias.double() if with_bias else None)
    assert (got.double() - exact).abs().max() < 1e-4


@needs_onednn
def test_other_dtypes_and_shapes_keep_torch(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gemm, "_onednn", True)
    calls = []
    real = torch.ops.mkldnn._linear_pointwise
    monkeypatch.setattr(gemm, "_onednn_linear", lambda *a: calls.append(1) or real(*a))
    x, w = torch.randn(4, 8), torch.randn(6, 8)
    gemm.linear(x, w)
    assert calls == [1]
    assert torch.equal(gemm.linear(x.bfloat16(), w.bfloat16()), F.linear(x.bfloat16(), w.bfloat16()))
    assert gemm.linear(torch.randn(0, 8), w).shape == (0, 6)
    assert gemm.linear(torch.randn(2, 4, 8), w).shape == (2, 4, 6)
    assert calls == [1]  # bf16, an empty batch and a 3-d input went to torch


def test_the_choice_follows_the_machine_not_a_timing(monkeypatch: pytest.MonkeyPatch):
    import platform

    x86 = platform.machine().lower() in ("x86_64", "amd64")
    expected = "onednn" if x86 and gemm.onednn_available() else "torch"
    assert [gemm.choose_fp32_cpu_linear() for _ in range(3)] == [expected] * 3  # same answer every time
    assert gemm._onednn == (expected == "onednn")
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert gemm.choose_fp32_cpu_linear() == "torch" and gemm._onednn is False
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(gemm, "onednn_available", lambda: False)
    assert gemm.choose_fp32_cpu_linear() == "torch" and gemm._onednn is False
    gemm.use_onednn(True)
    assert gemm._onednn is False  # cannot be forced on without the operator


@needs_onednn
def test_frozen_weights_are_packed_once_and_follow_changes(monkeypatch: pytest.MonkeyPatch):
    import gc

    # Weights that earlier tests in this process packed, and left in garbage cycles, give back their bytes when
    # collected: collected now, not inside this test's count (which one more gc.collect() below would upset).
    gc.collect()
    monkeypatch.setattr(gemm, "_onednn", True)
    monkeypatch.setattr(gemm, "_packed_bytes", 0)
    packs = []
    real = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: packs.append(1) or real(*a),
                        raising=False)
    torch.manual_seed(0)
    weight = torch.randn(96, 48)  # [out, in]; the input gradient uses its transpose
    x, g = torch.randn(70, 48), torch.randn(70, 96)
    for _ in range(3):
        torch.testing.assert_close(gemm.linear(x, weight, frozen=True), F.linear(x, weight), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gemm.linear(g, weight.t(), frozen=True), g @ weight, rtol=1e-5, atol=1e-5)
    assert len(packs) == 2  # one packed copy per use of the weight, made once
    assert gemm._packed_bytes == 2 * weight.numel() * 4
    with torch.no_grad():
        weight.mul_(2)  # a changed weight is packed again, not served stale
    torch.testing.assert_close(gemm.linear(x, weight, frozen=True), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert len(packs) == 3 and gemm._packed_bytes == 2 * weight.numel() * 4
    del weight
    gc.collect()
    assert gemm._packed_bytes == 0  # the copies went with the weight


@needs_onednn
def test_past_the_budget_weights_are_used_as_they_are(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(gemm, "_onednn", True)
    monkeypatch.setattr(gemm, "_pack_budget", lambda: 100)  # bytes: less than any weight here
    weight, x = torch.randn(96, 48), torch.randn(70, 48)
    torch.testing.assert_close(gemm.linear(x, weight, frozen=True), F.linear(x, weight), rtol=1e-5, atol=1e-5)
    assert not getattr(weight, gemm._PACKED_ATTR)


def test_choosing_leaves_the_random_generator_alone():
    """Training chooses after seeding; a resumed run restores the generator and must draw the same dropout."""
    gemm.onednn_available.cache_clear()
    state = torch.get_rng_state()
    gemm.choose_fp32_cpu_linear()
    assert torch.equal(torch.get_rng_state(), state)
