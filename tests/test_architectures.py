"""Every rewritten training path equals the unrewritten model on every architecture the benchmark uses (Llama,
Qwen2 with grouped-query attention, q/k/v biases and an untied head, GPT-2 with Conv1D, LayerNorm and learned
positions), or stays off and says so.

Tiny models of other transformers families (Mistral, Qwen3, a mixture of experts, Gemma, Cohere, Bloom, ...) are
held to the same standard, or refused with a reason where packing cannot be computed for them.

The reference is what peft and transformers compute without us: eager attention over each sequence alone, peft's
LoRA forward, the model's own norms and MLPs, cross-entropy over whole logits. The rewritten model is what
training runs: one packed row through ``finetune_varlen`` attention, every rewrite ``rewrite_for_training``
applies, the fused loss of :class:`CausalLMLoss`. Both start from the same weights and the same non-zero adapter.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from finetune.data.batching import collate_packed, collate_padded
from finetune.errors import PackingError
from finetune.modeling.load import load_base_model
from finetune.modeling.ops import gemm, loss_rows, rewrite_for_training
from finetune.modeling.ops.attention import VARLEN_ATTENTION, register_varlen_attention
from finetune.modeling.ops.loss import CausalLMLoss
from finetune.modeling.ops.mlp import fuse_gated_mlps
from finetune.registry.sources import BaseSource
from finetune.tiny import ARCHITECTURES, build_tiny_model

CPU = torch.device("cpu")
SIZES = {"llama": {}, "qwen2": {"num_kv_heads": 2}, "gpt2": {}}  # Qwen2: 4 query heads share 2 key/value heads
LENGTHS = (5, 37, 70)  # under, over and across the attention's length quantum (32, in bf16)


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    out = tmp_path_factory.mktemp(request.param) / "model"
    build_tiny_model(out, tok, arch=request.param, hidden_size=64, num_layers=2, num_heads=4, **SIZES[request.param])
    return request.param, out


def adapted(model_dir: Path, attn: str, dropout: float = 0.0, **load):
    """The base, frozen, with a LoRA adapter on all linear layers whose weights are seeded and non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    register_varlen_attention()
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn, **load)
    base.requires_grad_(False)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                            task_type="CAUSAL_LM", fan_in_fan_out=base.config.model_type == "gpt2"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:  # B starts at zero in peft: give the adapter something to add
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
    return model


def sequences(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randint(5, vocab, (n,), generator=generator).tolist() for n in LENGTHS]


def reference_run(model, seqs: list[list[int]]):
    """Each sequence alone, everything as peft and transformers do it: logits, summed loss, adapter gradients."""
    total, logits = 0.0, []
    for seq in seqs:
        ids = torch.tensor([seq])
        out = model(input_ids=ids, use_cache=False).logits[0]
        total = total + F.cross_entropy(out[:-1], ids[0, 1:], reduction="sum")
        logits.append(out.detach())
    total.backward()
    return total.detach(), torch.cat(logits), _adapter_grads(model)


def rewritten_run(model, seqs: list[list[int]]):
    """One packed row, as training runs it."""
    batch = collate_packed([{"input_ids": s, "labels": s} for s in seqs])
    loss_sum, count = CausalLMLoss(model)(**batch)
    loss_sum.backward()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                       cu_seq_lens_q=batch["cu_seq_lens"], use_cache=False).logits[0]
    return loss_sum.detach(), int(count), logits[: sum(map(len, seqs))], _adapter_grads(model)


PROMPTS = (2, 20, 41)  # tokens of each sequence that are prompt, unlabelled


def prompt_masked(seqs: list[list[int]]) -> list[dict]:
    """Instruction-like examples: only the tokens after each prompt are labelled."""
    return [{"input_ids": s, "labels": [-100] * p + s[p:]} for s, p in zip(seqs, PROMPTS)]


def masked_reference_run(model, examples: list[dict]) -> torch.Tensor:
    """Each example alone, as peft and transformers compute it; the loss summed over its labels, backward done."""
    total = 0.0
    for ex in examples:
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor(ex["labels"])
        logits = model(input_ids=ids, use_cache=False).logits[0]
        total = total + F.cross_entropy(logits[:-1], labels[1:], reduction="sum", ignore_index=-100)
    total.backward()
    return total.detach()


