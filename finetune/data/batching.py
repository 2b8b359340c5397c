"""From tokenized examples to micro-batches: the order of an epoch, windows of gradient accumulation, collation.

A micro-batch is ``batch_size`` examples. With packing they are laid end to end in one row (no padding at all);
position ids restart at each example and ``cu_seq_lens`` marks the boundaries for the attention. Without
packing they are padded, on CPUs in groups of similar lengths (:func:`padding_groups`). Either way a step sees the
same examples, so a packed run and a padded run optimise the same objective.

The plan of an epoch depends only on the data, the seed and the epoch: every process computes the same plan,
takes its share of each window, and a resumed run finds its place by step number alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .formats import IGNORE_INDEX


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """A shuffled order of the examples, the same for every process and every resume."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_examples, generator=gen).tolist()


@dataclass(frozen=True)
class Window:
    """One optimizer step: the micro-batches of every process, and the label tokens they hold in total."""

    micro_batches: tuple[tuple[int, ...], ...]  # example indices, in global order
    label_tokens: int

    def for_rank(self, rank: int, world_size: int) -> list[tuple[int, ...]]:
        return list(self.micro_batches[rank::world_size])


def plan_epoch(
    label_counts: Sequence[int], lengths: Sequence[int], batch_size: int, grad_accum: int, world_size: int,
    seed: int, epoch: int, packed: bool = True,
) -> list[Window]:
    """Cut an epoch into optimizer steps of ``grad_accum x world_size`` micro-batches.

    ``lengths`` are the examples' tokens. The largest step trades places with the first, so memory reaches its
    peak at once: a batch that does not fit fails in the first step rather than hours in, and a CPU's heap grows
    there rather than at every later micro-batch larger than all before it (with one micro-batch per step, only
    there). Largest means the most tokens when ``packed`` (a row is as long as its examples together), and the
    longest example when not (a padded micro-batch is its count times its longest example). Either depends only
    on which examples a step holds, not on how they are split into micro-batches and processes, so
    ``grad_accum`` 4 of ``batch_size`` 2 still takes the same steps as ``batch_size`` 8. A last, shorter window
    is kept when every process still gets at least one micro-batch.
    """
    order = epoch_order(len(label_counts), seed, epoch)
    micro = [tuple(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]
    per_step = grad_accum * world_size
    windows = []
    for i in range(0, len(micro), per_step):
        chunk = tuple(micro[i : i + per_step])
        if len(chunk) < world_size:
            break
        windows.append(Window(chunk, sum(label_counts[j] for mb in chunk for j in mb)))

    def size(window: Window) -> int:
        examples = [lengths[j] for mb in window.micro_batches for j in mb]
        return sum(examples) if packed else max(examples)

    if windows:
        largest = max(range(len(windows)), key=lambda i: size(windows[i]))
        windows[0], windows[largest] = windows[largest], windows[0]
    return windows


def label_count(labels: Sequence[int]) -> int:
    """Tokens an example contributes to the loss: labelled positions after the first (nothing predicts it)."""
    return sum(1 for t in labels[1:] if t != IGNORE_INDEX)


# Packed rows are filled up to a multiple of this with a filler segment (pad tokens, no labels, attending only
# to itself). Row lengths then take a few dozen values instead of hundreds: oneDNN on CPUs caches kernels and
# buffers per matmul shape, and the allocator reuses blocks of repeating sizes, so memory stops creeping up
# step after step. The filler costs at most PACK_MULTIPLE - 1 tokens of compute per micro-batch.
PACK_MULTIPLE = 64


def collate_packed(examples: Sequence[dict], pad_token_id: int = 0, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Lay examples end to end in one row; boundaries in ``cu_seq_lens``, positions restarting per example.

    With ``multiple`` > 1 the row is filled up to a multiple of it (training uses ``PACK_MULTIPLE``)."""
    ids: list[int] = []
    labels: list[int] = []
    positions: list[int] = []
    bounds = [0]
    segments = [(ex["input_ids"], ex["labels"]) for ex in examples]
    filler = (-sum(len(i) for i, _ in segments)) % multiple
    if filler:
        segments.append(([pad_token_id] * filler, [IGNORE_INDEX] * filler))
    for seq_ids, seq_labels in segments:
        n = len(seq_ids)
        ids.extend(seq_ids)
        # The first token of an example is never a target: its predecessor belongs to another example.
        labels.append(IGNORE_INDEX)
        labels.extend(seq_labels[1:])
        positions.extend(range(n))
        bounds.append(bounds[-1] + n)
    return {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
        "cu_seq_lens": torch.tensor(bounds, dtype=torch.int32),
    }


def collate_padded(examples: Sequence[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad examples to the longest; padding is masked out of attention and never a label."""
    longest = max(len(ex["input_ids"]) for ex in examples)
    ids = torch.full((len(examples), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(examples), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), longest), dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"])
        labels[row, 1:n] = torch.tensor(ex["labels"][1:])
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


# What one more forward and backward pass costs on a CPU, in padded tokens, for :func:`padding_groups`.
# Measured on the benchmark's Llama under the AVX2 cap (BENCHMARKS.md, 2026-12-03).
PAD_GROUP_CALL_COST_CPU = 64


def padding_groups(lengths: Sequence[int], call_cost: int | None) -> list[list[int]]:
    """Split a padded micro-batch into groups of similar lengths, each to be padded to its own longest.

    Returns positions into ``lengths``, shortest examples first. The split minimises the padded tokens of all
    groups plus ``call_cost`` for each group (what one more forward and backward pass costs, counted in tokens);
    ``None`` keeps the micro-batch whole. A step's loss and gradients do not depend on the split (the loss is
    normalised by the step's label tokens, not per batch). On the benchmark's Alpaca steps of 8 random examples,
    padding whole made 1.86x the real tokens; split at a cost of 64, 1.08x in ~3 passes."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    if call_cost is None or len(order) < 2:
        return [order]
    # best[end]: the least cost of the first ``end`` sorted examples, and where its last group starts
    best: list[tuple[int, int]] = [(0, 0)]
    for end in range(1, len(order) + 1):
        longest = lengths[order[end - 1]]
        best.append(min((best[start][0] + (end - start) * longest + call_cost, start) for start in range(end)))
    groups, end = [], len(order)
    while end:
        start = best[end][1]
        groups.append(order[start:end])
        end = start
    return groups[::-1]


def collate_padded_groups(examples: Sequence[dict], pad_token_id: int, call_cost: int | None) -> list[dict]:
    """:func:`collate_padded` over each of :func:`padding_groups` of ``examples``."""
    groups = padding_groups([len(ex["input_ids"]) for ex in examples], call_cost)
    return [collate_padded([examples[i] for i in group], pad_token_id) for group in groups]


def real_tokens(examples: Sequence[dict]) -> int:
    """Tokens of the examples themselves: what throughput counts (never padding or filler)."""
    return sum(len(ex["input_ids"]) for ex in examples)


def pad_id(tokenizer) -> int:
    """The id to pad with. Padding is masked out of attention and labels, so it only needs to be a valid token."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0
