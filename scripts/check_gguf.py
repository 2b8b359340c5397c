"""Run finetune's GGUF exports in llama.cpp itself and compare with ``finetune predict``.

    pip install llama-cpp-python            # builds llama.cpp from its source package (minutes)
    python scripts/check_gguf.py            # offline: tiny models built here
    python scripts/check_gguf.py REF ...    # versions of $FINETUNE_HOME
    python scripts/check_gguf.py --vocab-dir llama.cpp/models   # also real families' tokenizers

Answers. Each version is exported as GGUF (f16 and q8_0) and loaded by llama-cpp-python. For each prompt:
``tokens`` whether llama.cpp, tokenizing the prompt text finetune renders, gets finetune's ids; ``greedy``
whether llama.cpp's greedy answer from those ids is the text ``finetune predict --file`` prints; ``chat``
whether llama-cpp-python's chat completion of the bare prompt, rendered by the chat template inside the file,
gives that same text. The offline set: a tiny Llama trained on the sample data (Alpaca format, as the quickstart),
a tiny Qwen2 trained on the same answers as chat messages, and a random tiny model of every family export writes
plus a Llama with a SentencePiece-style tokenizer (their greedy answers are arbitrary text: a strict test of
the arithmetic and the tokenizer).

Vocabularies (``--vocab-dir``, llama.cpp's ``models/`` folder, shipped in llama-cpp-python's source package):
each ``ggml-vocab-NAME.gguf`` becomes a transformers tokenizer, finetune writes it back as a vocabulary-only
GGUF, and llama.cpp tokenizes the folder's test inputs with it; the ids must be the expected ones in
``NAME.gguf.out`` (the original file's ids are shown beside them).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HELD_OUT = ["Name three colors of the rainbow.", "Write one sentence about a harbor at dawn.",
            "What is two plus two?"]
VOCABS = ("gpt-2", "llama-bpe", "qwen2", "llama-spm", "phi-3", "deepseek-llm", "command-r", "falcon")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refs", nargs="*", help="versions to check (default: the offline set built here)")
    parser.add_argument("--quantize", nargs="+", default=["f16", "q8_0"], choices=["f16", "q8_0"])
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--vocab-dir", type=Path, help="llama.cpp's models/ folder (ggml-vocab-*.gguf)")
    parser.add_argument("--steps", type=int, default=100, help="training steps of the offline set's versions")
    parser.add_argument("--hidden", type=int, default=256, help="hidden size of the offline set's trained models")
    parser.add_argument("--family-quantize", nargs="+", default=["f16", "q8_0"], choices=["f16", "q8_0"],
                        help="quantizations for the random family models (the trained versions get --quantize)")
    args = parser.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("needs llama-cpp-python: pip install llama-cpp-python", file=sys.stderr)
        return 2
    print(f"llama-cpp-python {llama_cpp.__version__}", flush=True)
    from finetune.registry import Registry

    ok = True
    with tempfile.TemporaryDirectory(prefix="check-gguf-") as tmp:
        if args.refs:
            reg, checks = Registry(), [(ref, None) for ref in args.refs]
        else:
            reg, checks = _offline_set(Path(tmp), args.steps, args.hidden)
        for ref, samples in checks:
            for quantize in args.quantize if samples is not None or args.refs else args.family_quantize:
                ok &= _check_answers(reg, ref, quantize, (samples or []) + HELD_OUT, args.max_new_tokens, Path(tmp))
        if args.vocab_dir:
            ok &= _check_vocabularies(args.vocab_dir, Path(tmp))
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


def _offline_set(root: Path, steps: int, hidden: int):
    from finetune.config import config_from_dict
    from finetune.registry import Registry
    from finetune.registry.sources import import_base
    from finetune.tiny import alpaca_texts, build_tiny_model, load_sample_records, sample_data_path, train_tokenizer
    from finetune.tiny_families import FAMILIES, build_family_model, train_sentencepiece_style_tokenizer
    from finetune.training import train

    reg = Registry(root / "registry")
    records = load_sample_records()
    texts = list(alpaca_texts(records))
    tokenizer = train_tokenizer(texts)
    for arch in ("llama", "qwen2"):  # the quickstart's size: learns the sample answers in ~100 LoRA steps
        import_base(reg, f"local/{arch}", str(build_tiny_model(root / f"q-{arch}", tokenizer, arch=arch,
                                                               hidden_size=hidden, num_layers=4, num_heads=4)))
    chat = root / "chat.jsonl"
    chat.write_text("".join(json.dumps({"messages": [{"role": "user", "content": r["instruction"]},
                                                     {"role": "assistant", "content": r["output"]}]}) + "\n"
                            for r in records if not r.get("input")))
    for dest, base, data, fmt in (("check/alpaca", "local/llama:1", sample_data_path(), "alpaca"),
                                  ("check/chat", "local/qwen2:1", chat, "messages")):
        started = time.perf_counter()
        config = config_from_dict({"base_model": base, "data": {"path": str(data), "format": fmt, "max_seq_len": 256},
                                   "train": {"max_steps": steps, "batch_size": 16, "lr": 2e-3, "warmup_steps": 5,
                                             "seed": 0}})
        result = train(config, registry=reg, destination=dest, create_destination=True, progress=False)
        print(f"trained {result.version.ref} ({fmt}, {steps} steps, {time.perf_counter() - started:.0f} s, "
              f"train loss {result.record.metrics['train_loss']:.3f})", flush=True)
    seen = [r["instruction"] for r in records if not r.get("input")][:4]
    checks = [("check/alpaca:1", seen), ("check/chat:1", seen)]
    for family in FAMILIES:
        import_base(reg, f"base/{family}", str(build_family_model(root / family, family, tokenizer)))
        checks.append((f"base/{family}:1", None))
    spm = train_sentencepiece_style_tokenizer(texts)
    import_base(reg, "base/spm-llama", str(build_family_model(root / "spm", "llama", spm)))
    checks.append(("base/spm-llama:1", None))
    return reg, checks


def _predict(reg, ref: str, prompts: list[str], max_new: int, tmp: Path, loaded) -> list[str]:
    """What `finetune predict REF --file` prints for the prompts (greedy, the CLI's defaults): the CLI itself for
    trained versions, its function (`inference.generate`, which the CLI prints) in this process for the others."""
    from finetune.inference import GenerationSettings, generate

    if loaded.version.kind == "base":
        return [generate(loaded, p, GenerationSettings(max_new_tokens=max_new)) for p in prompts]
    path = tmp / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    env = {**os.environ, "FINETUNE_HOME": str(reg.root)}
    out = subprocess.run([sys.executable, "-m", "finetune", "predict", ref, "--file", str(path), "--max-new-tokens",
                          str(max_new), "--device", "cpu"], env=env, capture_output=True, text=True, check=True)
    return [json.loads(line)["completion"] for line in out.stdout.splitlines() if line.strip()]


def _check_answers(reg, ref: str, quantize: str, prompts: list[str], max_new: int, tmp: Path) -> bool:
    from llama_cpp import Llama

    from finetune.data.formats import encode_prompt, prompt_for
    from finetune.export import export
    from finetune.inference import load_version, prompt_ids

    started = time.perf_counter()
    out = export(reg, ref, tmp / f"{ref.replace('/', '_').replace(':', '_')}-{quantize}", format="gguf",
                 quantize=quantize)
    (path,) = out.glob("*.gguf")
    exported = time.perf_counter() - started
    loaded = load_version(reg, ref, device="cpu", precision="fp32")
    expected = _predict(reg, ref, prompts, max_new, tmp, loaded)
    eos = {loaded.tokenizer.eos_token_id}
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=2, verbose=False, seed=0)
    same_tokens = same_greedy = same_chat = 0
    chat_ok = loaded.prompt_format in ("alpaca", "prompt_completion", "messages")
    first_miss = ""
    for prompt, want in zip(prompts, expected):
        ids = prompt_ids(loaded, prompt)
        text = prompt_for(loaded.prompt_format, loaded.tokenizer, prompt)  # a chat render spells out its bos
        adds_bos = loaded.prompt_format != "messages" and bool(encode_prompt("text", loaded.tokenizer, ""))
        got_ids = llm.tokenize(text.encode("utf-8"), add_bos=adds_bos, special=True)
        same_tokens += got_ids == ids
        answer = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in eos or len(answer) >= max_new:
                break
            answer.append(token)
        got = loaded.tokenizer.decode(answer, skip_special_tokens=True)
        same_greedy += got == want
        if got != want and not first_miss:
            first_miss = f"  first difference: {prompt!r}: llama.cpp {got!r} / finetune {want!r}"
        if chat_ok:
            reply = llm.create_chat_completion([{"role": "user", "content": prompt}], temperature=0.0, top_k=1,
                                               top_p=1.0, min_p=0.0, repeat_penalty=1.0, max_tokens=max_new, seed=0)
            same_chat += reply["choices"][0]["message"]["content"] == want
    n = len(prompts)
    size = path.stat().st_size / 2**20
    chat = f", chat template {same_chat}/{n}" if chat_ok else ""
    print(f"{ref:18} {quantize:5} {size:7.2f} MiB  export {exported:5.1f} s  tokens {same_tokens}/{n}, "
          f"greedy answers {same_greedy}/{n}{chat}", flush=True)
    if first_miss:
        print(first_miss, flush=True)
    del llm
    # f16 must match exactly; q8_0 rounds weights to 8 bits, so an answer may part ways at a near-tie
    return same_tokens == n and (quantize != "f16" or (same_greedy == n and (not chat_ok or same_chat == n)))


def _check_vocabularies(folder: Path, tmp: Path) -> bool:
    import gguf
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    from finetune.gguf_vocab import gguf_vocab

    ok = True
    for name in VOCABS:
        source = folder / f"ggml-vocab-{name}.gguf"
        if not (source.is_file() and source.with_suffix(".gguf.inp").is_file()):
            print(f"vocab {name:13} (not in {folder})")
            continue
        inputs = source.with_suffix(".gguf.inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")[:-1]
        outputs = [[int(t) for t in line.split()] for line in
                   source.with_suffix(".gguf.out").read_text(encoding="utf-8").splitlines()]
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=source.name)
            reader = gguf.GGUFReader(source)
            n_tokens = len(reader.fields["tokenizer.ggml.tokens"].data)
            vocab = gguf_vocab(tokenizer, n_tokens, None)
        except Exception as err:  # report and go on: one family's failure says nothing of the others
            print(f"vocab {name:13} not exported: {type(err).__name__}: {err}")
            ok = False
            continue
        mine = tmp / f"vocab-{name}.gguf"
        writer = gguf.GGUFWriter(str(mine), bytes(reader.fields["general.architecture"].parts[-1]).decode())
        for key, field in reader.fields.items():  # the model's hyperparameters, as llama.cpp needs them to load
            if key.startswith(("GGUF.", "tokenizer.", "general.architecture")):
                continue
            writer.add_key_value(key, field.contents(), field.types[0], sub_type=field.types[-1]
                                 if field.types[0] == gguf.GGUFValueType.ARRAY else None)
        vocab.add_to(writer)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        results = []
        for path in (source, mine):
            llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
            results.append(sum(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False) == want
                               for text, want in zip(inputs, outputs)))
            del llm
        n = len(outputs)
        print(f"vocab {name:13} {vocab.model}/{vocab.pre or '-':10} llama.cpp test inputs tokenized as expected: "
              f"finetune's export {results[1]}/{n} (llama.cpp's own file {results[0]}/{n})", flush=True)
        ok &= results[1] == results[0]
    return ok


if __name__ == "__main__":
    sys.exit(main())
