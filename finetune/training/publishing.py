"""Turning a finished run into a version: the PEFT adapter folder, its model card and loss curve, the manifest's
metadata (config, data, metrics, lineage), then an atomic publish through the registry."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

from ..config import BASE_CHANGING_INITS, Config
from ..errors import IntegrityError
from ..registry import Registry, Version
from ..registry.jobs import TrainingRecord, Trainings
from ..registry.sources import ResolvedModel
from .metrics import MetricsLog

# pissa and olora start the adapter from the base's principal part and take it out of the base: the adapter as it
# was before training, kept in the training's folder, lets the published one be converted to a plain LoRA over the
# unchanged base (peft's path_initial_model_for_weight_conversion; twice the rank).
INITIAL_ADAPTER = "initial-adapter"


def save_initial_adapter(model: Any, folder: Path, main: bool = True) -> None:
    """Keep the adapter as initialised (pissa, olora) for the conversion at publish; main process only."""
    if main:
        model.save_pretrained(str(folder / INITIAL_ADAPTER), safe_serialization=True)


def _conversion(trainings: Trainings, record: TrainingRecord, config: Config,
                resolved: ResolvedModel) -> dict[str, Any]:
    if config.lora.init not in BASE_CHANGING_INITS or resolved.adapter is not None:
        return {}
    initial = trainings.paths(record.id).folder / INITIAL_ADAPTER
    if not (initial / "adapter_config.json").is_file():
        raise IntegrityError(f"training {record.id}: the initial {config.lora.init} adapter ({initial}) is missing, "
                             "so the adapter cannot be converted to one over the unchanged base; nothing published")
    return {"path_initial_model_for_weight_conversion": str(initial)}


_DATASET_KEYS = ("path", "sha256", "rows", "format", "template", "train_rows", "eval_rows", "truncated", "dropped",
                 "train_tokens", "label_tokens", "preference")


def publish_adapter(
    reg: Registry,
    trainings: Trainings,
    record: TrainingRecord,
    destination: str,
    peft_model: Any,
    tokenizer: Any,
    config: Config,
    resolved: ResolvedModel,
    data_info: dict[str, Any],
    summary: dict[str, Any],
    metrics: MetricsLog,
) -> Version:
    """Save the adapter in PEFT's own format with a model card and loss curve, and publish it."""
    out = trainings.paths(record.id).output
    if out.exists():
        shutil.rmtree(out)
    # Only the trained adapter: a dpo run continuing a version also holds a frozen copy of it (training.dpo).
    with warnings.catch_warnings():  # peft's conversion loads the initial adapter beside it, and warns about that
        warnings.filterwarnings("ignore", message=".* changes the base weights of the model")
        peft_model.save_pretrained(str(out), safe_serialization=True, selected_adapters=["default"],
                                   **_conversion(trainings, record, config, resolved))
    _strip_local_paths(out / "adapter_config.json")
    fmt = data_info.get("format")
    metadata = {
        "training_id": record.id,
        "config": config.to_dict(),
        "dataset": {k: data_info.get(k) for k in _DATASET_KEYS if k in data_info},
        "prompt_format": {
            "name": fmt,
            "template": data_info.get("template"),
            # Inference renders chat prompts with exactly the template the run trained with.
            "chat_template": tokenizer.chat_template if fmt == "messages" else None,
        },
        "metrics": summary,
        "base": resolved.base.to_dict(),
        "lora": _lora_summary(out / "adapter_config.json"),
    }
    rows = metrics.read()
    plot_loss(rows, out / "loss.png", title=f"{destination} ({record.id})")
    (out / "README.md").write_text(model_card(destination, metadata, resolved, rows), encoding="utf-8")
    return reg.publish(destination, out, parent=resolved.parent_info, metadata=metadata, kind="adapter")


