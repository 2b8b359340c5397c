"""One way to run a model: `finetune predict`, the Python API and the HTTP API all generate through the serving
engine with one set of options, so that with sampling on and a seed they give the same text; and one rule for a
model's context length.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from service import running_server

from finetune import training
from finetune.cli import main
from finetune.config import config_from_dict
from finetune.errors import UsageError
from finetune.generation import GenerationSettings, bounded_new_tokens, check_settings
from finetune.modeling.context import context_length
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

PROMPT = "Give three tips for staying healthy."
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 1234, "max_new_tokens": 24}


@pytest.fixture(scope="module")
def reg(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registry:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp_path_factory.mktemp("generation") / "registry")
        import_base(reg, "alice/tiny", str(tiny_model_dir))
        cfg = config_from_dict({
            "base_model": "alice/tiny:1",
            "data": {"path": str(sample_data_path()), "format": "auto", "max_seq_len": 256},
            "train": {"max_steps": 2, "batch_size": 8, "lr": 5e-3},
        })
        training.train(cfg, registry=reg, destination="alice/m", create_destination=True, progress=False)
        yield reg


def _cli(reg: Registry, capsys: pytest.CaptureFixture[str], ref: str, options: dict) -> str:
    flags = [arg for name, value in options.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    capsys.readouterr()
    rc = main(["--registry", str(reg.root), "predict", ref, PROMPT, "--device", "cpu", *flags])
    out, err = capsys.readouterr()
    assert rc in (0, None), err
    return out[:-1]  # the final newline


def test_cli_python_and_api_give_the_same_sampled_text(reg: Registry, capsys):
    from finetune.inference import generate, load_version

    refs = ("alice/m:1", "alice/tiny:1")  # a fine-tune (its adapter) and a base version (raw text)
    cli = {ref: _cli(reg, capsys, ref, SAMPLED) for ref in refs}
    python = {ref: generate(load_version(reg, ref, device="cpu"), PROMPT, GenerationSettings(**SAMPLED))
              for ref in refs}
    with running_server(reg) as server:
        client = server.replicate("alice")
        api = {ref: "".join(client.run(f"{ref.split(':')[0]}:{reg.resolve(ref).id}",
                                       input={"prompt": PROMPT, **SAMPLED})) for ref in refs}
    assert cli == python == api
    assert all(cli.values())
    # The adapter beside the base weights (load_version(merge=False), a PeftModel) runs through the engine too.
    greedy = GenerationSettings(max_new_tokens=12)
    merged, unmerged = (generate(load_version(reg, "alice/m:1", device="cpu", merge=merge), PROMPT, greedy)
                        for merge in (True, False))
    assert merged == unmerged and merged
    # Sampling did sample: another seed draws another answer from the random base (greedy would not change).
    other = _cli(reg, capsys, "alice/tiny:1", {**SAMPLED, "seed": 4321})
    assert other != cli["alice/tiny:1"]


def test_stop_sequences_and_top_k_are_options_of_the_cli_too(reg: Registry, capsys):
    full = _cli(reg, capsys, "alice/tiny:1", {**SAMPLED, "top_k": 5})
    assert full
    stop = full[len(full) // 2:][:2]
    cut = _cli(reg, capsys, "alice/tiny:1", {**SAMPLED, "top_k": 5, "stop_sequences": stop})
    assert cut == full[:full.index(stop)]


def test_one_check_names_the_option_as_each_caller_spells_it(capsys, tmp_path):
    with pytest.raises(UsageError, match=r"input\.top_p"):
        check_settings({"top_p": 0}, name=lambda field: f"input.{field}")
    with pytest.raises(UsageError, match="--temperature"):
        check_settings({"temperature": float("nan")}, name=lambda field: "--" + field.replace("_", "-"))
    assert check_settings({"stop_sequences": "a,,b"}).stop_sequences == ("a", "b")
    assert check_settings({}) == GenerationSettings()
    rc = main(["--registry", str(tmp_path), "predict", "any/model:1", "hi", "--seed", "-1"])
    assert rc == 2 and "--seed" in capsys.readouterr().err


def test_context_length_has_one_fallback_order():
    config = SimpleNamespace(max_position_embeddings=None, n_positions=512, max_sequence_length=64)
    assert context_length(config) == 512
    assert context_length(SimpleNamespace(max_sequence_length=64)) == 64
    assert context_length(SimpleNamespace(max_position_embeddings=4096, n_positions=8)) == 4096
    tokenizer = SimpleNamespace(model_max_length=300)
    assert context_length(SimpleNamespace(), tokenizer) == 300
    assert context_length(SimpleNamespace(), SimpleNamespace(model_max_length=int(1e30))) is None  # "no limit"
    assert context_length(None) is None
    assert context_length(SimpleNamespace(max_position_embeddings=True)) is None  # not a count


def test_the_context_bounds_every_generation_alike():
    assert bounded_new_tokens("a/m:1", 1024, 10, 100) == (100, None)
    count, note = bounded_new_tokens("a/m:1", 1024, 1000, 100)
    assert count == 24 and "stops after 24 new tokens" in note
    with pytest.raises(UsageError, match="max_new_tokens 2000 is more than a/m:1's context of 1024"):
        bounded_new_tokens("a/m:1", 1024, 10, 2000)
    with pytest.raises(UsageError, match="fills a/m:1's context"):
        bounded_new_tokens("a/m:1", 1024, 1024, 1)
    assert bounded_new_tokens("a/m:1", None, 10**6, 5) == (5, None)  # a context nobody states bounds nothing


def test_training_refuses_rows_longer_than_the_same_context(reg: Registry):
    from finetune.errors import ConfigError

    cfg = config_from_dict({"base_model": "alice/tiny:1",
                            "data": {"path": str(sample_data_path()), "format": "auto", "max_seq_len": 4096},
                            "train": {"max_steps": 1}})
    with pytest.raises(ConfigError, match="data.max_seq_len: 4096 is more than the 1024 positions"):
        training.train(cfg, registry=reg, destination="alice/long", create_destination=True, progress=False)
