"""Every command against a registry that cannot be written (FINETUNE_HOME on a read-only mount): the ones that
write fail with one line saying the registry at PATH is not writable and how to point FINETUNE_HOME elsewhere;
the ones that only read keep working.

The registry is made read-only at the OS level: a read-only bind mount in a private mount namespace
(``unshare -m``, needs root, which ignores permission bits) or, for other users, by removing the write
permission bits. One subprocess runs all the commands in-process and reports each one's exit code and output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.jobs import TrainingRecord, Trainings
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

RUN_ALL = """
import contextlib, io, json, sys
from finetune.cli import main
results = []
for argv in json.loads(sys.argv[1]):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(argv)
        except SystemExit as exit_:
            rc = exit_.code
        except BaseException as exc:  # a traceback is a failure of the test, reported as such
            rc = repr(exc)
    results.append({"argv": argv, "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
print(json.dumps(results))
"""


def _read_only_runner(root: Path) -> list[str] | None:
    """A command prefix that runs its command with ``root`` read-only, or None when this machine cannot."""
    if os.geteuid() != 0:
        return []  # permission bits are honoured: the fixture removes them
    if shutil.which("unshare") is None:
        return None
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"mount --bind {root} {root} && "
                            f"mount -o remount,bind,ro {root} && ! touch {root}/.probe"], capture_output=True)
    if probe.returncode != 0:
        return None
    return ["unshare", "-m", "sh", "-c", f'mount --bind {root} {root} && mount -o remount,bind,ro {root} && '
            'exec "$@"', "sh"]


@pytest.fixture(scope="module")
def setup(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("readonly")
    root = tmp / "registry"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(root)
        import_base(reg, "local/tiny", str(tiny_model_dir))
        reg.create_model("ro/empty")
        config = tmp / "c.yaml"
        config.write_text(yaml.safe_dump({
            "base_model": "local/tiny:1", "data": {"path": str(sample_data_path()), "max_seq_len": 128},
            "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"}}))
        assert main(["--registry", str(root), "train", str(config), "--destination", "ro/m",
                     "--create-destination", "--quiet"]) == 0
        reg.set_alias("ro/m:1", "prod")
        running = Trainings(reg).create(TrainingRecord(id="20260101-000000-aaaaaa", destination="ro/m",
                                                       status="processing", pid=None))
    prefix = _read_only_runner(root)
    if prefix is None:
        pytest.skip("cannot make a folder read-only here (root without a private mount namespace)")
    return {"root": root, "tmp": tmp, "config": config, "prefix": prefix, "running": running.id,
            "tiny": tiny_model_dir}


def run_all(setup: dict, commands: list[list[str]]) -> list[dict]:
    root = setup["root"]
    argv = [["--registry", str(root), *c] for c in commands]
    env = {**os.environ, "FINETUNE_FSYNC": "0"}
    if not setup["prefix"]:
        subprocess.run(["chmod", "-R", "a-w", str(root)], check=True)
    try:
        proc = subprocess.run([*setup["prefix"], sys.executable, "-c", RUN_ALL, json.dumps(argv)],
                              capture_output=True, text=True, env=env, timeout=600)
    finally:
        if not setup["prefix"]:
            subprocess.run(["chmod", "-R", "u+w", str(root)], check=True)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.splitlines()[-1])


def test_writing_commands_say_the_registry_is_not_writable(setup: dict):
    from helpers import snapshot

    root = setup["root"]
    before = snapshot(root)
    commands = [
        ["models", "create", "ro/new"],
        ["models", "create", "ro/new2", "--description", "x"],
        ["models", "import", "ro/base2", "--from", str(setup["tiny"])],
        ["models", "delete", "ro/empty"],
        ["versions", "alias", "ro/m:1", "staging"],
        ["versions", "alias", "ro/m", "prod", "--remove"],
        ["versions", "delete", "local/tiny:1"],
        ["registry", "gc", "--older-than", "0"],
        ["train", str(setup["config"]), "--destination", "ro/m", "--quiet"],
        ["trainings", "cancel", setup["running"]],
    ]
    for result in run_all(setup, commands):
        lines = result["err"].strip().splitlines()
        assert result["rc"] == 1, result
        assert len(lines) == 1 and lines[0].startswith("finetune: error: "), result
        assert f"the registry at {root} is not writable" in lines[0], result
        assert "FINETUNE_HOME" in lines[0], result
    assert snapshot(root) == before


def test_reading_commands_keep_working(setup: dict, tmp_path: Path):
    out_dir = tmp_path / "export"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name a color."}\n')
    commands = [
        ["models", "list"],
        ["models", "show", "ro/m"],
        ["versions", "list", "ro/m"],
        ["versions", "show", "ro/m:prod"],
        ["versions", "verify", "ro/m:1"],
        ["versions", "compare", "ro/m:1", "local/tiny:1"],
        ["trainings", "list"],
        ["trainings", "show", setup["running"]],
        ["trainings", "logs", setup["running"]],
        ["registry", "gc", "--dry-run"],
        ["predict", "ro/m:1", "Name a color.", "--max-new-tokens", "3"],
        ["predict", "ro/m:1", "--file", str(prompts), "--max-new-tokens", "3"],
        ["export", "ro/m:1", str(out_dir)],
    ]
    for result in run_all(setup, commands):
        assert result["rc"] == 0, result
    assert (out_dir / "adapter_config.json").is_file()