def _adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def with_lean_mlps(model, arch: str) -> None:
    """Add the gated-MLP rewrite, which training leaves off in fp32 on CPUs and uses in bf16 and on GPUs: checked
    here in fp32, where the comparison is tightest."""
    assert fuse_gated_mlps(model) == (0 if arch == "gpt2" else model.config.num_hidden_layers)


LEAN_MLPS = pytest.mark.parametrize("lean_mlps", [False, True], ids=["fp32-cpu-paths", "with-lean-mlps"])


@LEAN_MLPS
@pytest.mark.parametrize("onednn", [False, True], ids=["torch-matmuls", "onednn-matmuls"])
def test_rewritten_training_equals_the_reference(arch_dir, onednn: bool, lean_mlps: bool,
                                                 monkeypatch: pytest.MonkeyPatch):
    arch, model_dir = arch_dir
    reference = adapted(model_dir, "eager")
    changed = adapted(model_dir, VARLEN_ATTENTION)
    paths = rewrite_for_training(changed, "fp32", CPU)
    if lean_mlps:
        with_lean_mlps(changed, arch)
    if onednn and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setattr(gemm, "_onednn", onednn)  # whichever this machine takes, check both libraries
    seqs = sequences(reference.config.vocab_size)

    ref_loss, ref_logits, ref_grads = reference_run(reference, seqs)
    loss, count, logits, grads = rewritten_run(changed, seqs)

    assert count == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert len(grads) == 2 * sum(paths.lora.values())
    assert_gradients_as_exact_as_the_reference(grads, ref_grads, exact_gradients(model_dir, reference_run, seqs))


@LEAN_MLPS
@pytest.mark.parametrize("multiple", [1, 16])
def test_prompt_masked_training_equals_the_reference(arch_dir, multiple, lean_mlps, monkeypatch):
    """Instruction data: only completions are labelled, so the last MLP runs on those rows alone, or on those and
    a few others to round the count (ops.loss_rows); loss and gradients still equal the reference's over the
    same labels."""
    arch, model_dir = arch_dir
    monkeypatch.setattr(loss_rows, "ROW_MULTIPLE", multiple)  # the real one (256) exceeds these tiny batches
    reference = adapted(model_dir, "eager")
    changed = adapted(model_dir, VARLEN_ATTENTION)
    assert rewrite_for_training(changed, "fp32", CPU).last_mlp_loss_rows
    if lean_mlps:
        with_lean_mlps(changed, arch)
    seqs = sequences(reference.config.vocab_size)
    examples = prompt_masked(seqs)
    mlp_inputs = []
    decoder = changed.get_base_model().get_decoder()
    last_mlp = (decoder.layers if hasattr(decoder, "layers") else decoder.h)[-1].mlp
    last_mlp.register_forward_hook(lambda module, args, out: mlp_inputs.append(args[0].shape[-2]))

    total = masked_reference_run(reference, examples)
    batch = collate_packed(examples)
    loss, count = CausalLMLoss(changed)(**batch)
    loss.backward()

    assert int(count) == sum(len(s) - p for s, p in zip(seqs, PROMPTS))
    assert mlp_inputs == [int(count) + (-int(count)) % multiple]  # the rows the loss reads, rounded up
    torch.testing.assert_close(loss.detach(), total, rtol=1e-5, atol=1e-4)
    exact = exact_gradients(model_dir, masked_reference_run, examples)
    assert_gradients_as_exact_as_the_reference(_adapter_grads(changed), _adapter_grads(reference), exact)
    with torch.no_grad():  # outside the loss the last MLP sees every row again
        logits = changed(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                         cu_seq_lens_q=batch["cu_seq_lens"], use_cache=False).logits[0]
        ref_logits = torch.cat([reference(input_ids=torch.tensor([s])).logits[0] for s in seqs])
    torch.testing.assert_close(logits[: len(ref_logits)], ref_logits, rtol=1e-5, atol=1e-5)


