"""Exact rewrites of the training arithmetic (fused LoRA update, lean RMSNorm and gated MLP) equal the code they
replace, and anything they do not recognise keeps its own path."""

import copy
import inspect
import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from finetune.modeling.ops.lora import fuse_lora_updates, lora_path


class TwoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(24, 40, bias=False)
        self.down = nn.Linear(40, 24, bias=True)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def adapted(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    model = get_peft_model(TwoLinears(), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                     target_modules=["up", "down"]))
    for p in model.parameters():
        if p.requires_grad:  # B starts at zero in peft; give the adapter something to add
            nn.init.normal_(p, std=0.1)
    return model


def run(model: nn.Module, x: torch.Tensor, upstream: torch.Tensor):
    x = x.clone().requires_grad_(True)
    out = model(x)
    out.backward(upstream)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), x.grad, grads


def assert_runs_match(reference: nn.Module, changed: nn.Module, x: torch.Tensor, upstream: torch.Tensor, *,
                      grads: int) -> None:
    """Same output, input gradient and adapter gradients (``grads`` of them) from both models, in fp32."""
    out_ref, gx_ref, g_ref = run(reference, x, upstream)
    out, gx, g = run(changed, x, upstream)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == grads
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6, msg=name)


def test_fused_update_matches_peft_forward_and_gradients():
    reference = adapted()
    fused = copy.deepcopy(reference)
    assert fuse_lora_updates(fused) == 2
    x, upstream = torch.randn(3, 7, 24), torch.randn(3, 7, 24)
    assert_runs_match(reference, fused, x, upstream, grads=4)


class AddsInPlace(TwoLinears):
    """Changes a projection's output in place, as Falcon's decoder layer does (``mlp_output += attention``)."""

    def forward(self, x):
        out = self.down(torch.relu(self.up(x)))
        out += x
        return out


def test_fused_update_output_may_be_changed_in_place():
    torch.manual_seed(0)
    reference = get_peft_model(AddsInPlace(), LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"]))
    for p in reference.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    fused = copy.deepcopy(reference)
    assert fuse_lora_updates(fused) == 2
    assert lora_path(fused.base_model.model.down) == "fused"
    x, upstream = torch.randn(3, 7, 24), torch.randn(3, 7, 24)
    assert_runs_match(reference, fused, x, upstream, grads=4)


def test_fused_update_under_bf16_autocast_matches_peft_forward():
    reference = adapted().to(torch.bfloat16)
    for module in reference.modules():  # adapters stay fp32 on a bf16 base, as in training
        if isinstance(module, LoraLinear):
            module.lora_A.float(), module.lora_B.float()
    fused = copy.deepcopy(reference)
    fuse_lora_updates(fused)
    x = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    upstream = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    results = []
    for model in (reference, fused):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(model, x, upstream))
    (out_ref, gx_ref, g_ref), (out, gx, g) = results
    assert out.dtype == out_ref.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)
    for name in g_ref:
        assert g[name].dtype == torch.float32
        torch.testing.assert_close(g[name], g_ref[name], rtol=2e-2, atol=2e-2, msg=name)


def test_fused_update_with_a_trained_base_layer_still_matches(monkeypatch: pytest.MonkeyPatch):
    """A base layer that trains too needs its own gradients: the fused update keeps autograd for it."""
    from finetune.modeling.ops import lora as modeling

    reference = adapted()
    reference.requires_grad_(True)
    fused = copy.deepcopy(reference)
    fuse_lora_updates(fused)
    monkeypatch.setattr(modeling._LoraLinear, "apply", lambda *a: pytest.fail("a trained base took the fused path"))
    x, upstream = torch.randn(3, 7, 24), torch.randn(3, 7, 24)
    out_ref, gx_ref, g_ref = run(reference, x, upstream)
    out, gx, g = run(fused, x, upstream)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-5, atol=1e-6)
    assert g.keys() == g_ref.keys() and len(g) == 7  # weights and the bias of the base layers too
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-5, atol=1e-6)


