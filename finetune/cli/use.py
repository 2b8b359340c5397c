"""Using versions: ``finetune predict``, ``finetune chat`` and ``finetune export``."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import UsageError
from ..registry import Version
from .common import add_command, open_registry


def generation_settings(args: argparse.Namespace):
    """The generation options given as flags, checked by the one rule every caller uses (before a model loads)."""
    from ..generation import OPTIONS, check_settings, flag

    return check_settings({name: getattr(args, name) for name in OPTIONS}, name=flag,
                          hint=f"see `finetune {getattr(args, 'group', 'predict')} --help`")


def quiet() -> None:
    from ..training.runlog import quiet_libraries

    quiet_libraries()  # stdout is the answer; loaders' progress bars and notices would only clutter stderr


def _load_for_inference(args: argparse.Namespace, version: Version):
    from ..inference import load_version

    # version.ref names the exact number: a `:latest` published meanwhile must not swap the model under us.
    return load_version(open_registry(args), version.ref, device=args.device)


def cmd_predict(args: argparse.Namespace) -> None:
    if (args.prompt is None) == (args.file is None):
        raise UsageError("give either a PROMPT or --file PROMPTS.jsonl", 'e.g. finetune predict REF "Name a color."')
    if args.prompt is not None and not args.prompt.strip():
        raise UsageError("the prompt is empty", "give the text to complete")
    settings = generation_settings(args)
    version = open_registry(args).resolve(args.ref)  # an unknown ref fails before the seconds of importing torch
    quiet()
    from ..inference import generate, load_prompts, prompt_format_of

    prompts = load_prompts(args.file, prompt_format_of(version)) if args.file is not None else None
    loaded = _load_for_inference(args, version)
    if prompts is None:
        print(generate(loaded, args.prompt, settings, system=args.system))
        return
    for prompt in prompts:
        fields = {k: v for k, v in (prompt.record or {}).items() if v is not None}
        completion = generate(loaded, prompt, settings, system=args.system)
        print(json.dumps({**fields, "completion": completion}, ensure_ascii=False), flush=True)


def cmd_chat(args: argparse.Namespace) -> None:
    settings = generation_settings(args)
    version = open_registry(args).resolve(args.ref)
    quiet()
    from ..inference import chat, require_chat

    if version.kind != "base":  # a base may chat if its tokenizer has a template: known once that is loaded
        require_chat(version)  # refuse before the seconds of loading a model
    loaded = _load_for_inference(args, version)
    replies = chat(loaded, _stdin_lines(), settings, system=args.system)
    if sys.stdin.isatty():
        print(f"chatting with {loaded.version.ref}; /reset starts over, /exit (or Ctrl-D) ends", file=sys.stderr)
    for reply in replies:
        print(reply, flush=True)


def _stdin_lines():
    interactive = sys.stdin.isatty()
    number = 0
    while True:
        if interactive:
            print("> ", end="", file=sys.stderr, flush=True)
        # bytes, decoded here, so non-UTF-8 input is one clear error (a text stream without bytes: as it is)
        buffer = getattr(sys.stdin, "buffer", None)
        raw = buffer.readline() if buffer is not None else sys.stdin.readline()
        if not raw:
            return
        number += 1
        try:
            yield raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except UnicodeDecodeError:
            raise UsageError(f"stdin line {number} is not UTF-8 text",
                             "use a UTF-8 terminal or file (e.g. `export LANG=C.UTF-8`)") from None


def cmd_export(args: argparse.Namespace) -> None:
    from ..export import export

    quiet()
    out = export(open_registry(args), args.ref, args.out_dir, format=args.format, dtype=args.dtype,
                 quantize=args.quantize)
    print(out)


def add_generation_options(p: argparse.ArgumentParser) -> None:
    """The generation options (:data:`finetune.generation.OPTIONS`, the API's inputs too) as flags, and --device."""
    from ..generation import DEFAULTS, OPTIONS, flag

    for option in OPTIONS.values():
        default = getattr(DEFAULTS, option.name)
        shown = f" (default {default})" if default not in (None, ()) else ""
        p.add_argument(flag(option.name), type=option.kind, default=None, dest=option.name,
                       metavar={int: "N", float: "X", str: "TEXT"}[option.kind],
                       help=option.description.replace("%", "%%") + shown)
    p.add_argument("--device", default="auto", help="auto (follows the model's hardware), cpu, gpu or cuda:N")


def add_commands(groups: argparse._SubParsersAction) -> None:
    p = add_command(groups, "predict", cmd_predict, "complete a prompt with a version, formatted as its training did")
    p.add_argument("ref", metavar="REF")
    p.add_argument("prompt", nargs="?", metavar="PROMPT")
    p.add_argument("--file", metavar="PROMPTS.jsonl", help="one prompt per record; prints JSONL with completions")
    p.add_argument("--system", default=None, help="system prompt (versions trained on chat messages)")
    add_generation_options(p)
    p = add_command(groups, "chat", cmd_chat, "chat with a version trained on messages (stdin lines; /reset, /exit)")
    p.add_argument("ref", metavar="REF")
    p.add_argument("--system", default=None, help="system prompt")
    add_generation_options(p)
    p = add_command(groups, "export", cmd_export,
                    "write a version to a folder: its PEFT adapter, merged into its base, or as GGUF")
    p.add_argument("ref", metavar="REF")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a new or empty folder")
    p.add_argument("--format", choices=("adapter", "merged", "gguf"), default="adapter")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights dtype of a merged export (auto: the base model's)")
    p.add_argument("--quantize", choices=("f16", "q8_0"), default=None,
                   help="weights of a GGUF export (default f16; q8_0 is about half the size)")