def test_the_active_paths_are_reported_per_architecture(arch_dir):
    arch, model_dir = arch_dir
    model = adapted(model_dir, VARLEN_ATTENTION)
    paths = rewrite_for_training(model, "fp32", CPU)
    layers = model.config.num_hidden_layers
    adapted_layers = {"llama": 7, "qwen2": 7, "gpt2": 4}[arch] * layers  # GPT-2: c_attn, c_proj, c_fc, c_proj
    assert dict(paths.lora) == {"fused": adapted_layers}
    assert paths.loss == "fused" and paths.attention.startswith("varlen-math")
    assert paths.gemm in ("onednn", "torch") and paths.last_mlp_loss_rows
    assert "last mlp on loss rows" in str(paths)
    text = str(paths)
    assert text.endswith(f"fp32 matmuls {paths.gemm}")
    assert f"lora {adapted_layers}/{adapted_layers} layers" in text
    if arch == "gpt2":  # LayerNorm, a GELU MLP, learned positions: only the GELU is ours, and the log says so
        assert (paths.rms_norms, paths.gated_mlps, paths.tanh_gelus, paths.rotary) == (0, 0, layers, 0)
        assert f"rmsnorm 0 ({2 * layers + 1} LayerNorm unchanged)" in text
        assert f"gated-mlp 0 (2 GPT2MLP unchanged), tanh-gelu {layers}" in text  # not gated: nothing left off
        assert f"rope 0 ({layers} GPT2Attention unchanged)" in text
    else:
        assert (paths.rms_norms, paths.gated_mlps, paths.tanh_gelus) == (2 * layers + 1, 0, 0)
        assert paths.rotary == layers
        assert paths.other_norms == paths.other_attention == ()
        mlp = {"llama": "LlamaMLP", "qwen2": "Qwen2MLP"}[arch]
        assert paths.other_mlps == (f"{layers} {mlp}",)
        assert f"gated-mlp off in fp32 on CPUs ({layers} {mlp} unchanged), loss" in text
        assert "tanh-gelu" not in text and f", rope {layers}, " in text
        # in bf16 (and on GPUs) the gated MLPs take the rewrite that keeps fewer activations
        bf16 = rewrite_for_training(adapted(model_dir, VARLEN_ATTENTION), "bf16", CPU)
        assert (bf16.gated_mlps, bf16.other_mlps) == (layers, ()) and f"gated-mlp {layers}, " in str(bf16)


def test_fallbacks_are_reported(arch_dir):
    """LoRA dropout keeps peft's forward (each layer says so); without packing the attention is named as is."""
    _, model_dir = arch_dir
    model = adapted(model_dir, "sdpa", dropout=0.1)
    paths = rewrite_for_training(model, "fp32", CPU)
    assert set(paths.lora) == {"peft"} and paths.attention == "sdpa"
    assert str(paths).startswith(f"fused paths: lora 0/{paths.lora['peft']} layers ({paths.lora['peft']} peft)")


@pytest.mark.parametrize("decorated", [False, True])
def test_an_unknown_decoder_layer_keeps_its_mlp_on_all_rows(decorated: bool):
    from torch import nn
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.utils.deprecation import deprecate_kwarg

    from finetune.modeling.ops.loss_rows import last_mlp_on_loss_rows

    # Decorated as transformers decorates its decoder layers' forward: the wrappers' code is every model's.
    wrap = deprecate_kwarg("past_key_values", "9.0.0", new_name="cache") if decorated else (lambda f: f)

    class Layer(GradientCheckpointingLayer if decorated else nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = nn.Linear(4, 4)

        @wrap
        def forward(self, x):  # a layer whose MLP output might go elsewhere: not recognised
            return self.mlp(x) * x

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer()])

        def get_decoder(self):
            return self

    model = Model()
    assert last_mlp_on_loss_rows(model) is False
    assert not model.layers[0].mlp._forward_pre_hooks and not model.layers[0].mlp._forward_hooks


