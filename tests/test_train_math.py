"""The arithmetic of a training step: loss normalisation across micro-batches and processes, the equivalence of
gradient accumulation with one big batch in a real run, and the throughput figure (with a fake clock).

Everything runs in fp32 on the tiny Llama, so "equal" can mean 1e-6.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune import training
from finetune.config import LoraConfig, config_from_dict
from finetune.data.batching import collate_packed, label_count
from finetune.data.prepare import prepare
from finetune.modeling.load import attach_lora
from finetune.modeling.ops.attention import VARLEN_ATTENTION
from finetune.modeling.ops.loss import CausalLMLoss, normalize_loss
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path
from finetune.training.metrics import Throughput, peak_memory_mb, tokens_per_second

ATOL = 1e-6  # gradients: same computation, different summation order
# Adapters after a few Adam steps: Adam divides by sqrt(v), so the ~1e-7 relative noise of small gradients (padded
# micro-batches of other shapes sum in another order) grows to ~1e-6 in most elements (measured), and to 5e-5 in
# one element whose gradient was near Adam's eps (measured, packed, on the steps planned since the largest goes
# first); weighting micro-batches equally instead of by tokens moves them by ~5e-2 (measured).
ADAPTER_ATOL = 5e-4


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path) -> dict:
    """The tiny Llama with a LoRA adapter (B randomised) and eight real examples in micro-batches of very unequal
    label-token counts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune.modeling.ops.attention import register_varlen_attention

    register_varlen_attention()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                attn_implementation=VARLEN_ATTENTION)
    base.requires_grad_(False)
    torch.manual_seed(0)
    model = attach_lora(base, LoraConfig(r=4, alpha=8.0, dropout=0.0, target_modules="all-linear"))
    # LoRA's B starts at zero, which makes A's gradient zero: give B values so every adapter weight has a
    # gradient worth comparing.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    loss_model = CausalLMLoss(model)
    train = prepare(str(sample_data_path()), "alpaca", tok, max_seq_len=512, train_on_inputs=True).train
    examples = sorted((train[i] for i in range(len(train))), key=lambda ex: label_count(ex["labels"]))
    # One short example alone, three long ones together, and two middling pairs: token counts far apart.
    n = len(examples)
    micro = [[examples[0]], [examples[n - 1], examples[n - 2], examples[n - 3]],
             [examples[n // 2], examples[n // 2 + 1]], [examples[5], examples[6]]]
    return {"loss_model": loss_model, "micro": micro,
            "trainable": [(n, p) for n, p in model.named_parameters() if p.requires_grad]}


def _grads(setup: dict, backward) -> dict[str, torch.Tensor]:
    for _, p in setup["trainable"]:
        p.grad = None
    backward()
    return {n: p.grad.detach().clone() for n, p in setup["trainable"]}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _big_batch(setup: dict) -> dict[str, torch.Tensor]:
    everything = [ex for mb in setup["micro"] for ex in mb]

    def backward():
        loss_sum, count = setup["loss_model"](**collate_packed(everything))
        assert int(count) == sum(label_count(ex["labels"]) for ex in everything)
        (loss_sum / count).backward()

    return _grads(setup, backward)


def test_micro_batches_really_are_unequal(setup: dict):
    counts = [sum(label_count(ex["labels"]) for ex in mb) for mb in setup["micro"]]
    assert max(counts) > 3 * min(counts), counts  # otherwise equal weighting could pass by accident


def test_accumulated_normalized_gradients_equal_one_big_batch(setup: dict):
    micro, loss_model = setup["micro"], setup["loss_model"]
    total = sum(label_count(ex["labels"]) for mb in micro for ex in mb)

    def accumulate():
        for mb in micro:
            loss_sum, _ = loss_model(**collate_packed(mb))
            normalize_loss(loss_sum, total, world_size=1).backward()

    def equal_weights():  # the usual mistake: mean per micro-batch, averaged over micro-batches
        for mb in micro:
            loss_sum, count = loss_model(**collate_packed(mb))
            (loss_sum / count / len(micro)).backward()

    big = _big_batch(setup)
    scale = max(float(g.abs().max()) for g in big.values())
    assert scale > 1e-3  # gradients big enough for a 1e-6 tolerance to mean something
    assert _max_diff(_grads(setup, accumulate), big) < ATOL
    assert _max_diff(_grads(setup, equal_weights), big) > 100 * ATOL


def test_two_processes_with_ddp_averaging_equal_one_big_batch(setup: dict):
    """Each rank scales by world_size / window tokens; DistributedDataParallel then averages the ranks."""
    micro, loss_model = setup["micro"], setup["loss_model"]
    total = sum(label_count(ex["labels"]) for mb in micro for ex in mb)
    world = 2

    def rank_grads(rank: int) -> dict[str, torch.Tensor]:
        def backward():
            for mb in micro[rank::world]:
                loss_sum, _ = loss_model(**collate_packed(mb))
                normalize_loss(loss_sum, total, world_size=world).backward()

        return _grads(setup, backward)

    ranks = [rank_grads(r) for r in range(world)]
    averaged = {k: sum(g[k] for g in ranks) / world for k in ranks[0]}
    assert _max_diff(averaged, _big_batch(setup)) < ATOL


# ------------------------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def registry_with_base(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp_path_factory.mktemp("math") / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        yield reg


def _train(reg: Registry, destination: str, **train: object):
    cfg = config_from_dict({
        "base_model": "local/tiny:1",
        "data": {"path": str(sample_data_path()), "max_seq_len": 256},
        "lora": {"r": 4, "alpha": 8},
        "train": {"precision": "fp32", "lr": 1e-2, "scheduler": "constant", **train},
    })
    result = training.train(cfg, registry=reg, destination=destination, create_destination=True, progress=False)
    from finetune.registry.jobs import Trainings

    return load_file(str(result.version.path / "adapter_model.safetensors")), \
        Trainings(reg).paths(result.record.id).metrics


@pytest.mark.parametrize("packing", [True, False])
def test_grad_accum_4x2_equals_one_batch_of_8(registry_with_base: Registry, packing: bool,
                                               monkeypatch: pytest.MonkeyPatch):
    """Same examples in the same order per optimizer step (plan_epoch cuts the same order either way), so the
    adapters after 3 steps agree; Adam's first step is ~lr * sign(grad), the later ones weigh gradients."""
    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    reg = registry_with_base
    tag = "packed" if packing else "padded"
    accum, accum_metrics = _train(reg, f"math/accum-{tag}", batch_size=2, grad_accum=4, max_steps=3, packing=packing)
    big, big_metrics = _train(reg, f"math/big-{tag}", batch_size=8, grad_accum=1, max_steps=3, packing=packing)
    assert accum.keys() == big.keys() and accum
    diff = max(float((accum[k] - big[k]).abs().max()) for k in accum)
    moved = max(float(big[k].abs().max()) for k in big if "lora_B" in k)
    assert moved > 1e-2  # training did change the adapter
    assert diff < ADAPTER_ATOL, diff
    from finetune.training.metrics import MetricsLog

    losses = [[r["loss"] for r in MetricsLog(p).read()] for p in (accum_metrics, big_metrics)]
    assert len(losses[0]) == 3
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


def test_padded_micro_batches_run_in_groups_and_train_as_whole_ones(registry_with_base: Registry,
                                                                   monkeypatch: pytest.MonkeyPatch):
    """On CPUs a padded micro-batch runs as groups of similar lengths (fewer padded tokens); the losses and the
    adapter after 3 steps are those of running each micro-batch whole."""
    from finetune.training import setup as setup_module

    monkeypatch.setenv("FINETUNE_FSYNC", "0")
    passes = []
    grouped_collate = setup_module.collate_padded_groups

    def counting(examples, pad, cost):
        batches = grouped_collate(examples, pad, cost)
        passes.append(len(batches))
        return batches

    monkeypatch.setattr(setup_module, "collate_padded_groups", counting)
    grouped, grouped_metrics = _train(registry_with_base, "math/grouped", batch_size=8, max_steps=3, packing=False)
    assert max(passes) > 1  # some micro-batch did run in groups
    monkeypatch.setattr(setup_module, "PAD_GROUP_CALL_COST_CPU", None)  # as on a GPU: whole micro-batches
    passes.clear()
    whole, whole_metrics = _train(registry_with_base, "math/whole", batch_size=8, max_steps=3, packing=False)
    assert set(passes) == {1}
    diff = max(float((grouped[k] - whole[k]).abs().max()) for k in whole)
    assert diff < ADAPTER_ATOL, diff
    from finetune.training.metrics import MetricsLog

    losses = [[r["loss"] for r in MetricsLog(p).read()] for p in (grouped_metrics, whole_metrics)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)


# ------------------------------------------------------------------------------------------- throughput


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_throughput_excludes_warmup_and_pauses():
    clock = FakeClock()
    speed = Throughput(warmup_steps=1, clock=clock)
    speed.start()
    clock.now = 3.0
    speed.pause()  # evaluation inside the warm-up step: neither its time nor the step's may count
    clock.now = 50.0
    speed.resume()
    clock.now = 60.0
    speed.step(10_000)  # warm-up: one-off costs
    assert speed.tokens == 0 and speed.seconds == 0.0 and speed.tokens_per_second() == 0.0
    clock.now = 62.0
    speed.step(100)  # 2 s
    clock.now = 63.0
    speed.pause()  # eval / checkpoint: 100 s not counted
    clock.now = 163.0
    speed.resume()
    clock.now = 166.0
    speed.step(300)  # 1 s before the pause + 3 s after it
    assert speed.tokens == 400
    assert speed.seconds == pytest.approx(6.0)
    assert speed.tokens_per_second() == pytest.approx(400 / 6.0)


def test_throughput_without_warmup_counts_the_first_step():
    clock = FakeClock()
    speed = Throughput(warmup_steps=0, clock=clock)
    speed.start()
    clock.now = 4.0
    speed.step(80)
    assert speed.tokens_per_second() == pytest.approx(20.0)


def test_tokens_per_second_definition():
    assert tokens_per_second(500, 2.0) == 250.0
    assert tokens_per_second(500, 0.0) == 0.0
    assert tokens_per_second(0, 3.0) == 0.0


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the kernel's own peak from /proc")
def test_peak_memory_is_the_processes_resident_peak_in_mib():
    held = torch.ones(64 * 2**20)  # 256 MiB, written, so resident
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    kernel_peak_mb = int(status["VmHWM"].split()[0]) / 1024
    assert peak_memory_mb(torch.device("cpu")) == pytest.approx(kernel_peak_mb, rel=0.01)
    assert kernel_peak_mb > 256
    del held
