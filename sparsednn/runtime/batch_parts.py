"""Running a batch in parts, one part per thread.

With several threads, each heavy step (a sparse Linear, attention, a layer norm) splits its
own work over the threads, and the threads meet at the end of every step: ~100 meetings per
BERT run, each waiting for the slower thread, and a 2-thread kernel call costs a few
microseconds more than its halves (see codegen/README.md). At batch >= the thread count, the
transformer body of the model instead runs as independent parts of the batch, each part on
one thread with one-thread kernels, from the first step of the body to the model's outputs
(the same bits as whole steps). Parts need enough tokens each to pay (MIN_PART_ROWS).

The body (the region) is the steps of the ops below whose outputs only such steps read (or
that are the model's outputs). Each of these ops computes row b of its output (axis 0, the
batch) from row b of its batch-shaped inputs alone, with inputs that broadcast along axis 0
used whole; region_parts checks that on the arrays of each run, and the region runs whole
with every thread when it does not hold (a mask whose first axis is neither 1 nor the batch,
ranks that do not line up). Steps before the region (embeddings, the attention mask's index
arithmetic, which reads the batch size as a number) run on the whole batch, as before.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import numpy as np

SLICE, WHOLE = "slice", "whole"

# Rows (tokens) a part needs for parts to pay: BERT-base 90% on 2 threads measured parts
# against whole steps at 0.87x with 16 tokens a part, 0.98x with 128, 1.00x with 256, and
# 1.01-1.04x with 1024 (up to 1.1x while the machine ran 2-thread steps slowly). More parts
# than threads, each thread running its parts one after another (batch 16: 4, 8 or 16 parts
# on 2 threads, stop 16, alternating processes), measured 1.00x, 0.98-1.03x (median 1.01x)
# and 0.97-1.00x: halving a thread's working set did not warm the steps' inputs.
MIN_PART_ROWS = 512

# Ops whose output row b (axis 0) depends only on row b of their batch-shaped inputs
# (lowering.py's steps for them, including the chained and fused Linear steps), and
# elementwise ops (numpy broadcasting).
UNARY_OPS = frozenset({"Relu", "Gelu", "Erf", "Tanh", "Sigmoid", "Sqrt", "Exp", "Neg", "Abs",
                       "Cast", "Identity"})  # fmt: skip
BINARY_OPS = frozenset({"Add", "Sub", "Mul", "Div"})
ROW_OPS = frozenset({"Linear", "LayerNorm", "AddLayerNorm", "Attention"}) | UNARY_OPS | BINARY_OPS


@dataclass
class Region:
    start: int  # steps[start:] form the region; steps before it run on the whole batch
    external: list[int]  # slots the region reads but does not make (inputs, earlier steps)
    made: set[int]  # slots the region's steps make
    ranks: dict[int, int | None]  # static rank of each slot the region makes (None: unknown)


def order_for_region(steps: list) -> tuple[list, int]:
    """The steps reordered so that the region (see the module docstring) comes last, and the
    index where it starts (len(steps): no region). A step joins when its op is a row op and
    every step that reads its outputs has joined (a model output without readers joins)."""
    readers: dict[int, list[int]] = {}
    for i, step in enumerate(steps):
        for s in step.inputs:
            if s is not None:
                readers.setdefault(s, []).append(i)
    inside = [False] * len(steps)
    for i in range(len(steps) - 1, -1, -1):  # readers come after their producers
        step = steps[i]
        inside[i] = step.node.op in ROW_OPS and all(
            inside[r] for s in step.outputs for r in readers.get(s, [])
        )
    before = [s for s, i in zip(steps, inside) if not i]
    region = [s for s, i in zip(steps, inside) if i]
    return before + region, len(before)


def describe_region(steps: list, start: int, ranks: dict[int, int | None]) -> Region:
    made = {s for step in steps[start:] for s in step.outputs}
    external = []
    for step in steps[start:]:
        for s in step.inputs:
            if s is not None and s not in made and s not in external:
                external.append(s)
    return Region(start, external, made, {s: ranks.get(s) for s in made})


def _operand(slot: int, env: list[Any], region: Region, batch: int):
    """(rank, size of axis 0) of an input: from its array when made before the region, from
    the plan when made inside it (whose axis 0 is the batch part, by induction)."""
    if slot in region.made:
        return region.ranks[slot], batch
    a = env[slot]
    if not isinstance(a, np.ndarray):
        return None, None
    return a.ndim, (a.shape[0] if a.ndim else None)


def _modes(step, env: list[Any], region: Region, batch: int) -> list[str | None] | None:
    """How each input of a region step follows a split of axis 0 (SLICE, WHOLE, None for
    an absent input), or None when the step's row independence cannot be shown."""
    op, slots = step.node.op, step.inputs
    info = [None if s is None else _operand(s, env, region, batch) for s in slots]
    if any(i is not None and i[0] is None for i in info):
        return None

    def batch_rows(i, min_rank):  # an input whose axis 0 must be the batch
        rank, lead = info[i]
        return SLICE if rank >= min_rank and lead == batch else None

    def broadcast(i, frame_rank):  # an operand broadcast to a frame whose axis 0 is the batch
        rank, lead = info[i]
        if rank == frame_rank and lead == batch:
            return SLICE
        if slots[i] not in region.made and (rank < frame_rank or (rank == frame_rank and lead == 1)):
            return WHOLE
        return None

    if op in ("Linear", "LayerNorm") and len(slots) == 1:
        modes = [batch_rows(0, 2)]  # rows over all leading axes
    elif op == "Linear" and len(slots) == 2:
        # fused with a residual layer norm (session._fuse_layer_norms): x, then the residual
        # broadcast against the Linear's output (x's rank)
        modes = [batch_rows(0, 2), broadcast(1, info[0][0])]
    elif op in UNARY_OPS and len(slots) == 1:
        modes = [batch_rows(0, 1)]
    elif (op == "AddLayerNorm" or op in BINARY_OPS) and len(slots) == 2:
        frame = max(info[0][0], info[1][0])
        modes = [broadcast(0, frame), broadcast(1, frame)]
        if SLICE not in modes:
            return None
    elif op == "Attention" and slots and slots[0] is not None:
        # q, k, v [B, S, ...] (k and v absent when q holds all three); the mask broadcasts
        # to [B, H, Sq, Skv]
        modes = [None if s is None else batch_rows(i, 3) if i < 3 else broadcast(i, 4)
                 for i, s in enumerate(slots)]  # fmt: skip
        if len(slots) > 4:
            return None
    else:
        return None
    if any(m is None for m, s in zip(modes, slots) if s is not None):
        return None
    return modes