def test_unpacked_calls_equal_the_reference(arch_dir):
    """Generation calls the varlen attention without boundaries (grouped heads go to SDPA as they are)."""
    _, model_dir = arch_dir
    reference, changed = adapted(model_dir, "eager"), adapted(model_dir, VARLEN_ATTENTION)
    rewrite_for_training(changed, "fp32", CPU)
    ids = torch.tensor([sequences(reference.config.vocab_size)[1]])
    with torch.no_grad():
        torch.testing.assert_close(changed(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-5)


def test_conv1d_lora_under_bf16_autocast_matches_peft():
    """GPT-2's Conv1D stores its weight [in, out]; the fused path uses it as it is, in bf16 under autocast."""
    import copy

    from peft import LoraConfig, get_peft_model
    from torch import nn
    from transformers.pytorch_utils import Conv1D

    from finetune.modeling.ops.lora import fuse_lora_updates, lora_path

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(40, 24), Conv1D(24, 40)

        def forward(self, x):
            return self.c_proj(torch.relu(self.c_fc(x)))

    torch.manual_seed(0)
    reference = get_peft_model(Block(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_fc", "c_proj"],
                                                   fan_in_fan_out=True))
    for p in reference.parameters():
        if p.requires_grad:
            nn.init.normal_(p, std=0.1)
    reference.base_model.model.c_fc.base_layer.to(torch.bfloat16)
    reference.base_model.model.c_proj.base_layer.to(torch.bfloat16)
    fused = copy.deepcopy(reference)
    assert fuse_lora_updates(fused) == 2
    assert [lora_path(m) for m in (fused.base_model.model.c_fc, fused.base_model.model.c_proj)] == ["fused"] * 2
    x = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    upstream = torch.randn(3, 7, 24, dtype=torch.bfloat16)
    results = []
    for model in (reference, fused):
        xi = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(xi)
        out.backward(upstream)
        results.append((out.detach(), xi.grad, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (out_ref, gx_ref, g_ref), (out, gx, g) = results
    assert out.dtype == torch.bfloat16 and gx.dtype == torch.bfloat16
    torch.testing.assert_close(out, out_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_ref, rtol=2e-2, atol=2e-2)
    assert g.keys() == g_ref.keys() and len(g) == 4
    for name in g_ref:
        assert g[name].dtype == torch.float32
        torch.testing.assert_close(g[name], g_ref[name], rtol=2e-2, atol=2e-2, msg=name)


# ------------------------------------------------------------------------------------------- other families
# Built from transformers' own configs, random init; what each one tests beyond the three above.
FAMILIES = {
    "mistral": dict(sliding_window=8),  # windows shorter than the sequences
    "qwen3": dict(head_dim=16),  # q and k normed per head
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=32),  # a mixture of experts as the last MLP, on loss rows
    "gemma": dict(head_dim=16),  # its own RMSNorm and MLP: not ours
    "gemma2": dict(head_dim=16),  # soft-capped attention (no packing) and soft-capped logits
    "phi3": dict(partial_rotary_factor=0.5),  # RoPE on half of each head's features
    "olmo2": {},
    "starcoder2": {},
    "gpt_neox": {},
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    "granite": dict(logits_scaling=4.0),  # divides its logits in its forward
    "cohere": {},  # multiplies its logits by logit_scale in its forward
    "stablelm": {},  # these three run their own attention over the whole row: no packing
    "falcon": dict(new_decoder_architecture=True),
    "bloom": dict(n_layer=2, n_head=4),
    "lfm2": dict(layer_types=["conv", "full_attention"]),  # a convolution along the sequence: no packing
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], head_dim=16, lru_width=64,
                            attention_window_size=16),  # a recurrence along the sequence: no packing
}
PACKING_REFUSED = {"gemma2": "soft-capping", "stablelm": "sequence bounds", "falcon": "sequence bounds",
                   "bloom": "sequence bounds", "lfm2": "packed before it", "recurrent_gemma": "packed before it"}
LOGITS_BY_THEIR_FORWARD = {"granite", "cohere", "recurrent_gemma"}  # RecurrentGemma soft-caps by its own name
PARTIAL_ROTARY = {"phi3", "gpt_neox"}  # their RoPE function rotates a part of each head, and is ours now
LOSS_ROWS_OFF = {"bloom", "opt", "lfm2", "recurrent_gemma"}  # their last layers are not recognised
TANH_GELU = {"bloom"}  # its own autograd function for the tanh GELU, which is one kernel here
VOCAB = 300


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        request.param, vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, **FAMILIES[request.param])
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp(request.param) / "model"
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    return request.param, out


