"""Experiment trackers (``train.report_to``): the run's metrics, sent through accelerate's trackers.

What each tracker receives: the resolved config (flattened to dotted keys) when the run starts, every row that
goes to ``metrics.jsonl`` at its step, and the run's final figures (``final/train_loss``, ...) at the last step.
Runs are named after the training and its destination, and everything works offline:

* ``tensorboard``: event files under the training's folder (``trainings/ID/trackers/tensorboard/OWNER/NAME/``),
  so ``tensorboard --logdir $FINETUNE_HOME/trainings`` shows every training. A resumed run purges the steps it
  redoes.
* ``mlflow``: ``MLFLOW_TRACKING_URI`` when set, else one local store for the registry
  (``sqlite:///$FINETUNE_HOME/trackers/mlflow.db``); experiment = the destination, run = the training id. A
  resumed training continues its run.
* ``wandb``: project = the destination (``OWNER-NAME``, or ``WANDB_PROJECT``), run name and id = the training id.
  ``WANDB_MODE`` decides when set; otherwise the run is offline when there is no API key or the W&B host does not
  answer within a few seconds, and the files stay under ``trainings/ID/trackers/wandb/`` for ``wandb sync``.

Only the main process reports. A tracker that fails is a failure of the run, as a metrics file that cannot be
written would be.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

_WANDB_HOST = "https://api.wandb.ai"
_PROBE_TIMEOUT_S = 3.0


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"train.lr": 2e-4, ...}`` with values every tracker takes (lists joined by commas,
    null as ``"null"``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flat_config(value, name + "."))
        elif isinstance(value, (list, tuple)):
            out[name] = ",".join(map(str, value))
        else:
            out[name] = "null" if value is None else value
    return out


def step_values(row: Mapping[str, Any]) -> dict[str, float]:
    """A ``metrics.jsonl`` row as tracker metrics: its numbers, without the step (which is the x axis)."""
    return {k: v for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


def wandb_mode(environ: Mapping[str, str] | None = None, timeout: float = _PROBE_TIMEOUT_S) -> tuple[str, str]:
    """``(mode, why)``: ``WANDB_MODE`` when set; else offline without an API key or when the W&B host does not
    accept a connection within ``timeout`` seconds (W&B itself would retry for minutes), online otherwise."""
    env = os.environ if environ is None else environ
    if env.get("WANDB_MODE"):
        return env["WANDB_MODE"], "WANDB_MODE"
    url = urlparse(env.get("WANDB_BASE_URL") or _WANDB_HOST)
    host = url.hostname or "api.wandb.ai"
    if not env.get("WANDB_API_KEY") and not _netrc_has(host):
        return "offline", "no W&B API key (WANDB_API_KEY or `wandb login`)"
    try:
        with socket.create_connection((host, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout):
            pass
    except OSError:
        return "offline", f"{host} is not reachable"
    return "online", f"{host} is reachable"


def _netrc_has(host: str) -> bool:
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class RunTrackers:
    """The trackers of one run, created before its Accelerator (which takes them as ``log_with``)."""

    def __init__(self, names: list[str], training_id: str, destination: str, folder: Path, shared: Path):
        """``folder``: this run's tracker files; ``shared``: stores for all runs (the registry's trackers/)."""
        self.names = list(names)
        self.training_id, self.destination, self.folder, self.shared = training_id, destination, folder, shared
        self.notes: list[str] = []  # what the log says about where each tracker writes
        self.trackers = [self._make(name) for name in self.names]

    def _make(self, name: str) -> Any:
        from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

        if name == "tensorboard":
            where = self.folder / "tensorboard"
            self.notes.append(f"tensorboard: {where / self.destination}")
            return TensorBoardTracker(self.destination, where)
        if name == "mlflow":
            tags = {"finetune.training_id": self.training_id, "finetune.destination": self.destination}
            return MLflowTracker(self.destination, run_name=self.training_id, tags=tags)
        mode, why = wandb_mode()
        project = os.environ.get("WANDB_PROJECT") or self.destination.replace("/", "-")
        self.notes.append(f"wandb: {mode} ({why}), project {project}, files under {self.folder / 'wandb'}")
        return WandBTracker(project, name=self.training_id, id=self.training_id, resume="allow", mode=mode,
                            dir=str(self.folder), tags=[self.destination], job_type="train",
                            settings=_wandb_settings())

    def start(self, accelerator: Any, config: Mapping[str, Any], resumed_step: int) -> None:
        """Open each tracker's run (main process only) and record the resolved config."""
        if not accelerator.is_main_process or not self.trackers:
            return
        self.folder.mkdir(parents=True, exist_ok=True)  # W&B writes to a temporary folder if its `dir` is missing
        for tracker in self.trackers:
            if tracker.name == "tensorboard" and resumed_step:
                tracker.init_kwargs["purge_step"] = resumed_step + 1  # the steps this run redoes replace the old
            if tracker.name == "mlflow":
                self._mlflow_store(tracker)
        values = {"finetune.training_id": self.training_id, "finetune.destination": self.destination,
                  **flat_config(config)}
        accelerator.init_trackers(self.destination, config=values)

    def _mlflow_store(self, tracker: Any) -> None:
        import mlflow

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            store = self.shared
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            tracker.logging_dir = (store / "mlflow-artifacts").as_uri()  # else MLflow picks the working folder
        mlflow.set_tracking_uri(uri)
        experiment = mlflow.get_experiment_by_name(tracker.experiment_name)
        if experiment is not None and not tracker.run_id:  # a resumed training continues its run
            previous = mlflow.search_runs([experiment.experiment_id], output_format="list",
                                          filter_string=f"tags.`finetune.training_id` = '{self.training_id}'")
            if previous:
                tracker.run_id = previous[0].info.run_id
        self.notes.append(f"mlflow: {uri}, experiment {tracker.experiment_name}, run {self.training_id}")

    def log_step(self, accelerator: Any, row: Mapping[str, Any]) -> None:
        if self.trackers:
            accelerator.log(step_values(row), step=row["step"])

    def log_final(self, accelerator: Any, summary: Mapping[str, Any], step: int) -> None:
        if self.trackers:
            accelerator.log({f"final/{k}": v for k, v in step_values(summary).items()}, step=step)

    def finish(self, accelerator: Any, succeeded: bool) -> None:
        """Close every tracker's run; a run that failed or was canceled is marked so where the tracker can."""
        if not (self.trackers and accelerator.is_main_process and accelerator.trackers):
            return
        if not succeeded:
            for tracker in accelerator.trackers:
                if tracker.name == "mlflow":
                    import mlflow

                    mlflow.end_run(status="FAILED")
                elif tracker.name == "wandb":
                    tracker.run.finish(exit_code=1)
        accelerator.end_training()


def _wandb_settings() -> Any:
    import wandb

    # console off: W&B would otherwise wrap this process's stdout and stderr (the CLI's output, the test's capture)
    return wandb.Settings(console="off", silent=True, save_code=False, x_disable_stats=True)
