"""Preference training: Direct Preference Optimization (Rafailov et al., 2023) on the run's LoRA adapter.

The policy is the model being trained; the reference is where it started, without a second copy of the base:

* from a base model (a fresh adapter): the same model with the adapter switched off (peft's
  ``disable_adapter``), which is exactly the base;
* from an adapter version (``base_model: alice/bot:3``): training continues that version's adapter, as
  supervised runs do, so the reference is the base plus the adapter *as it was loaded*: a frozen copy of it is
  loaded beside the trained one under the name :data:`REFERENCE` (adapter-sized, the base is shared) and made
  the active adapter for the reference pass. Only the trained adapter is saved and published.

A pair's chosen and rejected sequences go through the model together: each batch holds whole pairs, its pairs'
chosen sequences first, then their rejected ones, laid out as supervised rows are (``train.packing``, the same
rule, and the log says which):

* packed, where the model keeps packed sequences apart: end to end in one row, positions restarting per
  sequence, ``cu_seq_lens`` marking the boundaries, filled to a multiple of ``PACK_MULTIPLE``
  (:func:`~finetune.data.batching.collate_packed`); no padding at all. A micro-batch is one row, or more where
  one would hold more tokens than a supervised row can (``batch_size x max_seq_len``). Sequence ``k`` is the
  ``k``-th segment, and a filler segment, when there is one, comes last;
* padded otherwise: sequence ``k`` is row ``k``; on a CPU a step's pairs go in batches of similar lengths, as
  supervised rows do.

The reference log-probabilities are computed on the same batch in the same step under ``no_grad``: a step costs
about two supervised forwards (the reference one without a backward pass) and one backward.

The loss per pair, with ``d = (log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))``
(log-probabilities summed over the answer's tokens): ``sigmoid``: ``-log sigmoid(beta d)``; ``hinge``:
``max(0, 1 - beta d)`` (TRL's definitions), plus ``dpo.sft_weight`` times the chosen answer's mean token NLL
(RPO's term, per answer). A step's loss is the mean over its pairs. The rewards are ``beta`` times each side's
log-ratio; the reward accuracy is the share of pairs whose chosen reward is higher. Packed and padded batches
give the same figures (up to float rounding): a sequence's log-probabilities depend on that sequence alone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..data.batching import PACK_MULTIPLE, collate_packed, collate_padded, padding_groups
from ..modeling.ops.loss import CausalLMLoss

REFERENCE = "reference"  # the frozen copy of a parent adapter, when the run continues one
STATS = ("pairs", "correct", "chosen", "rejected")  # sums kept per step: pairs, right answers, rewards


def attach_reference(model: Any, adapter_dir: str | None) -> str | None:
    """Load the parent adapter again, frozen, as the reference (see the module docstring); None when the run
    starts from a base model (the reference is the model with its adapter off)."""
    if adapter_dir is None:
        return None
    model.load_adapter(adapter_dir, adapter_name=REFERENCE, is_trainable=False)
    return REFERENCE


@contextmanager
def reference_of(model: Any, adapter: str | None) -> Iterator[None]:
    """Run ``model`` (a PeftModel) as the reference: its adapter off, or the frozen ``adapter`` active."""
    if adapter is None:
        with model.disable_adapter():
            yield
        return
    trained = model.active_adapter
    # inference_mode keeps the reference frozen; switching back makes only the trained adapter trainable again
    model.set_adapter(adapter, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(trained)


def collate_pairs(examples: Sequence[dict], pad_token_id: int, call_cost: int | None = None,
                  packed: bool = False, row_tokens: int | None = None) -> list[dict[str, torch.Tensor]]:
    """The model inputs of a micro-batch of pairs, each batch holding its pairs' chosen sequences, then their
    rejected ones.

    ``packed``: packed rows (:func:`~finetune.data.batching.collate_packed`, filled to a multiple of
    ``PACK_MULTIPLE``) of whole pairs, in order; one row for them all unless it would pass ``row_tokens`` (None: no
    bound), where a new row starts (training bounds a row as a supervised one is, ``batch_size x max_seq_len``).
    Otherwise padded batches of whole pairs: one batch with ``call_cost`` None (GPUs), else the pairs in groups of
    similar lengths (:func:`padding_groups` on each pair's longer side; a pair's two sequences are padded alike,
    so each pass of a pair costs twice its tokens). Neither layout nor split changes a figure: a pair's loss and
    rewards depend on that pair alone, and the step's loss is normalised by its pairs."""
    if packed:
        return [collate_packed(_sequences(row), pad_token_id, PACK_MULTIPLE)
                for row in _rows_of_pairs(examples, row_tokens)]
    lengths = [max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) for ex in examples]
    groups = padding_groups(lengths, None if call_cost is None else max(1, call_cost // 2))
    # each group's pairs in the examples' order
    return [collate_padded(_sequences([examples[i] for i in sorted(group)]), pad_token_id) for group in groups]


def _sequences(pairs: Sequence[dict]) -> list[dict]:
    """The pairs' chosen sequences, then their rejected ones, as examples (``input_ids``, ``labels``)."""
    return [{"input_ids": ex[f"{side}_ids"], "labels": ex[f"{side}_labels"]}
            for side in ("chosen", "rejected") for ex in pairs]


def _rows_of_pairs(examples: Sequence[dict], row_tokens: int | None) -> list[list[dict]]:
    """Whole pairs in order, a new row where the next pair would take a row past ``row_tokens``."""
    rows: list[list[dict]] = [[]]
    used = 0
    for ex in examples:
        tokens = len(ex["chosen_ids"]) + len(ex["rejected_ids"])
        if rows[-1] and row_tokens is not None and used + tokens > row_tokens:
            rows.append([])
            used = 0
        rows[-1].append(ex)
        used += tokens
    return rows


def dpo_losses(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
               beta: float, loss: str) -> torch.Tensor:
    """The DPO loss of each pair from its summed log-probabilities (policy and reference)."""
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    raise ValueError(f"unknown dpo loss {loss!r}")


class DpoLoss(nn.Module):
    """Wraps the PEFT model so that ``forward(batch)`` returns ``(summed pair loss, pairs)``, as
    :class:`~finetune.modeling.ops.loss.CausalLMLoss` returns ``(summed token loss, tokens)``: the training loop,
    its evaluation and its normalisation (the step's pairs stand for its label tokens) work unchanged.

    Each call adds its pairs' rewards to running sums that :meth:`take_stats` reads and resets."""

    def __init__(self, model: nn.Module, beta: float, loss: str = "sigmoid", sft_weight: float = 0.0,
                 reference: str | None = None):
        super().__init__()
        self.lm = CausalLMLoss(model)
        self.model = model
        self.beta, self.loss, self.sft_weight, self.reference = beta, loss, sft_weight, reference
        self._sums = torch.zeros(len(STATS))  # on the device of the pairs once one is seen: no sync per batch

    def sequence_logps(self, input_ids: torch.Tensor, labels: torch.Tensor,
                       attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                       cu_seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sequence (a padded batch's rows, a packed row's segments): the summed log-probability of its
        labelled tokens, and how many there are."""
        logps, rows = self.lm.label_logps(input_ids, labels, position_ids=position_ids,
                                          attention_mask=attention_mask, cu_seq_lens=cu_seq_lens)
        if cu_seq_lens is None:
            sequences = input_ids.shape[0]
            seq = torch.div(rows, input_ids.shape[1], rounding_mode="floor")
        else:  # a position belongs to the segment it lies in (a segment's first token is never a target)
            sequences = cu_seq_lens.numel() - 1
            seq = torch.bucketize(rows, cu_seq_lens[1:].to(rows.device, rows.dtype), right=True)
        sums = torch.zeros(sequences, dtype=logps.dtype, device=logps.device).index_add(0, seq, logps)
        counts = torch.zeros(sequences, dtype=torch.long, device=logps.device).index_add(
            0, seq, torch.ones_like(seq))
        return sums, counts

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None,
                cu_seq_lens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # 2 x pairs sequences, and in a packed row possibly one filler segment after them
        pairs = (input_ids.shape[0] if cu_seq_lens is None else cu_seq_lens.numel() - 1) // 2
        batch = dict(input_ids=input_ids, labels=labels, attention_mask=attention_mask, position_ids=position_ids,
                     cu_seq_lens=cu_seq_lens)
        with torch.no_grad(), reference_of(self.model, self.reference):
            ref, _ = self.sequence_logps(**batch)
        logps, counts = self.sequence_logps(**batch)
        chosen, rejected = logps[:pairs], logps[pairs:2 * pairs]
        ref_chosen, ref_rejected = ref[:pairs], ref[pairs:2 * pairs]
        losses = dpo_losses(chosen, rejected, ref_chosen, ref_rejected, self.beta, self.loss)
        if self.sft_weight:
            losses = losses + self.sft_weight * (-chosen / counts[:pairs].clamp(min=1))
        with torch.no_grad():
            reward_chosen = self.beta * (chosen - ref_chosen)
            reward_rejected = self.beta * (rejected - ref_rejected)
            step = torch.stack([torch.tensor(float(pairs), device=chosen.device),
                                (reward_chosen > reward_rejected).sum().float(), reward_chosen.sum(),
                                reward_rejected.sum()])
            self._sums = self._sums.to(step.device) + step
        return losses.sum(), torch.tensor(pairs, device=input_ids.device)

    def take_stats(self, accelerator: Any) -> dict[str, float]:
        """The rewards since the last call, over every process: ``reward_accuracy``, ``reward_chosen``,
        ``reward_rejected`` (means over pairs) and ``reward_margin``; empty when no pair was seen."""
        sums = self._sums.to(accelerator.device, torch.float32)
        if accelerator.num_processes > 1:
            sums = accelerator.reduce(sums, "sum")
        self._sums = torch.zeros_like(self._sums)
        pairs, correct, chosen, rejected = (float(v) for v in sums)
        if not pairs:
            return {}
        return {"reward_accuracy": round(correct / pairs, 6), "reward_chosen": round(chosen / pairs, 6),
                "reward_rejected": round(rejected / pairs, 6), "reward_margin": round((chosen - rejected) / pairs, 6)}