def _strip_local_paths(adapter_config: Path) -> None:
    # peft records the base's load path; for a registry base that is a folder inside this registry, which
    # means nothing elsewhere. Lineage lives in the manifest; keep hub ids, drop local paths.
    cfg = json.loads(adapter_config.read_text())
    if cfg.get("base_model_name_or_path") and Path(str(cfg["base_model_name_or_path"])).is_absolute():
        cfg["base_model_name_or_path"] = None
        adapter_config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _lora_summary(adapter_config: Path) -> dict[str, Any]:
    cfg = json.loads(adapter_config.read_text())
    modules = cfg.get("target_modules")
    return {"r": cfg.get("r"), "alpha": cfg.get("lora_alpha"), "dropout": cfg.get("lora_dropout"),
            "target_modules": sorted(modules) if isinstance(modules, list) else modules}


def _method_lines(cfg: dict[str, Any], m: dict[str, Any]) -> list[str]:
    train = cfg.get("train", {})
    if train.get("method") != "dpo":
        return []
    dpo = cfg.get("dpo", {})
    fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    return ["## Preference training", "",
            f"- DPO, loss {dpo.get('loss')}, beta {dpo.get('beta')}, sft_weight {dpo.get('sft_weight')}",
            f"- last step: reward accuracy {fmt(m.get('reward_accuracy'))}, margin {fmt(m.get('reward_margin'))} "
            f"(chosen {fmt(m.get('reward_chosen'))}, rejected {fmt(m.get('reward_rejected'))})", ""]


def plot_loss(rows: list[dict[str, Any]], path: Path, title: str = "") -> None:
    """Train (and eval, when present) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [r["step"] for r in rows if "loss" in r]
    ax.plot(steps, [r["loss"] for r in rows if "loss" in r], label="train loss", linewidth=1.2)
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.2, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def model_card(destination: str, meta: dict[str, Any], resolved: ResolvedModel, rows: list[dict[str, Any]]) -> str:
    """The version's README.md: what it was trained from and on, how well, and how to load it."""
    m, d, cfg = meta["metrics"], meta["dataset"], meta["config"]
    lineage = [f"- `{v.ref}` ({v.id[:12]}, {v.kind})" for v in resolved.chain] or [f"- {resolved.base.description}"]
    fmt = lambda x: f"{x:.4f}" if isinstance(x, (int, float)) else "-"  # noqa: E731
    return "\n".join([
        f"# {destination}",
        "",
        f"A LoRA adapter trained by finetune (training `{meta['training_id']}`).",
        "",
        "## Lineage",
        "",
        f"Trained from `{resolved.spec}`:",
        *lineage,
        "",
        "## Data",
        "",
        f"- file: `{d.get('path')}` (sha256 `{str(d.get('sha256'))[:16]}`, {d.get('rows')} rows, "
        f"{d.get('train_rows')} train / {d.get('eval_rows')} eval)",
        f"- prompt format: `{meta['prompt_format']['name']}`",
        "",
        "## Metrics",
        "",
        f"- train loss: {fmt(m.get('train_loss'))} (mean of the last {m.get('train_loss_steps', 1)} steps; "
        f"last step {fmt(m.get('last_step_loss'))}); eval loss: {fmt(m.get('eval_loss'))}",
        f"- steps: {m.get('steps')}; trained tokens: {m.get('trained_tokens')}; "
        f"tokens/s: {m.get('tokens_per_s')}; total time: {m.get('total_time_s')} s; "
        f"peak memory: {m.get('peak_memory_mb')} MiB ({m.get('device')}, main process)",
        "",
        "![loss](loss.png)",
        "",
        *_method_lines(cfg, m),
        "## Config",
        "",
        "```json",
        json.dumps(cfg, indent=2, sort_keys=True),
        "```",
        "",
        "## Use it",
        "",
        "```python",
        "import finetune",
        f'model, tokenizer = finetune.load("{destination}:<N>")  # N: this version\'s number',
        "```",
        "",
        "Or without finetune: load the base model with transformers, then",
        "`peft.PeftModel.from_pretrained(base, <this folder>)`.",
        "",
    ])