def test_fused_update_changes_the_output_when_the_adapter_does():
    """Guards against a fused path that silently drops the LoRA term (it would still match a zero-B adapter)."""
    model = adapted()
    fuse_lora_updates(model)
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        with_adapter = model(x)
        with model.disable_adapter():
            without = model(x)
    assert (with_adapter - without).abs().max() > 1e-3


@pytest.mark.parametrize("case", ["dropout", "merged"])
def test_other_cases_keep_peft_forward(case: str, monkeypatch: pytest.MonkeyPatch):
    model = adapted(dropout=0.5 if case == "dropout" else 0.0)
    fuse_lora_updates(model)
    if case == "merged":
        model.merge_adapter()
    calls = []
    original = LoraLinear.forward

    def spy(self, x, *args, **kwargs):
        calls.append(self)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(LoraLinear, "forward", spy)
    model.train()
    model(torch.randn(2, 5, 24))
    assert len(calls) == 2


def assert_same_logits_and_gradients(reference: nn.Module, changed: nn.Module, grad_atol: float) -> None:
    """Same logits and the same gradient for every weight (all trainable here, so the rewritten modules' own
    weight gradients are checked too) on a fixed batch and upstream gradient."""
    vocab = reference.config.vocab_size
    ids = torch.randint(0, vocab, (2, 19), generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(2, 19, vocab, generator=torch.Generator().manual_seed(1))
    outs = []
    for model in (reference, changed):
        model.requires_grad_(True)
        logits = model(ids).logits
        logits.backward(upstream)
        outs.append((logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for name, grad in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][name], grad, rtol=1e-4, atol=grad_atol, msg=name)


def test_lean_rms_norm_matches_llama_forward_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.modeling.ops.norms import fuse_rms_norms

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lean = copy.deepcopy(reference)
    layers = reference.config.num_hidden_layers
    assert fuse_rms_norms(lean) == 2 * layers + 1  # two per decoder layer and the final one
    assert_same_logits_and_gradients(reference, lean, grad_atol=1e-4)


def test_only_llama_style_norms_are_changed():
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from finetune.modeling.ops.norms import fuse_rms_norms

    class OffsetNorm(LlamaRMSNorm):  # Gemma-style (1 + weight): another formula, must keep its own forward
        def forward(self, hidden_states):
            return super().forward(hidden_states) * 2

    model = nn.Sequential(LlamaRMSNorm(8), OffsetNorm(8), nn.LayerNorm(8))
    assert fuse_rms_norms(model) == 1
    assert "forward" in vars(model[0]) and "forward" not in vars(model[1])


def test_lean_gated_mlp_matches_llama_forward_and_gradients(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from finetune.modeling.ops.mlp import fuse_gated_mlps

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    lean = copy.deepcopy(reference)
    assert fuse_gated_mlps(lean) == reference.config.num_hidden_layers
    assert_same_logits_and_gradients(reference, lean, grad_atol=1e-5)


def test_lean_gated_mlp_saves_one_tensor_less():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from finetune.modeling.ops.mlp import fuse_gated_mlps

    mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2, hidden_act="silu"))
    x = torch.randn(3, 16, requires_grad=True)

    def saved_widths(module) -> list[int]:
        widths: list[int] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: widths.append(t.shape[-1]) or t, lambda t: t):
            module(x)
        return widths

    before = saved_widths(mlp).count(40)
    assert fuse_gated_mlps(mlp) == 1
    assert saved_widths(mlp).count(40) == before - 1


def test_only_silu_llama_mlps_are_changed():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    from finetune.modeling.ops.mlp import fuse_gated_mlps

    gelu = LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2, hidden_act="gelu"))

    class Scaled(LlamaMLP):  # another forward: must keep it
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.ModuleList([gelu, Scaled(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2)),
                           LlamaMLP(LlamaConfig(hidden_size=8, intermediate_size=16, num_attention_heads=2))])
    assert fuse_gated_mlps(model) == 1
    assert "forward" in vars(model[2]) and "forward" not in vars(model[0]) and "forward" not in vars(model[1])