def region_parts(steps: list, region: Region, env: list[Any],
                 num_threads: int) -> tuple[list[tuple[int, int]], dict[int, str]] | None:  # fmt: skip
    """The parts of axis 0 to run the region in (one per thread) and how each external slot
    follows them (SLICE or WHOLE), or None to run it whole: one thread, a batch smaller than
    the thread count or that does not split evenly enough, or a step whose inputs do not
    show row independence."""
    if num_threads < 2 or region.start >= len(steps):
        return None
    first = steps[region.start]
    lead = env[first.inputs[0]] if first.inputs and first.inputs[0] is not None else None
    if not isinstance(lead, np.ndarray) or lead.ndim < 2:
        return None
    batch = lead.shape[0]
    # every part gets a thread; parts of unequal size make the others wait for the largest
    if batch < num_threads or -(-batch // num_threads) * num_threads > 1.1 * batch:
        return None
    if lead.size // max(lead.shape[-1], 1) < MIN_PART_ROWS * num_threads:
        return None
    how: dict[int, str] = {}
    for step in steps[region.start:]:
        modes = _modes(step, env, region, batch)
        if modes is None:
            return None
        for s, m in zip(step.inputs, modes):
            if s is None or s in region.made:
                continue
            if how.setdefault(s, m) != m:
                return None
    bounds = [round(batch * i / num_threads) for i in range(num_threads + 1)]
    return list(itertools.pairwise(bounds)), how