def test_other_families_train_packed_as_the_reference_or_are_refused(family_dir):
    family, model_dir = family_dir
    reference = adapted(model_dir, "eager")
    seqs = sequences(VOCAB)
    if family in PACKING_REFUSED:
        with pytest.raises(PackingError, match="set train.packing: auto") as refused:
            load_base_model(BaseSource(str(model_dir)), torch.float32, VARLEN_ATTENTION)  # what training loads
            rewritten_run(adapted(model_dir, VARLEN_ATTENTION), seqs)  # Gemma2: at its first attention call
        assert PACKING_REFUSED[family] in str(refused.value)
        return
    load_base_model(BaseSource(str(model_dir)), torch.float32, VARLEN_ATTENTION)
    changed = adapted(model_dir, VARLEN_ATTENTION)
    paths = rewrite_for_training(changed, "fp32", CPU)
    assert paths.loss.startswith("through ") == (family in LOGITS_BY_THEIR_FORWARD), paths.loss
    if family in PARTIAL_ROTARY:
        assert paths.rotary == changed.config.num_hidden_layers
    ref_loss, ref_logits, ref_grads = reference_run(reference, seqs)
    loss, count, logits, grads = rewritten_run(changed, seqs)
    assert count == sum(n - 1 for n in LENGTHS)
    torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    _assert_same_training(loss, grads, ref_loss, ref_grads, exact_gradients(model_dir, reference_run, seqs))


def test_other_families_train_padded_as_the_reference(family_dir):
    """Without packing (``train.packing: false``), every family trains, with the rewrites that recognise it."""
    family, model_dir = family_dir
    reference, changed = adapted(model_dir, "eager"), adapted(model_dir, None)  # None: transformers' default
    paths = rewrite_for_training(changed, "fp32", CPU)
    assert paths.loss.startswith("through ") == (family in LOGITS_BY_THEIR_FORWARD), paths.loss
    assert paths.tanh_gelus == (changed.config.num_hidden_layers if family in TANH_GELU else 0)
    seqs = sequences(VOCAB)
    ref_loss, _, ref_grads = reference_run(reference, seqs)
    loss, count = CausalLMLoss(changed)(**collate_padded([{"input_ids": s, "labels": s} for s in seqs], 0))
    loss.backward()
    assert int(count) == sum(n - 1 for n in LENGTHS)
    _assert_same_training(loss.detach(), _adapter_grads(changed), ref_loss, ref_grads,
                          exact_gradients(model_dir, reference_run, seqs))


def test_other_families_train_prompt_masked_as_the_reference(family_dir, monkeypatch: pytest.MonkeyPatch):
    """Completions only, on padded batches (every family trains so): where the last layer is recognised its MLP
    takes the labelled rows alone, and loss and gradients still equal the reference's."""
    family, model_dir = family_dir
    monkeypatch.setattr(loss_rows, "ROW_MULTIPLE", 1)  # the real one (256) exceeds these tiny batches
    reference, changed = adapted(model_dir, "eager"), adapted(model_dir, None)
    paths = rewrite_for_training(changed, "fp32", CPU)
    assert paths.last_mlp_loss_rows == (family not in LOSS_ROWS_OFF)
    seqs = sequences(VOCAB)
    examples = prompt_masked(seqs)
    rows = []
    decoder = changed.get_base_model().get_decoder()
    last = (getattr(decoder, "layers", None) or decoder.h)[-1]
    if hasattr(last, "mlp"):
        last.mlp.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[:-1].numel()))

    total = masked_reference_run(reference, examples)
    loss, count = CausalLMLoss(changed)(**collate_padded(examples, 0))
    loss.backward()

    assert int(count) == sum(len(s) - p for s, p in zip(seqs, PROMPTS))
    if paths.last_mlp_loss_rows:
        assert rows == [int(count)]  # the labelled rows, not every position of the padded batch
    _assert_same_training(loss.detach(), _adapter_grads(changed), total, _adapter_grads(reference),
                          exact_gradients(model_dir, masked_reference_run, examples))


def test_bloom_gelu_is_recognised_with_the_function_it_calls():
    """Bloom's GELU module is taken as a tanh GELU only while the autograd function it calls is Bloom's own."""
    import types

    from transformers.models.bloom import modeling_bloom as bloom

    from finetune.modeling.ops.mlp import _is_bloom_gelu

    class Other(torch.autograd.Function):  # same name in its module, other arithmetic
        @staticmethod
        def forward(ctx, x):
            return F.gelu(x)

    code = bloom.BloomGelu.forward.__code__
    assert _is_bloom_gelu(bloom.BloomGelu.forward)
    assert _is_bloom_gelu(types.FunctionType(code, dict(vars(bloom))))  # a copy in another module
    assert not _is_bloom_gelu(types.FunctionType(code, {**vars(bloom), "GeLUFunction": Other}))
    assert not _is_bloom_gelu(types.FunctionType(code, {**vars(bloom), "bloom_gelu_back": F.gelu}))


