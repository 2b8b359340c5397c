"""Hostile or unusual input reaches every reader and every text argument as ONE error line with the right exit
code, never a traceback: non-UTF-8 bytes, empty files, folders, wrong columns, non-UTF-8 arguments and stdin,
damaged cache entries, generation past the model's context, and the hints that used to point the wrong way.

The sweep runs each data reader of the command line (training data, training eval file, `predict --file`,
`versions compare --eval` and `--prompts`) over each bad file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import assert_one_line_error

from finetune.cli import main
from finetune.registry import Registry
from finetune.registry.sources import import_base
from finetune.tiny import sample_data_path

DEST = "bad/dest"


@pytest.fixture(scope="module")
def root(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with the tiny base and one trained version of DEST (one step)."""
    tmp = tmp_path_factory.mktemp("bad-input")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FINETUNE_FSYNC", "0")
        reg = Registry(tmp / "registry")
        import_base(reg, "local/tiny", str(tiny_model_dir))
        reg.create_model(DEST)
        cfg = write_config(tmp / "c.yaml", sample_data_path())
        assert main(["--registry", str(reg.root), "train", str(cfg), "--destination", DEST, "--quiet"]) == 0
    return reg.root


def write_config(path: Path, data_path: str | Path, **data: object) -> Path:
    cfg = {"base_model": "local/tiny:1", "data": {"path": str(data_path), "max_seq_len": 128, **data},
           "lora": {"r": 4, "alpha": 8}, "train": {"max_steps": 1, "batch_size": 4, "precision": "fp32"}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def run(root: Path, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(["--registry", str(root), *argv])
    out, err = capsys.readouterr()
    # `train --quiet` prints the id of the record it opened before the error: that line is expected
    err = "\n".join(line for line in err.splitlines() if not line.startswith("training "))
    return rc, out, err


# ------------------------------------------------------------------------------------------- the reader sweep

LATIN1_ALPACA = {  # valid in every way but the encoding: 'café' in Latin-1
    ".jsonl": b'{"instruction": "caf\xe9?", "input": "", "output": "yes"}\n',
    ".json": b'[{"instruction": "caf\xe9?", "input": "", "output": "yes"}]',
    ".csv": b"instruction,input,output\ncaf\xe9?,,yes\n",
}
WRONG_COLUMNS = {
    ".jsonl": b'{"question": "color?", "answer": "red"}\n',
    ".csv": b"question,answer\ncolor?,red\n",
}


def bad_files(tmp: Path) -> list[tuple[str, Path, str]]:
    """(case, path, a needle its error must hold)."""
    cases = []
    for ext, data in LATIN1_ALPACA.items():
        p = tmp / f"latin1{ext}"
        p.write_bytes(data)
        cases.append((f"latin1{ext}", p, "not UTF-8 text"))
    for ext in (".jsonl", ".json", ".csv", ".parquet"):
        p = tmp / f"empty{ext}"
        p.write_bytes(b"")
        cases.append((f"empty{ext}", p, "is empty"))
    header_only = tmp / "header-only.csv"
    header_only.write_bytes(b"instruction,input,output\n")
    cases.append(("header-only.csv", header_only, "has no records"))
    folder = tmp / "adir.jsonl"
    folder.mkdir()
    cases.append(("folder", folder, "is a folder"))
    garbage = tmp / "garbage.parquet"
    garbage.write_bytes(b"caf\xe9 not parquet")
    cases.append(("garbage.parquet", garbage, "cannot be read"))
    for ext, data in WRONG_COLUMNS.items():
        p = tmp / f"wrong{ext}"
        p.write_bytes(data)
        cases.append((f"wrong{ext}", p, str(p)))
    return cases


READERS = ["train data.path", "train data.eval", "predict --file", "compare --eval", "compare --prompts"]


@pytest.mark.parametrize("reader", READERS)
def test_every_reader_refuses_every_bad_file_in_one_line(root: Path, tmp_path: Path, capsys, reader: str):
    reg = Registry(root)
    versions_before = len(reg.list_versions(DEST))
    for case, path, needle in bad_files(tmp_path):
        if reader == "train data.path":
            argv = ["train", str(write_config(tmp_path / "c.yaml", path)), "--destination", DEST, "--quiet"]
        elif reader == "train data.eval":
            cfg = write_config(tmp_path / "c.yaml", sample_data_path(), eval=str(path))
            argv = ["train", str(cfg), "--destination", DEST, "--quiet"]
        elif reader == "predict --file":
            argv = ["predict", f"{DEST}:1", "--file", str(path), "--max-new-tokens", "2"]
        elif reader == "compare --eval":
            argv = ["versions", "compare", f"{DEST}:1", "local/tiny:1", "--eval", str(path)]
        else:
            argv = ["versions", "compare", f"{DEST}:1", "local/tiny:1", "--prompts", str(path),
                    "--max-new-tokens", "2"]
        if case.startswith("wrong") and reader.startswith(("predict", "compare --prompts")):
            needle = "no 'prompt' field"  # a prompts file has its own columns
        rc, out, err = run(root, capsys, *argv)
        assert rc == 1, (case, rc, err)
        assert out == "", (case, out)
        assert_one_line_error(rc, err, needle)
    assert len(reg.list_versions(DEST)) == versions_before  # nothing published


def test_non_utf8_error_names_the_line(tmp_path: Path):
    from finetune.data.records import read_records
    from finetune.errors import DataError

    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "also fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:3: not UTF-8 text"):
        read_records(str(p))
    bom = tmp_path / "bom.csv"  # a UTF-8 byte order mark is UTF-8: Excel writes one
    bom.write_bytes(b"\xef\xbb\xbfinstruction,output\nhi,there\n")
    assert read_records(str(bom)).to_list() == [{"instruction": "hi", "output": "there"}]


# ------------------------------------------------------------------------------------------- text arguments


def test_non_utf8_arguments_and_stdin(root: Path, capsys, monkeypatch: pytest.MonkeyPatch):
    latin = "caf\udce9"  # how Python hands over the argument bytes 'caf\xe9'
    rc, out, err = run(root, capsys, "predict", f"{DEST}:1", latin, "--max-new-tokens", "2")
    assert_one_line_error(rc, err, "the prompt is not UTF-8 text", "byte e9")
    assert rc == 2 and out == ""
    rc, out, err = run(root, capsys, "predict", f"{DEST}:1", "hi", "--system", latin, "--max-new-tokens", "2")
    assert rc == 2 and "system prompt is not UTF-8" in err
    rc, out, err = run(root, capsys, "models", "create", "bad/described", "--description", latin)
    assert_one_line_error(rc, err, "the description is not UTF-8 text")
    assert not (root / "models" / "bad" / "described").exists()


def test_non_utf8_stdin_to_chat(root: Path, tmp_path: Path):
    """Chat reads stdin as bytes and says which line is not UTF-8 (a tiny base whose tokenizer has a template)."""
    env = {**os.environ, "FINETUNE_HOME": str(root)}
    proc = subprocess.run([sys.executable, "-m", "finetune", "chat", "local/tiny:1", "--max-new-tokens", "2"],
                          input=b"hello\ncaf\xe9\n", capture_output=True, env=env, timeout=300)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert_one_line_error(proc.returncode, err, "stdin line 2 is not UTF-8 text")
    assert len(proc.stdout.decode().splitlines()) == 1  # the first line was answered


# ------------------------------------------------------------------------------------------- generation bounds


def test_generation_is_bounded_by_the_context(root: Path, capsys, caplog):
    rc, out, err = run(root, capsys, "predict", f"{DEST}:1", "hi", "--max-new-tokens", "100000")
    assert_one_line_error(rc, err, "max_new_tokens 100000", "context of 1024 tokens", "ask for at most")
    assert rc == 2

    from finetune.inference import GenerationSettings, generate_ids, load_version

    loaded = load_version(Registry(root), f"{DEST}:1", device="cpu")
    prompt = [5] * 1020  # 1,020 tokens: 4 positions are left
    with caplog.at_level("WARNING", logger="finetune"):
        new = generate_ids(loaded, prompt, GenerationSettings(max_new_tokens=50))
    assert len(new) <= 4
    assert "stops after 4 new tokens" in caplog.text
    from finetune.errors import UsageError

    with pytest.raises(UsageError, match="fills .* context"):
        generate_ids(loaded, [5] * 1024, GenerationSettings(max_new_tokens=1))


def test_ctrl_c_stops_a_generation(root: Path):
    """SIGINT while the model generates ends the command at once with one line and exit 130."""
    code = (
        "import sys\n"
        "from finetune.cli import main\n"
        "from finetune.decoding.engine import Engine\n"
        "orig = Engine.run_here\n"
        "def run_here(self, *a, **k):\n"
        "    print('GENERATING', file=sys.stderr, flush=True)\n"
        "    return orig(self, *a, **k)\n"
        "Engine.run_here = run_here\n"
        "sys.exit(main(sys.argv[1:]))\n")
    env = {**os.environ, "FINETUNE_HOME": str(root)}
    proc = subprocess.Popen([sys.executable, "-c", code, "predict", f"{DEST}:1", "hi", "--max-new-tokens", "900"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        seen = []
        while "GENERATING" not in (line := proc.stderr.readline()):
            assert line, seen  # the process ended before generating
            seen.append(line)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert err.strip() == "finetune: interrupted"
    assert out == ""


# ------------------------------------------------------------------------------------------- hints and checks


def test_cli_messages(root: Path, tmp_path: Path, capsys, tiny_model_dir: Path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--registry", str(root), "versions"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.strip().splitlines()) == 1
    assert "`finetune versions` needs a command: list, show, verify, delete, alias, compare" in err
    rc, _, err = run(root, capsys, "models", "delete", "bad/nope")
    assert_one_line_error(rc, err, "model bad/nope not found", "finetune models list")
    assert "models create" not in err
    assert main(["--registry", "", "models", "list"]) == 2
    assert_one_line_error(2, capsys.readouterr().err, "the registry path is empty")

    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir, no_tokenizer)
    for f in no_tokenizer.glob("tokenizer*"):
        f.unlink()
    rc, _, err = run(root, capsys, "models", "import", "bad/notok", "--from", str(no_tokenizer))
    assert_one_line_error(rc, err, "has no tokenizer", "tokenizer.save_pretrained")
    assert not (root / "models" / "bad" / "notok").exists()
    rc, _, err = run(root, capsys, "models", "import", "bad/rev", "--from", str(tiny_model_dir), "--revision", "v2")
    assert_one_line_error(rc, err, "--revision v2 applies to hub ids")
    assert rc == 2 and not (root / "models" / "bad" / "rev").exists()


def test_training_config_hints(root: Path, tmp_path: Path, capsys):
    cfg = write_config(tmp_path / "c.yaml", sample_data_path())
    rc, _, err = run(root, capsys, "train", str(cfg), "--destination", DEST, "--quiet", "--set", "train.eval_every=1")
    assert_one_line_error(rc, err, "train.eval_every: needs an eval set")
    assert rc == 2
    rc, _, err = run(root, capsys, "train", str(cfg), "--destination", DEST, "--quiet",
                     "--set", "lora.target_modules=[foo]")
    assert_one_line_error(rc, err, "lora.target_modules", "q_proj", "v_proj")
    assert "lm_head" not in err

    null = tmp_path / "null.jsonl"
    null.write_text(json.dumps({"instruction": "hi", "input": "", "output": None}) + "\n")
    rc, _, err = run(root, capsys, "train", str(write_config(tmp_path / "n.yaml", null)), "--destination", DEST,
                     "--quiet")
    assert_one_line_error(rc, err, "field 'output' is missing or null")

    typo = tmp_path / "typo.jsonl"
    typo.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistent", "content": "hello"}]}) + "\n")
    rc, _, err = run(root, capsys, "train", str(write_config(tmp_path / "t.yaml", typo)), "--destination", DEST,
                     "--quiet")
    assert_one_line_error(rc, err, "role 'assistent'", "did you mean 'assistant'")
    assert "max_seq_len" not in err


def test_offline_hub_base_names_our_way_out(root: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = write_config(tmp_path / "c.yaml", sample_data_path())
    rc, _, err = run(root, capsys, "train", str(cfg), "--destination", DEST, "--quiet",
                     "--set", "base_model=nobody/not-cached-anywhere")
    assert_one_line_error(rc, err, "not in the local Hugging Face cache", "hf download nobody/not-cached-anywhere")
    assert "local_files_only" not in err


def test_damaged_tokenized_cache_entry_is_rebuilt(root: Path, tmp_path: Path, capsys, caplog):
    cfg = write_config(tmp_path / "c.yaml", sample_data_path())
    cache = root / "cache" / "tokenized"
    entries = [e for e in cache.iterdir() if not e.name.startswith(".")]
    assert entries  # the fixture's training filled it
    for arrow in cache.rglob("*.arrow"):
        arrow.write_bytes(arrow.read_bytes()[:100])  # torn
    with caplog.at_level("WARNING", logger="finetune"):
        rc, out, err = run(root, capsys, "train", str(cfg), "--destination", DEST, "--quiet")
    assert rc == 0, err
    assert "is damaged" in caplog.text and "rebuilding it" in caplog.text
    for info in cache.rglob("info.json"):
        info.write_text("{not json")
    rc, out, err = run(root, capsys, "train", str(cfg), "--destination", DEST, "--quiet")
    assert rc == 0, err
    caplog.clear()
    with caplog.at_level("WARNING", logger="finetune"):
        rc, out, err = run(root, capsys, "train", str(cfg), "--destination", DEST, "--quiet")
    assert rc == 0 and "damaged" not in caplog.text  # rebuilt for good
