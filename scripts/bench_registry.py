#!/usr/bin/env python
"""Benchmark the registry at scale: one model with N versions, published for real through Registry.publish.

    python scripts/bench_registry.py                 # 10,000 versions in a temporary registry
    python scripts/bench_registry.py --versions 1000 --root /tmp/bench-reg --keep

Then times the read paths a user hits on a big model: listing, `latest`, resolving by number, alias and id
prefix, and ``finetune versions list --limit 20`` through the CLI (in-process). Each figure is the median of
``--repeat`` runs (with the fastest run beside it). `latest` must not list the versions folder; the script
checks that and says so.

fsync is turned off for the publishing phase unless ``--fsync`` is given (FINETUNE_FSYNC=0, never the default
for real use): it only matters after a power cut and would make creating 10,000 versions take many minutes.
The read paths do not fsync, so the timings are the same either way.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--versions", type=int, default=10_000, help="versions to create (default: 10000)")
    p.add_argument("--root", type=Path, default=None,
                   help="registry root; an existing bench model there is topped up, not recreated "
                        "(default: a temporary folder, removed at the end)")
    p.add_argument("--keep", action="store_true", help="keep the temporary registry")
    p.add_argument("--repeat", type=int, default=7, help="runs per timing (default: 7)")
    p.add_argument("--fsync", action="store_true", help="keep fsync on while publishing (slow)")
    args = p.parse_args(argv)
    if args.versions < 1 or args.repeat < 1:
        p.error("--versions and --repeat must be at least 1")
    return args


def _time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, fastest) wall time of ``fn`` in seconds."""
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), min(runs)


def _fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:8.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:8.2f} ms"
    return f"{seconds:8.2f} s "


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if not args.fsync:
        os.environ["FINETUNE_FSYNC"] = "0"
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from finetune import cli
    from finetune.registry import Registry

    temp = args.root is None
    root = Path(tempfile.mkdtemp(prefix="bench-registry-")) / "registry" if temp else args.root
    model = "bench/many-versions"
    print(f"registry: {root}")
    print(f"fsync while publishing: {'on' if args.fsync else 'OFF (FINETUNE_FSYNC=0, benchmark only)'}")
    try:
        reg = Registry(root)
        reg.create_model(model, description="bench_registry.py", exist_ok=True)
        have = len(reg.list_versions(model))

        # ---------------------------------------------------------------- publish
        src = Path(tempfile.mkdtemp(prefix="bench-src-"))
        try:
            (src / "adapter_config.json").write_text('{"r": 8, "lora_alpha": 16}')
            weights = src / "adapter_model.safetensors"
            todo = max(0, args.versions - have)
            t0 = time.perf_counter()
            import numpy as np
            from safetensors.numpy import save_file

            for i in range(todo):
                # ~1 KiB of real safetensors (the registry refuses anything else), different every time
                save_file({"w": np.full(240, float(have + i), dtype=np.float32)}, str(weights))
                reg.publish(model, src, parent={"hub_id": "bench/base", "revision": "0" * 40},
                            metadata={"metrics": {"train_loss": 1.0 / (have + i + 1)}})
                if todo >= 1000 and (i + 1) % (todo // 10) == 0:
                    rate = (i + 1) / (time.perf_counter() - t0)
                    print(f"  published {have + i + 1:>7,} / {args.versions:,}  ({rate:,.0f} publishes/s)", flush=True)
            elapsed = time.perf_counter() - t0
        finally:
            shutil.rmtree(src)
        if todo:
            print(f"published {todo:,} versions in {elapsed:.1f} s ({todo / elapsed:,.0f} publishes/s, "
                  f"{elapsed / todo * 1e3:.2f} ms each)")
        versions = reg.list_versions(model)
        n = len(versions)
        newest = versions[0]
        print(f"model {model}: {n:,} versions, newest {newest.ref}")

        # ---------------------------------------------------------------- does latest scan?
        listings = 0
        real_listdir = Registry._listdir

        def counting_listdir(self: Registry, path: Path) -> list:
            nonlocal listings
            listings += 1
            return real_listdir(self, path)

        Registry._listdir = counting_listdir  # type: ignore[method-assign]
        try:
            assert reg.latest(model) == newest and reg.resolve(f"{model}:latest") == newest
        finally:
            Registry._listdir = real_listdir  # type: ignore[method-assign]
        print(f"latest / resolve(':latest') listed a folder: {'YES (it scans!)' if listings else 'no'}")

        # ---------------------------------------------------------------- timings
        reg.set_alias(f"{model}:{versions[n // 2].number}", "bench-alias")
        mid = versions[n // 2]
        prefix = mid.id[:8]
        sink = io.StringIO()

        def cli_versions_list() -> None:
            sink.seek(0)
            sink.truncate()
            with contextlib.redirect_stdout(sink):
                rc = cli.main(["--registry", str(root), "versions", "list", model, "--limit", "20"])
            assert rc == 0 and len(sink.getvalue().splitlines()) == 21

        cases: list[tuple[str, Callable[[], object], int]] = [
            ("list_versions (no manifests read)", lambda: reg.list_versions(model), args.repeat),
            ("latest", lambda: reg.latest(model), args.repeat * 20),
            ("resolve(':latest')", lambda: reg.resolve(f"{model}:latest"), args.repeat * 20),
            ("resolve(':1')", lambda: reg.resolve(f"{model}:1"), args.repeat * 20),
            (f"resolve(':{newest.number}')", lambda: reg.resolve(f"{model}:{newest.number}"), args.repeat * 20),
            ("resolve(':ALIAS')", lambda: reg.resolve(f"{model}:bench-alias"), args.repeat * 20),
            ("resolve(':latest').manifest (read 1 manifest)",
             lambda: reg.resolve(f"{model}:latest").manifest, args.repeat * 20),
            ("CLI versions list --limit 20", cli_versions_list, args.repeat),
            ("resolve(':IDPREFIX') (reads every manifest)", lambda: reg.resolve(f"{model}:{prefix}"), 3),
        ]
        print(f"\n{'operation':<48}{'median':>12}{'fastest':>12}   ({n:,} versions)")
        for name, fn, repeat in cases:
            med, best = _time(fn, repeat)
            print(f"{name:<48}{_fmt(med):>12}{_fmt(best):>12}")
        assert reg.resolve(f"{model}:{prefix}") == mid
    finally:
        if temp and not args.keep:
            from finetune.atomic import remove_tree

            remove_tree(root.parent)  # published folders are read-only: plain rmtree fails for non-root users
        elif temp:
            print(f"kept {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