class NormThenMLP(nn.Module):
    """A Llama block's second half: RMSNorm, then a gated MLP (gate and up both read the norm's output)."""

    def __init__(self):
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

        super().__init__()
        self.norm = LlamaRMSNorm(16)
        self.mlp = LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=40, num_attention_heads=2,
                                        hidden_act="silu"))

    def forward(self, x):
        return self.mlp(self.norm(x))


def lean_block_pair() -> tuple[nn.Module, nn.Module]:
    """(peft's model, the same with the fused LoRA, lean norm and lean gated MLP), adapters on every linear."""
    from finetune.modeling.ops.mlp import fuse_gated_mlps
    from finetune.modeling.ops.norms import fuse_rms_norms

    torch.manual_seed(0)
    base = NormThenMLP()
    nn.init.normal_(base.norm.weight, mean=1.0, std=0.2)
    reference = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj",
                                                                                   "down_proj"]))
    for p in reference.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    lean = copy.deepcopy(reference)
    assert fuse_lora_updates(lean) == 3 and fuse_rms_norms(lean) == 1 and fuse_gated_mlps(lean) == 1
    return reference, lean


def test_lean_block_keeps_neither_the_norm_output_nor_the_down_input_and_matches_peft():
    """With the fused LoRA path on every projection, gate and up rebuild the norm's output instead of keeping
    it, and the down projection rebuilds its input from gate and up: of the block's activations only the
    norm's input (and its per-token scale) and gate and up are kept."""
    reference, lean = lean_block_pair()
    x, upstream = torch.randn(3, 7, 16), torch.randn(3, 7, 16)

    def kept(model) -> list[tuple[int, ...]]:
        storages: dict[int, tuple[int, ...]] = {}  # one entry per memory kept, however many keep it
        inp = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: storages.setdefault(t.untyped_storage().data_ptr(), tuple(t.shape)) and t, lambda t: t):
            model(inp)
        return [s for s in storages.values() if s[0] in (3, 21)]  # activations: [3, 7, ...] or flattened [21, ...]

    lean_kept = kept(lean)
    assert sorted(s[-1] for s in lean_kept if s[-1] in (16, 40)) == [16, 40, 40], lean_kept
    assert len([s for s in kept(reference) if s[-1] in (16, 40)]) > 5  # peft keeps the rest: the test can fail
    assert_runs_match(reference, lean, x, upstream, grads=6)


def test_a_norm_output_is_rebuilt_once_for_all_its_readers(monkeypatch: pytest.MonkeyPatch):
    from finetune.modeling.ops import norms

    calls = []
    original = norms._scaled
    monkeypatch.setattr(norms, "_scaled", lambda *a: calls.append(1) or original(*a))
    _, lean = lean_block_pair()
    run(lean, torch.randn(3, 7, 16), torch.randn(3, 7, 16))
    assert len(calls) == 1  # gate's and up's backward share one rebuild; the forward computes it inline


def test_a_norm_output_read_by_another_layer_too_is_kept_and_still_right():
    """A reader that does not know how to rebuild (here a plain frozen linear beside the fused ones) keeps the
    output; the fused readers still rebuild theirs, and every gradient is right."""
    reference, lean = lean_block_pair()
    extra = nn.Linear(16, 16).requires_grad_(False)
    for model in (reference, lean):
        inner = model.base_model.model
        inner.extra = copy.deepcopy(extra)
        inner.forward = lambda x, m=inner: (lambda h: m.mlp(h) + m.extra(h))(m.norm(x))
    x, upstream = torch.randn(3, 7, 16), torch.randn(3, 7, 16)
    assert_runs_match(reference, lean, x, upstream, grads=6)


