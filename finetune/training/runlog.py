"""The run's log: timestamped lines to the training's ``train.log``, echoed to the terminal."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..supervisor import notify


def step_line(row: dict, total_steps: int | None = None) -> str:
    """The log line of one logged step (``metrics.jsonl`` row): ``step 3/8: loss 6.9312, lr 0.002, 63 tokens/s``,
    with the eval loss when the step evaluated. The terminal shows the same figures on its progress bar."""
    where = f"step {row['step']}/{total_steps}" if total_steps else f"step {row['step']}"
    parts = [f"loss {row['loss']:.4f}"] if isinstance(row.get("loss"), (int, float)) else []
    if isinstance(row.get("lr"), (int, float)):
        parts.append(f"lr {row['lr']:.3g}")
    if isinstance(row.get("tokens_per_s"), (int, float)) and row["tokens_per_s"] > 0:
        parts.append(f"{row['tokens_per_s']:,.0f} tokens/s")
    if isinstance(row.get("eval_loss"), (int, float)):
        parts.append(f"eval loss {row['eval_loss']:.4f}")
    return f"{where}: {', '.join(parts)}" if parts else where


class RunLog:
    """Append lines to ``path`` (None: don't write, as on non-main processes) and optionally echo them."""

    def __init__(self, path: Path | None, echo: bool = True):
        self._file = open(path, "a", encoding="utf-8", buffering=1) if path is not None else None
        self._echo = echo and path is not None

    def info(self, message: str, echo: bool = True) -> None:
        """Log a line; ``echo=False`` keeps it out of the terminal (where the caller prints it its own way)."""
        if self._file is not None:
            try:
                self._file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")
            except OSError:
                pass  # a full disk loses a log line; the run's own error says why, and the record keeps it
            notify("log", line=message[:2000])
        if self._echo and echo:
            from tqdm.auto import tqdm

            tqdm.write(message, file=sys.stderr)  # keeps the progress bar intact

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass  # the last buffered line, on a full disk
            self._file = None


def quiet_libraries() -> None:
    """Silence the libraries' per-file progress bars and notices: our own bar and log say what happens."""
    import warnings

    import datasets
    import transformers

    datasets.disable_progress_bars()
    # datasets logs a file it cannot parse at ERROR level before raising; the data layer turns that into one
    # error line naming the file and line, so the log record would only put a second, vaguer one before it.
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
