"""scripts/profile_train.py: the real training run, profiled, with its operators grouped by what they compute."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from scripts_dir import SCRIPTS, load_script

from finetune.tiny import sample_data_path

SCRIPT = SCRIPTS / "profile_train.py"


def _script():
    return load_script("profile_train")


def test_products_are_told_apart_by_the_rank():
    group = _script().group
    # a frozen projection's forward through oneDNN (input [m, k], weight [n, k]) and its input gradient via mm
    assert group("mkldnn::_linear_pointwise", [[960, 512], [1376, 512], [], [], [], []], 16) == (
        "frozen products", 2.0 * 960 * 512 * 1376)
    assert group("aten::mm", [[960, 1376], [1376, 512]], 16) == ("frozen products", 2.0 * 960 * 1376 * 512)
    # LoRA's: x @ A.T, the update added into the output (addmm_), A's gradient
    assert group("aten::mm", [[960, 512], [512, 16]], 16) == ("rank-r products", 2.0 * 960 * 512 * 16)
    assert group("aten::addmm_", [[960, 512], [960, 16], [16, 512], [], []], 16)[0] == "rank-r products"
    assert group("aten::mm", [[16, 960], [960, 512]], 16)[0] == "rank-r products"
    assert group("aten::mm", [[16, 960], [960, 512]], 8)[0] == "frozen products"
    assert group("aten::bmm", [[8, 300, 64], [8, 64, 300]], 16) == ("attention", 0.0)
    assert group("aten::_scaled_dot_product_flash_attention_for_cpu_backward", [], 16)[0] == "attention"
    assert group("aten::mul", [[1, 960, 1376], [1, 960, 1376]], 16) == ("everything else", 0.0)
    assert group("aten::mm", [[3, 4, 5], [5, 6]], 16) == ("everything else", 0.0)  # not a 2-d product


def _config(tmp_path: Path, model_dir: Path, max_seq_len: int, train: dict, rank: int = 4) -> Path:
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({
        "base_model": str(model_dir), "destination": "profile/tiny",
        "data": {"path": str(sample_data_path()), "max_seq_len": max_seq_len},
        "lora": {"r": rank, "alpha": 2 * rank}, "train": {"batch_size": 2, "precision": "fp32", **train},
    }))
    return config


def _profile(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                          env=env, check=False)


@pytest.mark.slow
def test_profiles_a_real_run(tiny_model_dir: Path, tmp_path: Path):
    config = _config(tmp_path, tiny_model_dir, 128, {"max_steps": 4, "seed": 0})
    proc = _profile(str(config), "--skip", "1", "--steps", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 steps profiled" in proc.stdout and "LoRA rank 4" in proc.stdout, proc.stdout
    rows = dict(re.findall(r"^  (frozen products|rank-r products|attention|everything else) +([\d.]+) s",
                           proc.stdout, re.M))
    assert set(rows) == {"frozen products", "rank-r products", "attention", "everything else"}, proc.stdout
    # both kinds of product were seen and timed, so their rates are printed
    assert len(re.findall(r"GFLOP/s", proc.stdout)) == 2, proc.stdout


def test_too_few_steps_is_an_error(tiny_model_dir: Path, tmp_path: Path):
    config = _config(tmp_path, tiny_model_dir, 64, {"max_steps": 1})
    proc = _profile(str(config), "--skip", "2", "--steps", "2")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        f"profile_train: error: --skip 2 --steps 2 needs 4 steps, and {config} trained 1 (raise train.max_steps, "
        "or --set it)"), proc.stderr


def test_a_bad_config_is_one_line(tmp_path: Path):
    config = tmp_path / "train.yaml"
    config.write_text("base_model: x\ntrain:\n  max_stpes: 3\n")
    proc = _profile(str(config))
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.max_stpes" in lines[0], proc.stderr


def test_no_warm_up_step_is_refused(tmp_path: Path):
    """The profiler's first step would hold the model and data loading."""
    proc = _profile(str(tmp_path / "train.yaml"), "--skip", "0")
    assert proc.returncode == 2 and "--skip and --steps must be at least 1" in proc.stderr, proc.stderr


def test_the_peer_needs_the_benchmarks_rank_and_batch(tiny_model_dir: Path, tmp_path: Path):
    config = _config(tmp_path, tiny_model_dir, 64, {"max_steps": 2})
    proc = _profile(str(config), "--skip", "1", "--steps", "1", "--peer")
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "profile_train: error: --peer trains LoRA r 16 on batches of 8, as bench_train.py does; the config has "
        "r 4, batch 2"), proc.stderr


@pytest.mark.slow
def test_profiles_the_tuned_peer_on_the_same_config(tiny_model_dir: Path, tmp_path: Path):
    config = _config(tmp_path, tiny_model_dir, 64, {"max_steps": 3, "seed": 0, "batch_size": 8}, rank=16)
    proc = _profile(str(config), "--skip", "1", "--steps", "2", "--peer", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 steps profiled" in proc.stdout and "LoRA rank 16, 1 threads" in proc.stdout, proc.stdout
    # PEFT's products, both kinds, were seen under the Trainer's optimizer steps (their GFLOP and rates printed)
    assert re.search(r"^  frozen products .* GFLOP/s$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^  rank-r products .* GFLOP/s$", proc.stdout, re.M), proc.stdout