def test_lean_block_under_bf16_autocast_matches_peft():
    reference, lean = lean_block_pair()
    for model in (reference, lean):
        model.to(torch.bfloat16)
        for module in model.modules():  # adapters stay fp32 on a bf16 base, as in training
            if isinstance(module, LoraLinear):
                module.lora_A.float(), module.lora_B.float()
    x, upstream = torch.randn(3, 7, 16, dtype=torch.bfloat16), torch.randn(3, 7, 16, dtype=torch.bfloat16)
    results = []
    for model in (reference, lean):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(run(model, x, upstream))
    (out_ref, gx_ref, g_ref), (out, gx, g) = results
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)
    for name in g_ref:
        assert g[name].dtype == torch.float32
        torch.testing.assert_close(g[name], g_ref[name], rtol=3e-2, atol=3e-2, msg=name)


@pytest.mark.parametrize("case", ["fp32", "bf16-queries-fp32-angles", "heads-last"])
def test_rotary_function_equals_transformers(case: str):
    """Outputs, dtypes and input gradients of transformers' RoPE, with grouped heads (4 query, 2 key), the dtype
    mix autocast produces (bf16 projections, fp32 angles: an fp32 result), and the other layout transformers
    allows (``unsqueeze_dim=2``)."""
    from transformers.models.llama.modeling_llama import LlamaConfig, LlamaRotaryEmbedding, apply_rotary_pos_emb

    from finetune.modeling.ops.rotary import apply_rotary_pos_emb as ours

    generator = torch.Generator().manual_seed(0)
    dtype = torch.bfloat16 if case.startswith("bf16") else torch.float32
    heads_axis = 2 if case == "heads-last" else 1

    def shape(heads: int) -> list[int]:
        return [2, 11, heads, 16] if heads_axis == 2 else [2, heads, 11, 16]

    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16))
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5], list(range(11))])
    cos, sin = rotary(torch.zeros(1, dtype=torch.float32), positions)
    q, k = torch.randn(shape(4), generator=generator), torch.randn(shape(2), generator=generator)
    grads = [torch.randn(shape(h), generator=generator) for h in (4, 2)]
    results = []
    for function in (apply_rotary_pos_emb, ours):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k)]
        outs = function(*inputs, cos, sin, unsqueeze_dim=heads_axis)
        torch.autograd.backward(outs, grads)
        results.append([*outs, *(t.grad for t in inputs)])
    # bf16 gradients: transformers rounds each term to bf16 before adding, we round the sum once
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, want in zip(results[1], results[0]):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, **tol)
    assert results[0][2].dtype == dtype


@pytest.mark.parametrize("family", ["phi3", "gpt_neox"])
@pytest.mark.parametrize("rotary", [8, 16])  # a part of each head's 16 features, and all of them
def test_partial_rotary_function_equals_transformers(family: str, rotary: int):
    """Phi-3's and GPT-NeoX's RoPE functions rotate the first ``cos.shape[-1]`` features and pass the others
    through: ours gives the same outputs and input gradients, through both."""
    import importlib

    from finetune.modeling.ops.rotary import apply_partial_rotary_pos_emb as ours

    theirs = importlib.import_module(f"transformers.models.{family}.modeling_{family}").apply_rotary_pos_emb
    generator = torch.Generator().manual_seed(0)
    angles = torch.arange(11).float()[:, None] * torch.linspace(0.1, 1.0, rotary // 2)
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).unsqueeze(0) for f in (torch.cos, torch.sin))
    q, k = torch.randn(1, 4, 11, 16, generator=generator), torch.randn(1, 2, 11, 16, generator=generator)
    grads = [torch.randn(1, h, 11, 16, generator=generator) for h in (4, 2)]
    results = []
    for function in (theirs, ours):
        inputs = [t.clone().requires_grad_() for t in (q, k)]
        outs = function(*inputs, cos, sin)
        torch.autograd.backward(outs, grads)
        results.append([*outs, *(t.grad for t in inputs)])
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if rotary < 16:  # the features past the rotary part are passed through, forward and back
        assert torch.equal(results[1][0][..., rotary:], q[..., rotary:])
        assert torch.equal(results[1][2][..., rotary:], grads[0][..., rotary:])