def _assert_same_training(loss, grads, ref_loss, ref_grads, exact_grads) -> None:
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert grads.keys() == ref_grads.keys() and grads
    assert_gradients_as_exact_as_the_reference(grads, ref_grads, exact_grads)


FP32_EPS = torch.finfo(torch.float32).eps


def exact_gradients(model_dir: Path, run, *args) -> dict[str, torch.Tensor]:
    """The reference's adapter gradients in float64: the exact values, as far as fp32 rounding is concerned."""
    model = adapted(model_dir, "eager", experts_implementation="eager").double()  # grouped_mm takes no float64
    run(model, *args)
    return _adapter_grads(model)


def assert_gradients_as_exact_as_the_reference(grads, ref_grads, exact) -> None:
    """Ours are as close to the exact gradients as the reference's own fp32 arithmetic is.

    Two fp32 computations that sum the same products in other orders differ by rounding, which grows with each
    tensor's scale and the depth of the sums behind it. A fixed ``atol=1e-5`` sat below the reference's own
    rounding error: adapter gradients here reach |g| ~ 8, and transformers' fp32 v_proj gradient in OLMo 2 was
    2.3e-5 away from the float64 one at its worst entry (ours 2.45e-5), so a CPU whose kernels sum in another
    order failed the test. So the bound is measured, per tensor and in norm (a max over entries is one noisy
    sample): ours may be at most 4x further from the float64 result than the reference (the summation orders
    differ, neither is the better one), or than 8 ulps of the tensor's norm where the reference happened to
    round closer than that. Over the 1,728 tensors of this file the worst was 0.51 of the bound (an AMD EPYC with
    AVX2). A real defect (a token leaking across sequences, a wrong mask or scale) moves gradients by orders of
    magnitude more."""
    assert grads.keys() == exact.keys() == ref_grads.keys() and grads
    for name, want in exact.items():
        assert want.abs().max() > 0, name  # every adapter weight is reached by the loss
        noise = (ref_grads[name].double() - want).norm().item()
        bound = 4 * max(noise, 8 * FP32_EPS * want.norm().item())
        error = (grads[name].double() - want).norm().item()
        assert error <= bound, f"{name}: {error:.3g} from the float64 gradient (norm), the reference {noise:.3g}"


def test_the_rewrites_stay_on_across_train_and_eval(arch_dir):
    """With the `kernels` package (transformers 5.25 requires it), transformers puts the class's own forward back on
    its hub-kernel layers (RMSNorm, activations) whenever a model switches between train and eval; the training
    loop calls train() after the rewrites, so the base loads with that off and the rewrites the log names stay."""
    from finetune.config import LoraConfig
    from finetune.modeling.load import attach_lora

    arch, model_dir = arch_dir
    model = attach_lora(load_base_model(BaseSource(str(model_dir)), torch.float32, VARLEN_ATTENTION), LoraConfig())
    paths = rewrite_for_training(model, "fp32", CPU)
    rewritten = [name for name, m in model.named_modules() if "forward" in vars(m)]
    layers = model.config.num_hidden_layers
    assert paths.rms_norms + paths.tanh_gelus == (layers if arch == "gpt2" else 2 * layers + 1)
    model.train()
    model.eval()
    model.train()
    assert [name for name, m in model.named_modules() if "forward" in vars(m)] == rewritten


def test_the_setup_checks_leave_every_module_in_its_own_mode(arch_dir):
    """The packing check and the logits check run the model in eval mode; afterwards each module is back in its
    own mode (mixed modes too: ``model.train()`` would not restore those)."""
    from finetune.modeling.ops.attention import refuse_inexact_packing

    _, model_dir = arch_dir
    model = adapted(model_dir, VARLEN_ATTENTION, dropout=0.1).train()
    frozen = next(m for name, m in model.named_modules() if name.endswith("lora_dropout.default"))
    frozen.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    refuse_inexact_packing(model.get_base_model())
    rewrite_for_training(model, "fp32", CPU)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert not frozen.training and model.training
