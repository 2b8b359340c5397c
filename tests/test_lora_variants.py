"""peft's LoRA variants through the config: DoRA, rsLoRA, modules_to_save and the inits (gaussian, pissa, olora).
Each trains, publishes, loads in plain peft and serves; the training log says which layers left the fused path."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch

from finetune import training
from finetune.config import config_from_dict
from finetune.registry import Registry
from finetune.registry.jobs import Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

pytestmark = pytest.mark.slow
PROMPT = "Give three tips for staying healthy."
VARIANTS = {
    "dora": {"use_dora": True, "use_rslora": True, "init": "gaussian", "modules_to_save": ["lm_head"]},
    "pissa": {"init": "pissa"},
    "olora": {"init": "olora"},
}


def _train(reg: Registry, destination: str, lora: dict, lr: float = 5e-3, steps: int = 2):
    cfg = config_from_dict({
        "base_model": "alice/tiny:1",
        "data": {"path": str(sample_data_path()), "max_seq_len": 128},
        "lora": {"r": 4, "alpha": 8, **lora},
        "train": {"max_steps": steps, "batch_size": 4, "lr": lr, "precision": "fp32"},
    })
    return training.train(cfg, registry=reg, destination=destination, create_destination=True, progress=False)


@pytest.fixture(scope="module")
def reg(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp_path_factory.mktemp("variants") / "registry")
        import_base(reg, "alice/tiny", str(tiny_model_dir))
        results = {name: _train(reg, f"alice/{name}", lora) for name, lora in VARIANTS.items()}
        # a learning rate too small to move anything: the converted adapter must then leave the base as it was
        results["pissa-still"] = _train(reg, "alice/pissa-still", {"init": "pissa"}, lr=1e-9, steps=1)
        yield reg, results


def _logits(model, tok) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([tok(PROMPT)["input_ids"]])).logits


def _plain_peft(version, tiny_model_dir: Path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    before = _logits(base, tok)
    return before, _logits(PeftModel.from_pretrained(base, str(version.path)), tok)


def test_dora_rslora_gaussian_and_modules_to_save_train_publish_and_load_in_plain_peft(reg, tiny_model_dir: Path):
    registry, results = reg
    version = results["dora"].version
    cfg = json.loads((version.path / "adapter_config.json").read_text())
    assert cfg["use_dora"] and cfg["use_rslora"] and cfg["init_lora_weights"] == "gaussian"
    # the tiny model ties its head to its embeddings: peft keeps them tied, saving the one trained copy
    assert cfg["ensure_weight_tying"] and cfg["modules_to_save"] == ["model.embed_tokens"]
    log = Trainings(registry).paths(results["dora"].record.id).log.read_text()
    # DoRA layers keep peft's forward, and the log says so
    assert "lora 0/14 layers (14 peft, Dora variant)" in log, log
    before, after = _plain_peft(version, tiny_model_dir)
    assert (after - before).abs().max() > 1e-4


def test_pissa_and_olora_publish_adapters_over_the_unchanged_base(reg, tiny_model_dir: Path):
    registry, results = reg
    for name in ("pissa", "olora"):
        version = results[name].version
        cfg = json.loads((version.path / "adapter_config.json").read_text())
        assert cfg["r"] == 8 and cfg["init_lora_weights"] is True  # converted: twice the rank, a plain LoRA
        log = Trainings(registry).paths(results[name].record.id).log.read_text()
        assert "lora 14/14 layers" in log  # the fused path handles them (plain LoRA layers over a frozen base)
        before, after = _plain_peft(version, tiny_model_dir)
        assert (after - before).abs().max() > 1e-4
    # Untrained, the converted adapter is nothing: without the conversion it would add the principal part twice.
    before, after = _plain_peft(results["pissa-still"].version, tiny_model_dir)
    assert (after - before).abs().max() < 1e-3 * before.abs().max()


def test_variant_versions_serve_as_finetune_predict_answers(reg):
    from finetune.inference import GenerationSettings, generate, load_version
    from finetune.serving.worker import LocalWorker, WorkerConfig

    registry, results = reg
    refs = [results[name].version.ref for name in ("dora", "pissa")]
    expected = {ref: generate(load_version(registry, ref, device="cpu"), PROMPT, GenerationSettings(max_new_tokens=12))
                for ref in refs}
    done: dict[str, dict] = {}
    texts: dict[str, list[str]] = {}
    cond = threading.Condition()

    def events(job_id: str, kind: str, payload: dict) -> None:
        with cond:
            if kind == "output":
                texts.setdefault(job_id, []).append(payload["text"])
            if kind in ("done", "rejected"):
                done[job_id] = payload
            cond.notify_all()

    worker = LocalWorker(WorkerConfig(str(registry.root), device="cpu"), events)
    try:
        for n, ref in enumerate(refs * 2):  # one at a time, then two versions in one batch
            worker.submit(f"p{n}", ref, {"prompt": PROMPT, "max_new_tokens": 12})
            if n < len(refs):
                with cond:
                    assert cond.wait_for(lambda n=n: f"p{n}" in done, 120)
        with cond:
            assert cond.wait_for(lambda: len(done) == 2 * len(refs), 120)
        # peft cannot batch DoRA or modules_to_save rows with other adapters: that version has a base of its own
        assert worker.stats()["bases"] == 2
    finally:
        worker.close()
    for n, ref in enumerate(refs * 2):
        assert done[f"p{n}"]["status"] == "succeeded", done[f"p{n}"]
        assert "".join(texts.get(f"p{n}", [])) == expected[ref], ref