def test_same_code_ignores_docstrings_only():
    from finetune.modeling.ops import same_code

    def f(x):
        """One docstring."""
        return x * 2

    def g(y):
        """Another, reworded in a copy."""
        return y * 2

    def h(x):
        """One docstring."""
        return x * 3

    def bare(x):
        return x * 2

    def says(x):
        """Hello."""
        return "Hello."  # the same constant as the docstring: the code loads the docstring's slot

    def says_other(x):
        """Goodbye."""
        return "Goodbye."

    assert same_code(f, g) and same_code(g, f) and same_code(f, bare)
    assert not same_code(f, h) and not same_code(h, bare)
    assert not same_code(says, says_other)  # same bytecode, different results


def test_rotary_rewrite_keeps_cached_generation_and_the_renamed_argument(tiny_model_dir):
    """The rewritten layers run their own forward code: with a key/value cache (generation), and with the old
    ``past_key_values`` argument name, which transformers' decorator still translates."""
    from transformers import AutoModelForCausalLM, DynamicCache

    from finetune.modeling.ops.rotary import fuse_rotary

    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    changed = copy.deepcopy(reference)
    assert fuse_rotary(changed) == reference.config.num_hidden_layers
    ids = torch.randint(5, reference.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outs = [m.generate(ids, max_new_tokens=6, do_sample=False) for m in (reference, changed)]
        assert torch.equal(outs[0], outs[1])
        attention = changed.model.layers[0].self_attn
        hidden = torch.randn(1, 9, reference.config.hidden_size, generator=torch.Generator().manual_seed(1))
        angles = changed.model.rotary_emb(hidden, torch.arange(9)[None])
        cache = DynamicCache(config=reference.config)
        with pytest.warns(FutureWarning, match="past_key_values"):
            attention(hidden, angles, None, past_key_values=cache)
        assert cache.get_seq_length() == 9  # the cache was used, under its new name


def test_rotary_rewrite_leaves_a_layer_with_a_hub_kernel_alone(tiny_model_dir):
    """With the ``kernels`` package (transformers requires it from 5.25), the rewrite goes through the package's
    routing wrapper, except in a layer for which ``kernelize`` chose a hub RoPE kernel: that layer keeps it."""
    pytest.importorskip("kernels")
    from transformers import AutoModelForCausalLM

    from finetune.modeling.ops.rotary import fuse_rotary

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    copies = vars(model.model.layers[0].self_attn).get("_kernel_funcs")
    if not copies:
        pytest.skip("this transformers does not route RoPE through the kernels package")
    chosen = next(iter(copies.values()))
    chosen.forward = types.MethodType(lambda self, *args, **kwargs: None, chosen)  # as kernelize sets a kernel
    assert fuse_rotary(model) == model.config.num_hidden_layers - 1
    assert "forward" not in vars(model.model.layers[0].self_attn)
    assert "forward" in vars(model.model.layers[1].self_attn)


def test_rotary_rewrite_leaves_other_forwards_alone():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Attention
    from transformers.models.llama.modeling_llama import LlamaAttention

    from finetune.modeling.ops.rotary import _with_our_rotary

    assert _with_our_rotary(LlamaAttention.forward) is not None
    assert _with_our_rotary(GPT2Attention.forward) is None  # learned positions, no RoPE

    def logged(function):  # a decorator other than transformers' argument renaming: its effect is unknown
        def wrapper(*args, **kwargs):
            return function(*args, **kwargs)
        wrapper.__wrapped__ = function
        return wrapper

    assert _with_our_rotary(logged(inspect.unwrap(LlamaAttention.forward))) is None
