"""Linear layers Y = act(X @ W + b): sparse (CSR SpMM generated with LLVM) and dense (BLAS).

Sparse kernel design (see docs in the class and emitter below):

* Wᵀ is stored in CSR over the N output features (row o = output o), split into K-blocks so
  that the packed activations of one block stay in cache, its rows in groups of R = 2 whose
  entries interleave, 4 entries a 20-byte quad: their k as uint8, then their float32
  weights (see _CsrBlocks).
  The CSR arrays are data passed by pointer, not code: compile time does not depend on the
  number of nonzeros.
* X is processed in panels of TN = 4 x V tokens (V = floats per vector; TN = 64 on AVX-512).
  A panel of one K-block is packed transposed into scratch, panel[k, 0:TN] = X[t0:t0+TN, k],
  with V x V in-register transposes; rows past M come from a zero page, never from past X.
* For each group of R output rows: R x TN/V vector accumulators, acc_r += broadcast(w) *
  panel[k, :] for each nonzero (k, w) of member r, the R rows in one loop (R chains per
  vector hide the FMA latency); partial sums of earlier K-blocks live in scratch.
* After the last K-block, V output rows form a tile written to Y[t, o:o+V] transposed (V x V
  shuffles), bias + activation applied after the transpose, one vector store per token; when
  Y's row stride would make those stores thrash L1 sets, tiles are staged and copied out. The
  last tail panel (M not a multiple of TN) uses a narrower panel (1, 2 or 4 vectors), and only
  valid tokens/rows are stored.
* Packing and the tile stores are helpers shared by all kernels of a target (compiled once per
  process); compiled kernels are cached per specialisation (tiling, ISA, epilogue, staged
  stores, one K-block or several), not per shape: a kernel reads its layer's shape from the
  header of its index argument, so layers of new shapes compile nothing.
"""

from __future__ import annotations

import ctypes
import itertools
import math
import threading
import time
from dataclasses import dataclass

import numpy as np
from llvmlite import ir

from sparsednn.codegen import cache as kcache
from sparsednn.codegen import gemm, jit, pyentry
from sparsednn.codegen import irutil as U
from sparsednn.codegen.epilogue import Epilogue
from sparsednn.codegen.jit import llvm
from sparsednn.codegen.target import Target, host_target, last_level_cache_bytes
from sparsednn.errors import CompileError, InvalidInputError
from sparsednn.ir.storage import nonzero_count, zero_fraction
from sparsednn.passes.choose_kernels import DEFAULT_SPARSE_THRESHOLD
from sparsednn.runtime.threads import (
    native_pool_active,
    parallel_for,
    parallel_native,
    single_threaded_blas,
    thread_scratch,
)

__all__ = [
    "DenseLinearKernel",
    "SparseLinearKernel",
    "SpmmTuning",
    "compile_dense_linear",
    "compile_linear",
    "compile_sparse_linear",
]

ACTIVATIONS = U.ACTIVATIONS


# --------------------------------------------------------------------------------------------
# Tuning and the CSR layout
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpmmTuning:
    """Tile sizes of the sparse kernel.

    vectors_per_panel: TN / V, the tokens of one panel in vectors (1..8).
    group_rows: R, rows of Wᵀ run through one inner loop with interleaved entries (R
    independent accumulator chains per vector hide the FMA latency): 1, 2 or 4 (at most 2
    with one K-block whose rows are sorted within tiles: 4 padded more than they saved; one
    sorted within spans, see _row_spans, takes 4: magnitude-pruned 98-99%, one thread,
    alternating processes, 768x768 98% -4% at 128 and 2048 tokens, 768x3072 -3 to -5%, 99%
    -3 to -7.5%, though groups of four pad 8-18% there against ~6% for pairs).
    sort_span: S, rows sorted by count together before grouping, in all but the last of
    several K-blocks (_CsrBlocks); a multiple of V.
    k_block_bytes: the most bytes one packed K-block of a full panel may take; K is split in
    near-equal blocks (multiples of V, at most 256 columns) below that. None: chosen by the
    weight's density (block_bytes_for). 40 KB (160 k of 64 tokens on AVX-512, leaving some of
    the 48 KB L1 to the entries and partial sums) measured best on BERT shapes at 90%
    sparsity: ~100-125 useful GFLOP/s (2-3% over 48 KB, ~5% over 32 KB) against ~78 with
    whole-K panels in L2 (256 KB), despite the partial sums it costs.
    """

    vectors_per_panel: int = 4
    k_block_bytes: int | None = None
    group_rows: int = 4
    sort_span: int = 128
    use_shared: bool = True  # the shared-rows variant for weights pruned in 1 x R blocks

    # Sparser weights have fewer nonzeros per row and block, so the fixed costs of a group
    # and K-block (partial sums, loop exit) weigh more: deeper blocks, spilling from L1. With
    # groups of four rows (stop 15; M = 512, one thread, BERT-base shapes, against 48 KB):
    # 64 KB measured 3.6-4.5% faster at 98%, 1.5-1.7% at 97%, and 0.4-3.7% slower at 94-95%,
    # 4% slower at 92%; 40 KB 0.5% either way at 92%, 3-4% slower at 97%; at 90%, 48 KB
    # 0.7-2.4% slower than 40.
    SPARSE_DENSITY = 0.08  # and below: 48 KB
    SPARSER_DENSITY = 0.035  # and below: 64 KB

    # At SPARSEST_DENSITY and below on AVX-512 (k_block_bytes None): panels of 2 vectors (32
    # tokens) in 48 KB K-blocks of 384 k, whose k need 16 bits (_WIDE_QUAD). Per token, half
    # the partial sums' trips between blocks and fewer blocks, for 11% more loads per FMA
    # (2 vectors per entry instead of 4), where the fixed costs are much of the time. One
    # thread, M = 128 and 2048, BERT-base's shapes, against 64-token panels (same process,
    # alternating): 98% -4 to -17%, 96% -4 to -9%, 95% -1.5 to -7%, 94% +0.1 to -7%, 92% -3.5
    # to +3%; 98% with 32 KB blocks of 256 k (8-bit k): -8 to +7%. BERT-base at 94% end to end
    # ran the same either way (batch 1 and 16, 2 threads), so 94% (its quads 4 bytes smaller)
    # keeps 64-token panels. None: 64-token panels at every density.
    SPARSEST_DENSITY = 0.055
    sparsest_vectors_per_panel: int | None = 2
    sparsest_k_block_bytes: int = 48 * 1024
    # ... and deeper blocks as the weight thins, so that a row keeps about this many nonzeros
    # per block (the fixed costs of a group and K-block stay a share of its work): 98% 512 k
    # (64 KB; K = 3072 in 6 blocks), 98.5% 624, 99% 1024. One thread, same process,
    # alternating, 48 KB / 64 / 96 / 128 KB blocks: 98% at 2048 tokens 3072x768 2816-2917 /
    # 2727-2785 / 2783 / 2776 us,
    # 4096x1024 4599 / 4505 / 4541, 1024x4096 3840 / 3766; 99% 3072x768 2216 / 2125 / 2031
    # / 1969-2077; 98.5% - / 2534 / 2446 / 2464; 128 tokens the same or 1-4% faster. At 97%
    # 64 KB measured -1.7 to +0.1%, at 95% +2% and 96 KB +9%: those keep 48 KB. A K of up to
    # 1.5 blocks is one block: 98% K = 768 in one 768-k block instead of two of 384, -2.4 to
    # -3.6% (768x768, 768x3072, 128 and 2048 tokens), where K = 1024 in one block measured
    # +1% and 3072 in 768-k blocks +2% (below the floor's density, blocks stay as they were).
    sparsest_row_nonzeros: float | None = 11.0

    def block_bytes_for(self, density: float) -> int:
        if self.k_block_bytes is not None:
            return self.k_block_bytes
        if density <= self.SPARSER_DENSITY:
            return 64 * 1024
        return (48 if density <= self.SPARSE_DENSITY else 40) * 1024

    def panel_plan(self, density: float, isa: str, k: int = 0) -> tuple[int, int, int]:
        """(vectors per panel, K-block bytes, the most columns a K-block may take) for a
        weight of this density and k inputs."""
        if (self.k_block_bytes is None and self.sparsest_vectors_per_panel and isa == "avx512"
                and density <= self.SPARSEST_DENSITY):  # fmt: skip
            nv = self.sparsest_vectors_per_panel
            block_bytes = self.sparsest_k_block_bytes
            if self.sparsest_row_nonzeros:
                k_bytes = nv * 64  # a k of the panel: nv vectors of 16 floats
                deep = self.sparsest_row_nonzeros / max(density, 1e-9) * k_bytes
                block_bytes = max(block_bytes, min(int(deep), k_bytes * _MAX_WIDE_K_BLOCK))
                whole_k = _round_up(k, 16) * k_bytes
                may_join = deep > self.sparsest_k_block_bytes and k <= _MAX_WIDE_K_BLOCK
                if may_join and block_bytes < whole_k <= 1.5 * block_bytes:
                    block_bytes = whole_k  # one block, no partial sums (see the note)
            return nv, block_bytes, _MAX_WIDE_K_BLOCK
        return self.vectors_per_panel, self.block_bytes_for(density), _MAX_K_BLOCK


DEFAULT_TUNING = SpmmTuning()


@dataclass
class _CsrBlocks:
    """Wᵀ's nonzeros per K-block, in groups of R rows whose entries are interleaved.

    The kernel runs the R rows of a group through one loop (R independent accumulator
    chains, one loop exit per group instead of one or two per row). Within each unit of S
    rows (sort_span; the last K-block: each tile of V rows, finished as soon as its groups are
    done) the rows of a K-block are sorted by their nonzero count before grouping, so that a
    group's rows are about equally long; the shorter ones are padded with zero entries
    (k 0, weight 0.0), and every group to a whole number of quads. Entry j * R + r of a group
    is the j-th nonzero of its member r. Padding at 90% (random), R = 2 within tiles of 16:
    6.2% of the entries; R = 4 and S = 128: 2.8% with K = 768, 1.7% with K = 3072.

    entries: quads of 4 entries (_QUAD, 20 bytes): their 4 k (relative to the block start,
    uint8), then their 4 weights (float32). One 32-bit load gives the inner loop 4 panel
    rows, and each weight is one broadcast load: 5.25 loads per nonzero with the 4 panel
    vectors, against 6 with one (offset, weight) pair per nonzero (~15% faster inner loop).
    K-blocks of more than 256 columns (wide) take 24-byte quads with 16-bit k (_WIDE_QUAD).

    index (int32), per K-block b at b * block_stride: group_ptr[G + 1] (quads of group g are
    group_ptr[g] .. group_ptr[g + 1]), then slots[G * R] (the row of each member within its
    unit, 0..S-1 or 0..V-1). Groups cover ceil(N / S) whole units; rows past N are empty
    members.
    """

    k_block: int  # KB, columns per K-block (last block may be shorter)
    n_blocks: int
    index: np.ndarray  # int32 [n_blocks * block_stride]
    entries: np.ndarray  # uint8: the quads (_QUAD or _WIDE_QUAD), then one zero quad
    row_nnz: np.ndarray  # int64 [N] nonzeros of each output row (all blocks)
    row_bytes: int  # bytes between consecutive k of a packed panel
    group_rows: int  # R
    tile_rows: int  # V
    shared: bool = False  # the R rows of every group have the same nonzero columns (below)
    sort_span: int = 0  # S (0: V), a multiple of V; the last K-block sorts within V rows
    last_span: int = 0  # ... or within S rows (see _row_spans); 0: V

    @property
    def sort_unit(self) -> int:
        return self.sort_span or self.tile_rows

    @property
    def last_unit(self) -> int:
        """Rows sorted together in the last K-block, whose tiles are finished after them."""
        return self.last_span or self.tile_rows

    def block_unit(self, b: int) -> int:
        """Rows sorted together in K-block b (see _build_csr)."""
        return self.last_unit if b == self.n_blocks - 1 else self.sort_unit

    @property
    def wide(self) -> bool:
        """16-bit k (_WIDE_QUAD): K-blocks of more than 256 columns."""
        return not self.shared and self.k_block > _MAX_K_BLOCK

    @property
    def quad(self) -> np.dtype:
        return _quad_type(self.group_rows, self.shared, self.wide)

    @property
    def n_groups(self) -> int:
        return _round_up(max(len(self.row_nnz), 1), self.sort_unit) // self.group_rows

    @property
    def block_stride(self) -> int:
        return _csr_block_stride(len(self.row_nnz), self.sort_unit, self.group_rows)

    def triplets(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(o, k, w) of every nonzero of Wᵀ, sorted by (o, k)."""
        G, R = self.n_groups, self.group_rows
        idx = self.index.reshape(self.n_blocks, self.block_stride)
        os_, ks, ws = [], [], []
        for b in range(self.n_blocks):
            V = self.block_unit(b)
            ptr, slots = idx[b, : G + 1].astype(np.int64), idx[b, G + 1 :].reshape(G, R)
            if self.shared:
                o, kk, w = self._shared_block_triplets(ptr, slots)
                os_.append(o)
                ks.append(b * self.k_block + kk)
                ws.append(w)
                continue
            quads = self.entries.view(self.quad)[ptr[0] : ptr[-1]]
            lengths = np.diff(ptr) * 4
            pos = np.arange(4 * ptr[0], 4 * ptr[-1])
            group = np.repeat(np.arange(G), lengths)
            member = (pos - 4 * ptr[group]) % R
            kk = quads["k"].reshape(-1).astype(np.int64)
            w = quads["w"].reshape(-1).view(np.float32)
            real = w != 0  # padding: weight 0.0 (stored nonzeros are never +-0)
            o = (group // (V // R)) * V + slots[group, member]
            os_.append(o[real])
            ks.append(b * self.k_block + kk[real])
            ws.append(w[real])
        o, k, w = (np.concatenate(a) for a in (os_, ks, ws))
        # each row's entries come in k order within a block, and blocks in k order
        order = _stable_order(o)
        return o[order], k[order], w[order]

    def _shared_block_triplets(self, ptr, slots):
        G, R, V = self.n_groups, self.group_rows, self.tile_rows
        quads = self.entries.view(self.quad)[ptr[0] : ptr[-1]]
        group = np.repeat(np.arange(G), np.diff(ptr))  # of each quad
        kk = np.repeat(quads["k"].astype(np.int64)[:, :, None], R, axis=2)  # [q, step, r]
        w = quads["w"].view(np.float32)
        o = np.broadcast_to(((group // (V // R)) * V)[:, None, None] + slots[group][:, None, :],
                            w.shape)  # fmt: skip
        real = w != 0  # padding: weight 0.0 (stored nonzeros are never +-0)
        return o[real], kk[real], w[real]


# 4 entries of a group: their k within the K-block, then their weights (float32 bits)
# (5 bytes per nonzero: a model's weights stream from DRAM at batch 1 once they exceed the L3)
_QUAD = np.dtype([("k", "u1", (4,)), ("w", "<u4", (4,))])
assert _QUAD.itemsize == 20
_MAX_K_BLOCK = 1 << 8  # k within a block is a uint8
# ... and in K-blocks of more than 256 columns (see SpmmTuning.panel_plan), a uint16
_WIDE_QUAD = np.dtype([("k", "<u2", (4,)), ("w", "<u4", (4,))])
assert _WIDE_QUAD.itemsize == 24
_MAX_WIDE_K_BLOCK = 1 << 10


def _quad_type(group_rows: int, shared: bool, wide: bool) -> np.dtype:
    """The dtype of one quad of entries (see _CsrBlocks)."""
    if shared:
        return _shared_quad(group_rows)
    return _WIDE_QUAD if wide else _QUAD


def _stable_order(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable") of non-negative integers, by radix sort when they fit
    in 16 bits (~10x faster than the int64 merge sort on a layer's nonzeros)."""
    if len(keys) and keys.max() < 1 << 16:
        keys = keys.astype(np.uint16)
    return np.argsort(keys, kind="stable")


def _shared_quad(group_rows: int) -> np.dtype:
    """4 steps of a shared group: their k, then each step's R weights (member order)."""
    return np.dtype([("k", "u1", (4,)), ("w", "<u4", (4, group_rows))])


def _shares_rows(weight: np.ndarray, rows: int) -> bool:
    """Whether every aligned group of `rows` outputs (columns of W, rows of Wᵀ) has one
    nonzero pattern: weights pruned in 1 x rows blocks (prune's block=(1, rows))."""
    k, n = weight.shape
    if rows < 2 or n % rows or k * n == 0:
        return False
    # (unstructured weights fail on their first rows: check those alone first, ~10x cheaper)
    for part in (weight[:16], weight):
        mask = (part != 0).reshape(len(part), n // rows, rows)
        if not (mask == mask[:, :, :1]).all():
            return False
    return bool((weight != 0).any())


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def _round_up_array(x: np.ndarray, m: int) -> np.ndarray:
    return (x + m - 1) // m * m


def _csr_block_stride(n: int, tile_rows: int, group_rows: int) -> int:
    groups = _round_up(max(n, 1), tile_rows) // group_rows
    return groups + 1 + groups * group_rows


def _k_blocking(k: int, v: int, tn: int, block_bytes: int,
                most: int = _MAX_K_BLOCK) -> tuple[int, int]:  # fmt: skip
    max_kb = min(max(v, block_bytes // (4 * tn) // v * v), most)
    n_blocks = max(1, -(-k // max_kb))
    kb = _round_up(-(-k // n_blocks), v)
    kb = min(kb, _round_up(k, v)) if k > 0 else v
    n_blocks = max(1, -(-k // kb)) if k > 0 else 1
    return kb, n_blocks


def _build_shared_csr(weight: np.ndarray, k_block: int, n_blocks: int, row_bytes: int,
                      tile_rows: int, group_rows: int) -> _CsrBlocks:  # fmt: skip
    """The blocked CSR of weight.T for weights whose aligned groups of R rows share their
    nonzero columns (_shares_rows): per group and K-block, one list of steps (k and the R
    weights), 4 steps a quad (_shared_quad), padded with k 0 and weights 0.0."""
    k, n = weight.shape
    V, R = tile_rows, group_rows
    n_pad = _round_up(max(n, 1), V)
    G = n_pad // R
    qty = _shared_quad(R)
    wt = np.zeros((n_pad, k), np.float32)
    wt[:n] = weight.T
    stride = _csr_block_stride(n, V, R)
    index = np.empty((n_blocks, stride), dtype=np.int64)
    slots = np.tile(np.arange(V).reshape(V // R, R), (n_pad // V, 1)).reshape(-1)
    parts, start = [], 0
    row_nnz = np.count_nonzero(wt[:n], axis=1).astype(np.int64)
    for b in range(n_blocks):
        block = wt[:, b * k_block : min(k, (b + 1) * k_block)].reshape(G, R, -1)
        g, kk = np.nonzero(block[:, 0] != 0)  # the shared pattern, sorted by (group, k)
        counts = np.bincount(g, minlength=G)
        ptr = np.zeros(G + 1, np.int64)
        np.cumsum((counts + 3) // 4, out=ptr[1:])
        rank = np.arange(len(g)) - (np.cumsum(counts) - counts)[g]
        quads = np.zeros(int(ptr[-1]), qty)
        q, step = ptr[g] + rank // 4, rank % 4
        quads["k"][q, step] = kk
        quads["w"][q, step] = block[g, :, kk].view(np.uint32)  # [nnz, R]
        parts.append(quads)
        index[b, : G + 1] = ptr + start
        index[b, G + 1 :] = slots
        start += len(quads)
    if start >= 2**31:
        raise CompileError(f"too many nonzeros for int32 CSR indices: {start} quads")
    entries = np.concatenate(parts + [np.zeros(1, qty)]).view(np.uint8)
    return _CsrBlocks(k_block, n_blocks, np.ascontiguousarray(index.reshape(-1).astype(np.int32)),
                      np.ascontiguousarray(entries), row_nnz, row_bytes, R, V, shared=True)  # fmt: skip


def _group_padding(counts: np.ndarray, unit: int, group_rows: int) -> int:
    """Zero entries that pad rows of these nonzero counts sorted within units of `unit` rows
    and grouped by group_rows into whole quads (as _build_csr does)."""
    c = np.zeros(_round_up(max(len(counts), 1), unit), np.int64)
    c[: len(counts)] = counts
    longest = -np.sort(-c.reshape(-1, unit), axis=1).reshape(-1, group_rows)[:, 0]
    return int(_round_up_array(longest * group_rows, 4).sum() - counts.sum())


# The last K-block's rows are sorted within tiles of V rows, each tile finished as soon as
# its groups are done; where rows differ much in length (magnitude-pruned weights: per-output
# and per-input scales) that pads the groups heavily, and sorting within S rows pads less
# than finishing their tiles later costs: chosen where it saves this share of the nonzeros
# in padding (a padding entry reads panel row 0, in L1: much cheaper than a real one).
# Magnitude-pruned (bench/kernels.py --weights magnitude), one thread, same process, tiles
# against spans: 95% 768x768 -14%, 768x3072 -13% (saving 26-28%); 98% 1024x1024 -7.5% (-12%
# at 128 tokens), 1024x4096 -8.6%, 3072x768 -3.9% (13-33%); 98% K = 768 in one block 0 to
# -5.5% (20-28%); but 90% 768x3072 +4.5% (saving 6.6%: tiles stay). Random masks save at
# most 5.1% (98%, K = 1024): tiles.
LAST_SPAN_MIN_SAVING = 0.10


# ... and rows that uneven sort better within wider spans in every K-block: where the last
# block's rows pad at least this share less within UNEVEN_SPAN rows than within S (random
# masks: ~1%, magnitude-pruned weights 4-16% on BERT shapes), S is UNEVEN_SPAN (two spans at
# least: threads given few tokens still split the rows). Magnitude-pruned, one thread, 2048
# tokens, same process: 90% 768x768 and 768x3072 -3.5%, 98% 3072x768 -8.4%.
UNEVEN_SPAN = 384
UNEVEN_SPAN_MIN_SAVING = 0.03


def _row_spans(weight: np.ndarray, k_block: int, n_blocks: int, tile_rows: int, span: int,
               group_rows: int, nonzeros: int) -> tuple[int, int]:  # fmt: skip
    """(S, last_span) of a layer's rows (see _CsrBlocks): S is span, or UNEVEN_SPAN for rows
    of very different lengths; last_span is S where sorting the last K-block within S rows
    instead of tiles saves LAST_SPAN_MIN_SAVING of the nonzeros in padding, else 0 (tiles).
    Spans only for layers of two spans of rows or more: for fewer, padding is little work,
    and another code variant a compile."""
    n = weight.shape[1]
    if span <= tile_rows or not nonzeros or n < 2 * span:
        return span, 0
    counts = np.count_nonzero(weight[(n_blocks - 1) * k_block :], axis=0)
    padding = _group_padding(counts, span, group_rows)
    if n >= 2 * UNEVEN_SPAN > 2 * span:
        uneven = _group_padding(counts, UNEVEN_SPAN, group_rows)
        if padding - uneven >= UNEVEN_SPAN_MIN_SAVING * max(int(counts.sum()), 1):
            span, padding = UNEVEN_SPAN, uneven
    saving = _group_padding(counts, tile_rows, group_rows) - padding
    return span, (span if saving >= LAST_SPAN_MIN_SAVING * nonzeros else 0)


def _build_csr(weight: np.ndarray, k_block: int, n_blocks: int, row_bytes: int,
               tile_rows: int, group_rows: int, sort_span: int = 0,
               last_span: int = 0) -> _CsrBlocks:  # fmt: skip
    """Grouped, blocked CSR of weight.T (see _CsrBlocks); row_bytes: bytes between
    consecutive k of a packed panel."""
    k, n = weight.shape
    R, S = group_rows, sort_span or tile_rows
    wide = k_block > _MAX_K_BLOCK
    qty = _quad_type(group_rows, False, wide)
    n_pad = _round_up(max(n, 1), S)
    G = n_pad // R
    wt = weight.T  # [N, K], a view: indexing it costs less than a transposed copy (~7 ms)
    stride = _csr_block_stride(n, S, R)
    index = np.empty((n_blocks, stride), dtype=np.int64)
    parts = []
    row_nnz = np.zeros(n, dtype=np.int64)
    start = 0
    for b in range(n_blocks):
        block = wt[:, b * k_block : min(k, (b + 1) * k_block)]
        mask = block != 0
        counts = np.zeros(n_pad, np.int64)
        counts[:n] = np.count_nonzero(mask, axis=1)
        row_nnz += counts[:n]
        # rows of each unit of V (last block) or S rows by count, longest first; consecutive
        # R of them form a group
        V = (last_span or tile_rows) if b == n_blocks - 1 else S
        order = np.argsort(-counts.reshape(-1, V), axis=1, kind="stable")  # [units, V]
        rows = (order + (np.arange(n_pad // V) * V)[:, None]).reshape(G, R)
        # the first member is the longest; whole quads
        lengths = _round_up_array(counts[rows[:, 0]] * R, 4)
        ptr = np.zeros(G + 1, np.int64)
        np.cumsum(lengths, out=ptr[1:])
        group_of = np.empty(n_pad, np.int64)
        member_of = np.empty(n_pad, np.int64)
        group_of[rows] = np.arange(G)[:, None]
        member_of[rows] = np.arange(R)[None, :]
        o, kk = np.nonzero(mask)  # sorted by (o, k)
        row_start = np.cumsum(counts) - counts
        rank = np.arange(len(o)) - row_start[o]
        pos = ptr[group_of[o]] + rank * R + member_of[o]
        ks = np.zeros(int(ptr[-1]), np.uint16 if wide else np.uint8)  # padding: k 0, weight 0.0
        ws = np.zeros(int(ptr[-1]), np.uint32)
        ks[pos] = kk
        ws[pos] = block[o, kk].astype(np.float32).view(np.uint32)
        quads = np.empty(len(ks) // 4, qty)
        quads["k"] = ks.reshape(-1, 4)
        quads["w"] = ws.reshape(-1, 4)
        parts.append(quads)
        index[b, : G + 1] = ptr // 4 + start
        index[b, G + 1 :] = order.reshape(-1)
        start += len(quads)
    if start >= 2**31:
        raise CompileError(f"too many nonzeros for int32 CSR indices: {start} quads")
    if k_block > _MAX_WIDE_K_BLOCK:
        raise CompileError(f"K-block too large for 16-bit k: {k_block} columns")
    # at least one quad, so that pointers are always to real memory
    entries = np.concatenate(parts + [np.zeros(1, qty)]).view(np.uint8)
    return _CsrBlocks(
        k_block=k_block,
        n_blocks=n_blocks,
        index=np.ascontiguousarray(index.reshape(-1).astype(np.int32)),
        entries=np.ascontiguousarray(entries),
        row_nnz=row_nnz,
        row_bytes=row_bytes,
        group_rows=R,
        tile_rows=tile_rows,
        sort_span=S,
        last_span=last_span,
    )


# --------------------------------------------------------------------------------------------
# IR generation
# --------------------------------------------------------------------------------------------

# Arguments of the generated kernel (C ABI):
#   void kernel(const float *x, int64 m, float *y, int64 row_begin, int64 row_end,
#               const int32 *index, const int64 *entries, const float *bias, float *scratch,
#               float *probe, int64 layout)
# computes y[0:m, row_begin:row_end]; index starts with the layer's shape (_SHAPE_FIELDS,
# _SHAPE_HEADER int32), then the CSR's index; scratch is 64-byte aligned, scratch_floats(rows) long;
# *probe = 0, or NaN if the part of X this call packed (or, with LAYOUT_PANEL_OUT, of Y it
# wrote) holds a NaN or an infinity. layout: 0 for row-major X [m, K] and Y [m, N], or flags:
# (panels: 4V-byte aligned; the tokens of a tail panel past m are don't-cares, finite going in)
LAYOUT_PANEL_IN = 1  # X comes packed as panels: [m / TN][K][TN] (what LAYOUT_PANEL_OUT writes)
LAYOUT_PANEL_OUT = 2  # Y goes out as panels [m / TN][N][TN], untransposed (all rows of the call)
# Y is written by streaming (non-temporal) stores: for outputs too large to stay in the cache
# until they are read, the stores then skip reading each line first. On AVX-512 (a token's V
# outputs one line) finished tiles go straight to a line-aligned Y (_emit_finish), elsewhere
# the staged rows that start on a line (_emit_staged_store); the kernel fences them at its end.
# Layers whose tiles are not staged stream only where their X comes from DRAM as well
# (LAYOUT_PREFETCH_X, see _emit_finish).
LAYOUT_STREAM_OUT = 4
# The call's first panel prefetches the weights' entries (LAYOUT_PREFETCH_ENTRIES): they may
# come from DRAM, and later panels find them in cache. Each group prefetches the entries this
# far past its own (_SpmmEmitter._emit_group); llvm.prefetch's arguments: read, keep in all
# levels, data. (A prefetch reads nothing: past the end of the entries it is a no-op, never a
# fault.)
LAYOUT_PREFETCH_ENTRIES = 8
ENTRY_PREFETCH_BYTES = 1536
_PREFETCH_READ = (ir.Constant(U.i32, 0), ir.Constant(U.i32, 3), ir.Constant(U.i32, 1))
# X of prefetch_x_bytes() or more comes from DRAM, and packing alone keeps too few misses in
# flight (it reads ~33 GB/s on one core here, against ~44 for a plain stream): with the
# sparsest weights' plan (the least work per byte of X), each group of rows then also
# prefetches X_PREFETCH_LINES lines of the next K-block's X (after the last block: the next
# panel's first), spread over the groups' work (_emit_x_prefetch), into L2 (prefetcht1:
# keep in all levels but L1). One thread, 2048 tokens, same process, alternating: 98%
# 3072x768 -4 to -4.5%, 4096x1024 -3 to -4.4%; 95% 3072x768 -4%; two threads -0.3 to -4%.
# With X in the L3 (768x768 at 2048 tokens, 6 MB) it cost 3-4%: off below the threshold.
# The 64-token panels (90%) gained 1-3% with X from DRAM, but their check per group cost
# ~1% everywhere else (768x3072 and 1024x4096 at 90%): not there.
LAYOUT_PREFETCH_X = 16
X_PREFETCH_LINES = 6
_PREFETCH_L2 = (ir.Constant(U.i32, 0), ir.Constant(U.i32, 2), ir.Constant(U.i32, 1))
_KERNEL_ARGS = (
    "x", "m", "y", "row_begin", "row_end", "index", "entries", "bias", "scratch", "probe",
    "layout",
)  # fmt: skip
_KERNEL_ARG_TYPES = (
    U.f32_ptr,
    U.i64,
    U.f32_ptr,
    U.i64,
    U.i64,
    U.i32_ptr,
    ir.PointerType(U.i64),
    U.f32_ptr,
    U.f32_ptr,
    U.f32_ptr,
    U.i64,
)
_KERNEL_KINDS = "i" * len(_KERNEL_ARGS)  # for native_pool.run_kernel
# Integer arguments go through ctypes as pointer-sized words where those are 64-bit (the same
# registers in the C ABI): ctypes converts a c_void_p in ~45 ns, a c_int64 in ~100 ns, and a
# one-token call has three of them.
_WORD = ctypes.c_void_p if ctypes.sizeof(ctypes.c_void_p) == 8 else ctypes.c_int64
_CTYPES_SIG = ctypes.CFUNCTYPE(
    None,
    ctypes.c_void_p, _WORD, ctypes.c_void_p, _WORD, _WORD,
    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, _WORD,
)  # fmt: skip


class _SpmmEmitter:
    """Emits the sparse linear kernel for one (tiling, ISA, epilogue, structure)
    specialisation; the layer's shape comes at run time from the header of its index.

    Functions of the module (all but the kernel internal):
      kernel            panels of TN tokens, then one narrower tail panel
      panel_{T}         T tokens (1, 2, 4 vectors): pack each K-block, accumulate each row;
                        after the last block, store each block of V rows
    and calls two helpers shared by all kernels of the target (compiled once, see _helper):
      pack_...          X[t0:t0+T, kblock] -> panel[k, 0:T], transposed, zero padded
      store_block_...   V rows x T tokens of sums -> + bias, activation, transpose -> Y
    """

    # staging buffer row stride (floats): 272 * 4 bytes is not a multiple of 1 KB
    STAGE_STRIDE = 272

    def __init__(self, module, name, target: Target, activation, has_bias, vectors_per_panel,
                 group_rows=2, shared=False, staged=False, one_block=False,
                 sort_span=None, wide=False, last_span=0):  # fmt: skip
        self.module = module
        self.name = name
        self.target = target
        self.V = target.vector_width
        self.NV = vectors_per_panel
        self.TN = self.NV * self.V
        self.activation = activation
        self.has_bias = has_bias
        self.vty = U.vec(self.V)
        self.valign = 4 * self.V
        self.R = group_rows
        # S, the rows whose groups run before their V-row tiles are finished (_CsrBlocks)
        self.S = sort_span or self.V
        # the last K-block's rows sorted within this many (V: each tile; see _row_spans)
        self.LU = last_span or self.V
        self.shared = shared
        self.helpers: list = []  # JIT modules of the helpers the kernel calls
        # structure fixed in the code (branches on them measured 1-2% slower at 90%): tiles
        # staged on their way out (_emit_staged_store); K in one block, the partial sums one tile
        self.staged = staged
        self.one_block = one_block
        self.wide = wide  # 16-bit k (_WIDE_QUAD)
        self.quad_type = _quad_type(group_rows, shared, wide)
        # A page of zeros standing in for the rows of X past M when packing a tail panel.
        zty = ir.ArrayType(U.f32, _MAX_WIDE_K_BLOCK if wide else _MAX_K_BLOCK)
        self.zeros = ir.GlobalVariable(module, zty, name="zero_rows")
        self.zeros.global_constant = True
        self.zeros.linkage = "internal"
        self.zeros.initializer = ir.Constant(zty, None)
        self.zeros.align = 64

    def _shape(self, b, index) -> dict:
        """The layer's shape from the header of its index (see _SHAPE_FIELDS), as i64."""
        return {f: b.sext(b.load(U.gep(b, index, i)), U.i64, name=f)
                for i, f in enumerate(_SHAPE_FIELDS)}  # fmt: skip

    def _function(self, name, names, types, internal=True, noinline=False):
        return _new_function(self.module, name, names, types, internal, noinline)

    def _helper_callee(self, kind):
        """A declaration of a shared helper; the JIT links it to the compiled helper."""
        jm, name, fnty = _helper(kind, self.target, self.activation, self.has_bias)
        if jm not in self.helpers:
            self.helpers.append(jm)
        fn = ir.Function(self.module, fnty, name=name)
        fn.attributes.add("nounwind")
        return fn

    # -- entry point ------------------------------------------------------------------------

    def emit(self) -> ir.Function:
        self.prefetch = U.intrinsic(self.module, "llvm.prefetch.p0", U.void,
                                    [ir.PointerType(ir.IntType(8)), U.i32, U.i32, U.i32])  # fmt: skip
        # packing and the epilogue + transposed stores are compiled once per process (see
        # _helper) and linked by name, so that each kernel compiles only its own loops
        self.pack = self._helper_callee("pack")
        self.store_block = self._helper_callee("store_block")
        self.store_panel = self._helper_callee("store_panel")
        if self.staged:
            self.copy_rows = self._helper_callee("copy_rows")
        # panel widths: powers of two up to NV, and NV; a tail panel takes the narrowest that
        # fits (fewer functions to compile than one per width)
        widths = sorted(
            {1 << i for i in range(self.NV.bit_length()) if 1 << i <= self.NV} | {self.NV}
        )
        panels = {nv: self._emit_panel(nv) for nv in widths}
        fn, b, a = self._function(self.name, _KERNEL_ARGS, _KERNEL_ARG_TYPES, internal=False)
        rest = [
            a["y"],
            a["row_begin"],
            a["row_end"],
            a["index"],
            a["entries"],
            a["bias"],
            a["scratch"],
            a["probe"],
            a["layout"],
        ]
        b.store(ir.Constant(U.f32, 0.0), a["probe"])
        tn = U.int64(self.TN)
        n_full = b.sdiv(a["m"], tn, name="full_panels")
        with U.for_range(b, 0, n_full, name="panel") as p:
            t0 = b.mul(p, tn, name="t0")
            b.call(panels[self.NV], [a["x"], t0, tn] + rest)
        t0 = b.mul(n_full, tn, name="tail_t0")
        tail = b.sub(a["m"], t0, name="tail_tokens")
        # vectors needed by the tail panel: ceil(tail / V) in 0..NV (0: M is a multiple of TN)
        nvec = b.sdiv(b.add(tail, U.int64(self.V - 1)), U.int64(self.V), name="tail_vectors")
        done = fn.append_basic_block("done")
        sw = b.switch(nvec, done)
        for nv in widths:
            bb = fn.append_basic_block(f"tail_panel_{nv * self.V}")
            for need in range(1, nv + 1):
                if min(w for w in widths if w >= need) == nv:
                    sw.add_case(U.int64(need), bb)
            b.position_at_end(bb)
            b.call(panels[nv], [a["x"], t0, tail] + rest)
            b.branch(done)
        b.position_at_end(done)
        stream = b.and_(a["layout"], U.int64(LAYOUT_STREAM_OUT))
        with b.if_then(b.icmp_unsigned("!=", stream, U.int64(0))):
            _emit_store_fence(b, self.module, self.target)  # before the caller signals done
        b.ret_void()
        return fn

    # -- one panel of tokens -------------------------------------------------------------------

    def _emit_panel(self, nv: int) -> ir.Function:
        """panel_{T}(x, t0, tn, y, ...): tokens t0 .. t0+tn (tn <= T = nv*V) x all rows of the range.

        One K-block: pack, then for each block of V rows accumulate each row into the tile and
        finish the tile. Several K-blocks: rows accumulate into a partial-sum buffer of all rows
        of the range; tiles are finished after the last block.

        layout (see LAYOUT_PANEL_IN / _OUT): X given as panels is used in place of the packed
        block; tiles going out as panels are stored untransposed (store_panel)."""
        TN, tnp = self.TN, nv * self.V
        names = ("x", "t0", "tn") + _KERNEL_ARGS[2:]
        types = (U.f32_ptr, U.i64, U.i64) + _KERNEL_ARG_TYPES[2:]
        fn, b, a = self._function(f"panel_{tnp}", names, types)
        shape = self._shape(b, a["index"])
        K, N, KB, n_blocks = shape["K"], shape["N"], shape["KB"], shape["n_blocks"]
        index_body = U.gep(b, a["index"], _SHAPE_HEADER, name="index_body")
        flags = a["layout"]
        panel_in = b.icmp_unsigned("!=", b.and_(flags, U.int64(LAYOUT_PANEL_IN)), U.int64(0),
                                   name="panel_in")  # fmt: skip
        panel_out = b.icmp_unsigned("!=", b.and_(flags, U.int64(LAYOUT_PANEL_OUT)), U.int64(0),
                                    name="panel_out")  # fmt: skip
        prefetch_entries = b.and_(
            b.icmp_unsigned("!=", b.and_(flags, U.int64(LAYOUT_PREFETCH_ENTRIES)), U.int64(0)),
            b.icmp_signed("==", a["t0"], U.int64(0)),
            name="prefetch_entries",
        )  # (the call's first panel)
        prefetch_x = b.and_(
            b.icmp_unsigned("!=", b.and_(flags, U.int64(LAYOUT_PREFETCH_X)), U.int64(0)),
            b.not_(panel_in),
            name="prefetch_x",
        )
        # this panel's [K][TN] of X and [N][TN] of Y in the panel layouts (t0 is a multiple of TN)
        panel_number = b.sdiv(a["t0"], U.int64(TN), name="panel_number")
        x_panel = U.gep(b, a["x"], b.mul(b.mul(panel_number, K), U.int64(TN)), name="x_panel")
        y_panel = U.gep(b, a["y"], b.mul(b.mul(panel_number, N), U.int64(TN)), name="y_panel")
        # scratch: [panel KB x TN, or K x TN in slabs][partial sums of the range's rows, or of
        # a slab's (one K-block: one tile)][staging TN x STAGE_STRIDE, for staged layers]
        # (SparseLinearKernel._scratch_floats)
        packed = a["scratch"]
        last_kb = b.sub(n_blocks, U.int64(1), name="last_kb")
        rows = b.sub(a["row_end"], a["row_begin"])
        last_unit = U.int64(self.LU)
        if self.one_block:
            partial = U.gep(b, packed, b.mul(KB, U.int64(self.TN)), name="partial")
            partial_rows = last_unit
            slabbed = ir.Constant(ir.IntType(1), 0)
            slab_step = b.select(b.icmp_signed(">", rows, U.int64(0)), rows, U.int64(1))
        else:
            # rows in slabs (PARTIAL_SLAB_BYTES): X's whole K packed once, then all K-blocks
            # of one slab of rows after the other
            slab = shape["slab_rows"]
            slabbed = b.and_(b.icmp_signed(">", slab, U.int64(0)),
                             b.icmp_signed(">", rows, slab), name="slabbed")  # fmt: skip
            S = U.int64(self.S)
            all_rows = b.mul(b.sdiv(b.add(rows, U.int64(self.S - 1)), S), S)
            partial_rows = b.select(slabbed, slab, all_rows, name="partial_rows")
            slab_step = b.select(slabbed, slab, b.select(b.icmp_signed(">", rows, U.int64(0)),
                                                         rows, U.int64(1)))  # fmt: skip
            packed_k = b.select(slabbed, K, KB)
            partial = U.gep(b, packed, b.mul(packed_k, U.int64(self.TN)), name="partial")
            # block by block (the zero page standing in for tokens past tn holds a block)
            packing = b.and_(slabbed, b.not_(panel_in))
            with b.if_then(packing), U.for_range(b, 0, K, KB, name="k0") as k0:
                kc = b.select(b.icmp_signed("<", b.sub(K, k0), KB), b.sub(K, k0), KB)
                at = U.gep(b, packed, b.mul(k0, U.int64(TN)))
                self._emit_pack_block(b, a, K, k0, kc, at, tnp)
        self.staging = U.gep(b, partial, b.mul(partial_rows, U.int64(self.TN)), name="staging")

        # the slabs of rows (one, unless slabbed), in each one loop over the K-blocks: the
        # last block is shorter and finishes the tiles
        with U.for_range(b, a["row_begin"], a["row_end"], slab_step, name="slab") as slab_begin:
            slab_end = b.add(slab_begin, slab_step)
            slab_end = b.select(b.icmp_signed("<", slab_end, a["row_end"]), slab_end, a["row_end"],
                                name="slab_end")  # fmt: skip
            with U.for_range(b, 0, n_blocks, name="kb") as kb:
                last = b.icmp_signed("==", kb, last_kb, name="last_kblock")
                first = b.icmp_signed("==", kb, U.int64(0), name="first_kblock")
                kc = b.select(last, b.sub(K, b.mul(last_kb, KB)), KB, name="kc")
                k0 = b.mul(kb, KB, name="k0")
                panel = b.select(
                    panel_in,
                    U.gep(b, x_panel, b.mul(k0, U.int64(TN))),
                    b.select(slabbed, U.gep(b, packed, b.mul(k0, U.int64(TN))), packed),
                    name="panel",
                )
                with b.if_then(b.not_(b.or_(panel_in, slabbed))):
                    self._emit_pack_block(b, a, K, k0, kc, packed, tnp)
                # this K-block's group pointers, then its member slots (see _CsrBlocks)
                index = U.gep(b, index_body, b.mul(kb, shape["block_stride"]), name="block_index")
                slots = U.gep(b, index, b.add(shape["n_groups"], U.int64(1)), name="block_slots")

                # rows sorted in units of S (the last K-block: of last_unit rows, V or S, whose
                # tiles are finished as soon as their groups are done), see _CsrBlocks; one
                # copy of the loop for both units
                if self.one_block:
                    unit = last_unit
                else:
                    unit = b.select(last, last_unit, U.int64(self.S), name="unit")
                count = b.sdiv(unit, U.int64(self.R), name="unit_groups")
                if self.wide:  # (the sparsest plan, see X_PREFETCH_LINES)
                    # what the groups prefetch (LAYOUT_PREFETCH_X): the next K-block, or after
                    # the last one the next panel's first (past this call's tokens: a prefetch
                    # never faults)
                    next_x = b.select(
                        last,
                        U.gep(b, a["x"], b.mul(b.add(a["t0"], U.int64(tnp)), K)),
                        U.gep(b, a["x"], b.add(b.mul(a["t0"], K), b.add(k0, KB))),
                        name="next_x",
                    )
                    # the groups that prefetch: the first X_PREFETCH_LINES * tnp * (lines of a
                    # row) (none without the flag: one compare per group)
                    parts = b.udiv(b.add(KB, U.int64(16 * X_PREFETCH_LINES - 1)),
                                   U.int64(16 * X_PREFETCH_LINES))  # fmt: skip
                    prefetching_x = b.and_(prefetch_x, b.not_(slabbed))  # (slabs: X packed)
                    prefetch_groups = b.select(prefetching_x, b.mul(parts, U.int64(tnp)),
                                               U.int64(0), name="prefetch_groups")  # fmt: skip

                def rows(first_block: bool):
                    with U.for_range(b, slab_begin, slab_end, unit, name="rs") as rs:
                        if self.one_block:
                            rows_at = partial  # just the unit's rows
                        else:  # the partial sums of every row of the slab
                            rows_at = U.gep(b, partial, b.mul(b.sub(rs, slab_begin), U.int64(tnp)),
                                            name="rows_at")  # fmt: skip
                        # every group of the unit (members past N are empty; their sums land in
                        # rows that are never stored)
                        g0 = b.sdiv(rs, U.int64(self.R), name="unit_group0")
                        local0 = b.sdiv(b.sub(rs, slab_begin), U.int64(self.R))
                        with U.for_range(b, 0, count, name="g") as g:
                            gi = b.add(g0, g, name="group")
                            if self.wide:
                                local = b.add(local0, g, name="local_group")
                                prefetching = b.icmp_signed("<", local, prefetch_groups)
                                with b.if_then(prefetching, likely=False):  # (out of the way)
                                    self._emit_x_prefetch(b, local, next_x, K, tnp)
                            self._emit_group(b, a, nv, panel, index, slots, gi, rows_at,
                                             first_block, prefetch_entries)  # fmt: skip
                        with b.if_then(last):  # the unit's tiles (LU = V: one)
                            self._emit_unit_finish(b, a, rows_at, tnp, rs, N, y_panel,
                                                   panel_out)  # fmt: skip

                if self.one_block:
                    rows(True)
                else:  # the first block starts from zero, later ones from the partial sums
                    with b.if_else(first) as (then, otherwise):
                        with then:
                            rows(True)
                        with otherwise:
                            rows(False)
        b.ret_void()
        return fn

    def _emit_pack_block(self, b, a, K, k0, kc, dst, tnp):
        """Pack X[t0 : t0 + tn, k0 : k0 + kc] (kc <= KB: tokens past tn read the zero page of
        one block) to dst[k][0:tnp], transposed."""
        x_rows = U.gep(b, a["x"], b.add(b.mul(a["t0"], K), k0), name="x_block")
        zeros = b.bitcast(self.zeros, U.f32_ptr, name="zero_row")
        b.call(self.pack, [x_rows, K, a["tn"], kc, dst, U.int64(tnp), U.int64(self.TN), zeros,
                           a["probe"]])  # fmt: skip

    def _emit_unit_finish(self, b, a, rows_at, tnp, rs, N, y_panel, panel_out):
        """Finish the tiles of the last K-block's unit of rows rs .. rs + LU (to row_end)."""
        V = self.V

        def finish(rb, tile):
            nrows = b.sub(a["row_end"], rb)
            nrows = b.select(b.icmp_signed("<", nrows, U.int64(V)), nrows, U.int64(V),
                             name="nrows")  # fmt: skip
            self._emit_finish(b, a, tile, tnp, rb, nrows, N, y_panel, panel_out)

        if self.LU == V:
            finish(rs, rows_at)
            return
        unit_end = b.add(rs, U.int64(self.LU))
        unit_end = b.select(b.icmp_signed("<", unit_end, a["row_end"]), unit_end, a["row_end"])
        with U.for_range(b, rs, unit_end, V, name="tile") as rb:
            finish(rb, U.gep(b, rows_at, b.mul(b.sub(rb, rs), U.int64(tnp))))

    def _emit_x_prefetch(self, b, local, next_x, K, tnp):
        """The local-th group's share of prefetching next_x (tnp rows, row stride K; see
        LAYOUT_PREFETCH_X): X_PREFETCH_LINES lines of one row, the groups taking the rows in
        turn, then the next lines of each."""
        lines = X_PREFETCH_LINES
        if tnp & (tnp - 1) == 0:
            row = b.and_(local, U.int64(tnp - 1))
            part = b.lshr(local, U.int64(tnp.bit_length() - 1))
        else:
            row, part = b.urem(local, U.int64(tnp)), b.udiv(local, U.int64(tnp))
        col = b.mul(part, U.int64(16 * lines), name="prefetch_col")  # (16 floats a line)
        at = b.bitcast(U.gep(b, next_x, b.add(b.mul(row, K), col)), ir.PointerType(ir.IntType(8)))
        for line in range(lines):
            b.call(self.prefetch, [b.gep(at, [U.int64(64 * line)]), *_PREFETCH_L2])

    def _emit_finish(self, b, a, tile, tnp, rb, nrows, N, y_panel, panel_out):
        """Bias, activation and store of the finished tile of rows rb .. rb + nrows."""
        TN = self.TN
        bias = U.gep(b, a["bias"], rb, name="bias_block")
        with b.if_else(panel_out) as (then, otherwise):
            with then:
                rows_out = U.gep(b, y_panel, b.mul(rb, U.int64(TN)), name="y_rows")
                b.call(self.store_panel, [tile, U.int64(tnp), nrows, bias, rows_out,
                                          U.int64(TN), a["probe"]])  # fmt: skip
            with otherwise:
                y_block = U.gep(b, a["y"], b.add(b.mul(a["t0"], N), rb), name="y_block")

                def store_to_y(stream: int):
                    b.call(self.store_block, [tile, U.int64(tnp), a["tn"], nrows, bias, y_block,
                                              N, U.int64(stream)])  # fmt: skip

                if not self.staged:
                    # unstaged layers stream only where X comes from DRAM as well: BERT-base's
                    # q|k|v (19 MB at batch 16, X 6 MB), which attention reads right after,
                    # streamed measured ~1% slower end to end (177.5-179.8 against 174.6-179.4
                    # ms, alternating processes); 3072x768 at 2048 tokens (X 25 MB, Y 6 MB)
                    # 3% faster, and with a 768-wide layer reading its Y 1-4% (see
                    # stream_out_bytes)
                    if self.V * 4 == 64:
                        both = U.int64(LAYOUT_STREAM_OUT | LAYOUT_PREFETCH_X)
                        flagged = b.icmp_unsigned("==", b.and_(a["layout"], both), both)
                        direct = b.and_(flagged, self._line_aligned(b, a, N), name="stream_direct")
                        with b.if_else(direct) as (streamed, plain):
                            with streamed:
                                store_to_y(1)
                            with plain:
                                store_to_y(0)
                    else:
                        store_to_y(0)
                elif self.V * 4 == 64:
                    # streamed tiles go straight to Y when each token's V outputs are a whole
                    # line (no set thrashing in L1, which they skip; no copy through staging):
                    # 98% at 2048 tokens, 768x3072 13.7x -> 17.9x numpy, 1024x4096 14.4x ->
                    # 17.2x; the others (and misaligned Y) through staging
                    stream = b.and_(a["layout"], U.int64(LAYOUT_STREAM_OUT), name="stream_out")
                    direct = b.and_(
                        b.icmp_unsigned("!=", stream, U.int64(0)),
                        self._line_aligned(b, a, N),
                        name="stream_direct",
                    )
                    with b.if_else(direct) as (direct, staged):
                        with direct:
                            store_to_y(1)
                        with staged:
                            self._emit_staged_store(b, a, tile, tnp, rb, nrows, bias, N)
                else:
                    self._emit_staged_store(b, a, tile, tnp, rb, nrows, bias, N)

    @staticmethod
    def _line_aligned(b, a, N):
        """(i1) Y and its row stride are whole cache lines (64 bytes)."""
        line_bytes = b.or_(b.ptrtoint(a["y"], U.i64), b.mul(N, U.int64(4)))
        return b.icmp_unsigned("==", b.and_(line_bytes, U.int64(63)), U.int64(0))

    def _emit_staged_store(self, b, a, tile, tnp, rb, nrows, bias, N):
        """Finish the tile into the staging buffer (row stride STAGE_STRIDE, not N), and copy
        the staged columns to Y once a chunk of STAGE_COLS is full or the range ends.

        Y's row stride N * 4 bytes is a multiple of 1 KB on BERT shapes, so the 16-64 rows
        of Y one tile writes map to the same few L1 sets and the stores thrash them (a tile
        measured 420 cycles at N = 3072 against 50 at N = 3088); the staging stride is not,
        and the copy out writes whole runs of a row."""
        C, SC = _STAGE_COLS, self.STAGE_STRIDE
        col = b.srem(b.sub(rb, a["row_begin"]), U.int64(C), name="stage_col")
        staging = self.staging
        b.call(
            self.store_block,
            [tile, U.int64(tnp), a["tn"], nrows, bias, U.gep(b, staging, col), U.int64(SC),
             U.int64(0)],
        )  # fmt: skip
        stream = b.and_(a["layout"], U.int64(LAYOUT_STREAM_OUT), name="stream_out")
        filled = b.add(col, nrows, name="staged_cols")
        chunk_full = b.icmp_signed("==", filled, U.int64(C))
        range_end = b.icmp_signed(">=", b.add(rb, nrows), a["row_end"])
        with b.if_then(b.or_(chunk_full, range_end)):
            first_col = b.sub(rb, col, name="chunk_start")
            y_chunk = U.gep(b, a["y"], b.add(b.mul(a["t0"], N), first_col))
            b.call(self.copy_rows, [staging, U.int64(SC), a["tn"], filled, y_chunk, N, stream])

    def _emit_group(self, b, a, nv, panel, index, slots, gi, tile, first, prefetch):
        """For each member r of group gi: tile[slot_r, 0:T] = (first ? 0 : tile[slot_r, 0:T])
        + sum of w * panel[k, 0:T] over the nonzeros (k, w) of its row in this K-block
        (first: a Python bool, code for the first K-block); prefetch (i1): prefetch the entries
        ENTRY_PREFETCH_BYTES past the group's own first.

        The entries stream from DRAM when a model's weights exceed the L3 (batch 1). Until stop
        18 each tile of rows prefetched its groups' entries in one burst (stop 14: 16 768x3072
        layers at 90% in turn at 128 tokens, 0.58-0.60 -> 0.535-0.54 ms a layer against none),
        which stalls on the miss buffers (farther ahead, 4-64 KB, did no better). A few lines
        per group, interleaved with the work (stop 18, alternating processes): the 48 sparse
        layers of BERT-base at 90% in turn at 128 tokens ran 6-9% slower than each repeated
        warm, against 10-13% with the bursts (one thread); BERT-base 90% at batch 1 on 2
        threads 12.5-12.7 -> 12.1 ms a run (the machine's slow stretches 16.0-16.3 -> 14.9-15.5),
        batch 16 the same. With the weights in cache, 128 tokens (the first of two panels
        prefetching) measured the same (bench/kernels.py, 90 and 98%, ±2%). Only a call's first
        panel prefetches: in every panel it cost 2-5%."""
        V, R = self.V, self.R
        m = U.Math(b, self.vty, self.target.has_fma, self.target.isa)
        zero = U.const(self.vty, 0.0)
        begin = b.sext(b.load(U.gep(b, index, gi)), U.i64, name="quad_begin")
        end = b.sext(b.load(U.gep(b, index, b.add(gi, U.int64(1)))), U.i64, name="quad_end")
        acc_ptrs, accs = [], []
        for r in range(R):
            slot = b.sext(b.load(U.gep(b, slots, b.add(b.mul(gi, U.int64(R)), U.int64(r)))), U.i64)
            acc_ptr = U.gep(b, tile, b.mul(slot, U.int64(nv * V)), name=f"acc_ptr{r}")
            acc_ptrs.append(acc_ptr)
            row = []
            for i in range(nv):
                if first:
                    init = zero
                else:
                    init = U.load_vec(
                        b, U.gep(b, acc_ptr, i * V), V, self.valign, name=f"partial{i}"
                    )
                row.append(U.alloca_once_value(b, init, name=f"acc{r}.{i}"))
            accs.append(row)

        i8p = ir.PointerType(ir.IntType(8))
        panel_bytes = b.bitcast(panel, i8p, name="panel_bytes")
        quads = b.bitcast(a["entries"], i8p, name="quads")
        row_bytes = U.int64(self.TN * 4)  # every panel width keeps the full panel's row stride

        bits = 16 if self.wide else 8  # of each k in the quad's k word

        def panel_row(ks, step):
            k = b.and_(b.lshr(ks, U.int64(bits * step)), U.int64((1 << bits) - 1),
                       name=f"k{step}")  # fmt: skip
            return b.bitcast(
                b.gep(panel_bytes, [b.mul(k, row_bytes)], inbounds=True), U.f32_ptr, name="row"
            )

        quad_bytes = U.int64(self.quad_type.itemsize)
        with b.if_then(prefetch):
            ahead = U.int64(ENTRY_PREFETCH_BYTES)
            first_byte = b.add(b.mul(begin, quad_bytes), ahead)
            end_byte = b.add(b.mul(end, quad_bytes), ahead)
            with U.for_range(b, first_byte, end_byte, 64, name="prefetch_at") as at:
                b.call(self.prefetch, [b.gep(quads, [at]), *_PREFETCH_READ])
        lanes = self._weight_lanes(b)  # (before the loop: built once, not per quad)
        with U.for_range(b, begin, end, name="quad") as q:
            qp = b.gep(quads, [b.mul(q, quad_bytes)], inbounds=True)
            if self.wide:  # (see _WIDE_QUAD) four 16-bit k, then the weights
                ks = b.load(b.bitcast(qp, ir.PointerType(U.i64)), name="ks")
            else:
                ks = b.zext(b.load(b.bitcast(qp, U.i32_ptr), name="ks"), U.i64)
            weights = b.bitcast(b.gep(qp, [U.int64(bits // 2)], inbounds=True), U.f32_ptr)
            if self.shared:
                # 4 steps (see _shared_quad): each loads its panel row once, for all R rows
                for step in range(4):
                    row = panel_row(ks, step)
                    xs = [U.load_vec(b, U.gep(b, row, i * V), V, self.valign, name=f"x{i}")
                          for i in range(nv)]  # fmt: skip
                    for r in range(R):
                        w = b.load(U.gep(b, weights, step * R + r), name="w")
                        w = U.splat(b, w, V, name="w.splat")
                        for i in range(nv):
                            b.store(m.fma(w, xs[i], b.load(accs[r][i])), accs[r][i])
            else:
                # a quad (see _QUAD): one 32-bit load of its 4 k, a broadcast load per weight;
                # entry e belongs to member e % R, so R independent accumulator chains per
                # vector hide the FMA latency, and the group's rows share one loop (one exit
                # to mispredict)
                splats = self._quad_weights(b, weights, lanes)
                for e in range(4):
                    row = panel_row(ks, e)
                    w = splats[e]
                    acc = accs[e % R]
                    for i in range(nv):
                        xv = U.load_vec(b, U.gep(b, row, i * V), V, self.valign, name=f"x{i}")
                        b.store(m.fma(w, xv, b.load(acc[i])), acc[i])
        for r in range(R):
            for i in range(nv):
                U.store_vec(b, b.load(accs[r][i]), U.gep(b, acc_ptrs[r], i * V), self.valign)

    def _weight_lanes(self, b) -> list | None:
        """AVX-512: the permute indices of _quad_weights (lane e of every 4), None elsewhere."""
        if self.target.isa != "avx512":
            return None
        i16 = U.vec(self.V, U.i32)
        opaque = ir.InlineAsm(ir.FunctionType(i16, [i16]), "", "=v,0")
        return [b.call(opaque, [U.const(i16, e)], name=f"lane{e}") for e in range(4)]

    def _quad_weights(self, b, weights, lanes) -> list:
        """The 4 weights of a quad, each splat over a vector. The loop is bound by loads (4
        panel rows per nonzero), so on AVX-512 the weights come in one 16-byte load, splat
        by vpermps from a register, instead of 4 broadcast loads: 4.5 instead of 5.25 loads
        per nonzero, 3-5% faster at 90% (M = 2048). Empty inline-asm barriers (on the loaded
        weights and the indices) keep LLVM from folding the load and constant-index
        permutes back into broadcast loads."""
        V = self.V
        if lanes is None:
            return [U.splat(b, b.load(U.gep(b, weights, e), name="w"), V, name="w.splat")
                    for e in range(4)]  # fmt: skip
        permute = U.intrinsic(self.module, "llvm.x86.avx512.permvar.sf.512", self.vty,
                              [self.vty, lanes[0].type])  # fmt: skip
        w4 = b.load(b.bitcast(weights, ir.PointerType(U.vec(4))), align=4, name="w4")
        w16 = U.shuffle(b, w4, w4, [0, 1, 2, 3] * (V // 4), name="w16")
        in_register = b.call(ir.InlineAsm(ir.FunctionType(self.vty, [self.vty]), "", "=v,0"),
                             [w16])  # fmt: skip
        return [b.call(permute, [in_register, lane], name="w.splat") for lane in lanes]

    # -- output ------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------
# Helpers shared by all kernels of a target: one V x V transpose for packing, and the epilogue
# + transposed store of a finished tile (per activation and bias). Compiled once per process.
# --------------------------------------------------------------------------------------------


def _new_function(module, name, names, types, internal=True, noinline=False):
    fn = ir.Function(module, ir.FunctionType(U.void, types), name=name)
    if internal:
        fn.linkage = "internal"
    fn.attributes.add("nounwind")
    if noinline:
        fn.attributes.add("noinline")
    for arg, nm in zip(fn.args, names):
        arg.name = nm
        if isinstance(arg.type, ir.PointerType) and not isinstance(
            arg.type.pointee, ir.PointerType
        ):
            arg.add_attribute("noalias")
    return fn, ir.IRBuilder(fn.append_basic_block("entry")), dict(zip(names, fn.args))


# Output vectors per epilogue operation in finish_tile (see irutil.Math on wide vectors).
_EPILOGUE_GROUP = 4


def _emit_finish_tile(module, name, target: Target, activation: str, has_bias: bool) -> ir.Function:
    """finish_tile(src, src_stride, bias, dst, dst_stride, stream):
    dst[t * dst_stride + r] = act(src[r * src_stride + t] + bias[r]) for r, t < V: the transposed
    store of V output rows x V tokens, with the epilogue applied after the transpose (a vector
    is then one token's V outputs, and bias[0:V] one load), on groups of vectors at once.
    stream (i1): each dst row starts on a cache line (V floats are one line on AVX-512) and
    takes a non-temporal store (see LAYOUT_STREAM_OUT)."""
    V = target.vector_width
    valign = 4 * V
    G = _EPILOGUE_GROUP
    fn, b, a = _new_function(
        module, name, ("src", "src_stride", "bias", "dst", "dst_stride", "stream"),
        (U.f32_ptr, U.i64, U.f32_ptr, U.f32_ptr, U.i64, U.i1),
    )  # fmt: skip
    m = U.Math(b, U.vec(G * V), target.has_fma, target.isa)
    rows = [U.load_vec(b, U.gep(b, a["src"], b.mul(U.int64(r), a["src_stride"])), V, valign,
                       name=f"row{r}") for r in range(V)]  # fmt: skip
    cols = U.transpose(b, rows, name="t")
    if has_bias:
        bias = U.load_vec(b, a["bias"], V, 4, name="bias")
        bias_wide = U.concat(b, [bias] * G, name="bias.wide")
    outs = []
    for g in range(0, V, G):
        group = cols[g : g + G]
        if has_bias or activation != "none":
            wide = U.concat(b, group, name=f"tok{g}")
            if has_bias:
                wide = b.fadd(wide, bias_wide, name=f"tok{g}.biased")
            group = U.split(b, m.activation(wide, activation), V)
        outs += group
    nontemporal = module.add_metadata([ir.Constant(U.i32, 1)])
    with b.if_else(a["stream"]) as (then, otherwise):
        for block, streamed in ((then, True), (otherwise, False)):
            with block:
                for t, col in enumerate(outs):
                    dst = U.gep(b, a["dst"], b.mul(U.int64(t), a["dst_stride"]))
                    if streamed:
                        store = b.store(col, b.bitcast(dst, ir.PointerType(col.type)), align=valign)
                        store.set_metadata("nontemporal", nontemporal)
                    else:
                        U.store_vec(b, col, dst, 4)
    b.ret_void()
    return fn


def _emit_store_block(module, name, target: Target, activation: str, has_bias: bool) -> ir.Function:
    """store_block(tile, width, tn, nrows, bias, y, y_stride, stream):
    y[t * y_stride + r] = act(tile[r * width + t] + bias[r]) for r < nrows <= V, t < tn <= width
    (width a multiple of V, tile V x width, 4V-byte aligned; bias padded to V). stream != 0:
    whole V x V tiles whose rows of y start on cache lines are written by non-temporal stores
    (the caller fences them, see LAYOUT_STREAM_OUT)."""
    V = target.vector_width
    finish = _emit_finish_tile(module, "finish_tile", target, activation, has_bias)
    fn, b, a = _new_function(
        module, name, ("tile", "width", "tn", "nrows", "bias", "y", "y_stride", "stream"),
        _HELPER_TYPES["store_block"], internal=False,
    )  # fmt: skip
    # streaming needs each token's V outputs to be one whole cache line: y and its row stride
    # line-aligned (and V floats a line)
    stride_bytes = b.mul(a["y_stride"], U.int64(4))
    misaligned = b.and_(b.or_(b.ptrtoint(a["y"], U.i64), stride_bytes), U.int64(63))
    stream = b.and_(
        b.icmp_unsigned("!=", a["stream"], U.int64(0)),
        b.icmp_unsigned("==", misaligned, U.int64(0)),
        name="stream",
    )
    if 4 * V != 64:
        stream = ir.Constant(U.i1, 0)
    with b.goto_entry_block():
        slot = b.alloca(ir.ArrayType(U.f32, V * V), name="stack_tile")
        slot.align = 4 * V
    tmp = b.bitcast(slot, U.f32_ptr, name="stack_tile.ptr")
    with U.for_range(b, 0, a["width"], V, name="t_begin") as t_begin:
        src = U.gep(b, a["tile"], t_begin, name="tile_cols")
        whole = b.and_(
            b.icmp_signed("==", a["nrows"], U.int64(V)),
            b.icmp_signed("<=", b.add(t_begin, U.int64(V)), a["tn"]),
            name="whole_tile",
        )
        with b.if_else(whole, likely=True) as (then, otherwise):
            with then:
                dst = U.gep(b, a["y"], b.mul(t_begin, a["y_stride"]))
                b.call(finish, [src, a["width"], a["bias"], dst, a["y_stride"], stream])
            with otherwise:
                # tokens past tn or rows past the range: via a stack tile, valid part only
                b.call(finish, [src, a["width"], a["bias"], tmp, U.int64(V),
                                ir.Constant(U.i1, 0)])  # fmt: skip
                t_end = b.add(t_begin, U.int64(V))
                t_end = b.select(b.icmp_signed("<", t_end, a["tn"]), t_end, a["tn"], name="t_end")
                with U.for_range(b, t_begin, t_end, name="t") as t:
                    src_row = U.gep(b, tmp, b.mul(b.sub(t, t_begin), U.int64(V)))
                    dst_row = U.gep(b, a["y"], b.mul(t, a["y_stride"]))
                    with U.for_range(b, 0, a["nrows"], name="r") as r:
                        b.store(b.load(U.gep(b, src_row, r)), U.gep(b, dst_row, r))
    b.ret_void()
    return fn


def _emit_store_panel(module, name, target: Target, activation: str, has_bias: bool) -> ir.Function:
    """store_panel(tile, width, nrows, bias, dst, dst_stride, probe):
    dst[r * dst_stride + t] = act(tile[r * width + t] + bias[r]) for r < nrows, t < width (a
    multiple of V): finished rows left untransposed, in the panel layout that a next kernel
    reads as packed X (LAYOUT_PANEL_OUT). *probe += (the sum of the stored values) times 0:
    NaN if one is not finite (or, harmlessly, if finite ones sum past the float range), which
    the caller must handle as for an X that is not (the next kernel, reading these as its
    packed X, does not probe them)."""
    V = target.vector_width
    G = _EPILOGUE_GROUP
    fn, b, a = _new_function(
        module, name, ("tile", "width", "nrows", "bias", "dst", "dst_stride", "probe"),
        _HELPER_TYPES["store_panel"], internal=False,
    )  # fmt: skip
    vty = U.vec(V)
    sums = U.alloca_once_value(b, U.const(vty, 0.0), name="sums")
    width_wide = b.mul(b.sdiv(a["width"], U.int64(G * V)), U.int64(G * V), name="width_wide")
    with U.for_range(b, 0, a["nrows"], name="r") as r:
        src = U.gep(b, a["tile"], b.mul(r, a["width"]), name="tile_row")
        dst = U.gep(b, a["dst"], b.mul(r, a["dst_stride"]), name="dst_row")
        bias = b.load(U.gep(b, a["bias"], r), name="bias") if has_bias else None
        # G vectors at a time (GELU's dependency chains interleave), then one at a time
        for lanes, begin, end in ((G * V, U.int64(0), width_wide), (V, width_wide, a["width"])):
            m = U.Math(b, U.vec(lanes), target.has_fma, target.isa)
            with U.for_range(b, begin, end, lanes, name=f"t{lanes}") as t:
                v = U.load_vec(b, U.gep(b, src, t), lanes, 4 * V)
                if has_bias:
                    v = b.fadd(v, U.splat(b, bias, lanes))
                v = m.activation(v, activation)
                U.store_vec(b, v, U.gep(b, dst, t), 4 * V)
                parts = U.split(b, v, V) if lanes > V else [v]
                while len(parts) > 1:  # (a tree: one dependent add per step into the sums)
                    parts = [b.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
                b.store(b.fadd(b.load(sums), parts[0]), sums)
    total = b.load(sums)
    probe = b.load(a["probe"])
    for lane in range(V):
        probe = b.fadd(probe, b.fmul(b.extract_element(total, ir.Constant(U.i32, lane)),
                                     ir.Constant(U.f32, 0.0)))  # fmt: skip
    b.store(probe, a["probe"])
    b.ret_void()
    return fn


def _emit_copy_rows(module, name, target: Target) -> ir.Function:
    """copy_rows(src, src_stride, rows, cols, dst, dst_stride, stream): dst[r * dst_stride + c]
    = src[r * src_stride + c] for r < rows, c < cols (vectors, then a scalar tail; src 4V-byte
    aligned). stream != 0: the vectors of rows whose dst starts 64-byte aligned are stored
    non-temporally (then an sfence, before the caller's threads signal that they are done)."""
    V = target.vector_width
    fn, b, a = _new_function(
        module, name, ("src", "src_stride", "rows", "cols", "dst", "dst_stride", "stream"),
        _HELPER_TYPES["copy_rows"], internal=False,
    )  # fmt: skip
    stream = b.icmp_unsigned("!=", a["stream"], U.int64(0), name="stream")
    nontemporal = module.add_metadata([ir.Constant(U.i32, 1)])
    cols_vec = b.mul(b.sdiv(a["cols"], U.int64(V)), U.int64(V), name="cols_vec")
    with U.for_range(b, 0, a["rows"], name="r") as r:
        src = U.gep(b, a["src"], b.mul(r, a["src_stride"]), name="src_row")
        dst = U.gep(b, a["dst"], b.mul(r, a["dst_stride"]), name="dst_row")
        line_start = b.icmp_unsigned("==", b.and_(b.ptrtoint(dst, U.i64), U.int64(63)), U.int64(0))
        with b.if_else(b.and_(stream, line_start)) as (then, otherwise):
            # (V floats at a multiple of V from a 64-byte boundary: aligned)
            with then, U.for_range(b, 0, cols_vec, V, name="cs") as c:
                v = U.load_vec(b, U.gep(b, src, c), V, 4 * V)
                dst_vec = b.bitcast(U.gep(b, dst, c), ir.PointerType(v.type))
                b.store(v, dst_vec, align=4 * V).set_metadata("nontemporal", nontemporal)
            with otherwise, U.for_range(b, 0, cols_vec, V, name="c") as c:
                U.store_vec(b, U.load_vec(b, U.gep(b, src, c), V, 4 * V), U.gep(b, dst, c), 4)
        with U.for_range(b, cols_vec, a["cols"], name="ct") as c:
            b.store(b.load(U.gep(b, src, c)), U.gep(b, dst, c))
    with b.if_then(stream):
        _emit_store_fence(b, module, target)
    b.ret_void()
    return fn


def _emit_store_fence(b, module, target: Target) -> None:
    """Order the non-temporal stores before (x86's ordinary fences do not order them)."""
    if (target.triple or llvm.get_process_triple()).startswith(("x86_64", "i386", "i686")):
        b.call(U.intrinsic(module, "llvm.x86.sse.sfence", U.void, []), [])
    else:
        b.fence("release")


# Packing prefetches each row this far ahead of what it transposes: X comes from DRAM where it
# exceeds the L3, and the pack's loads alone keep too few misses in flight (~25 GB/s, one
# core). 98% at 2048 tokens (bench/kernels.py, alternating processes): 3072x768 -4 to -9%,
# 4096x1024 -2 to -10% (14.5x -> 15.0-15.6x numpy), 768x768 -3 to -5%; 90% 3072x768 -3.5%;
# 128 tokens the same. Past a row's end it prefetches the next row's start (or, past the
# end of X or of the zero page, nothing: a prefetch never faults).
PACK_PREFETCH_FLOATS = 64


def _emit_transpose_rows(module, name, target: Target) -> ir.Function:
    """transpose_rows(srcs, offset, dst, dst_stride) -> probe: dst[j*dst_stride + i] =
    srcs[i][offset + j] for i, j < V (dst 4V-byte aligned): the V x V transpose of packing,
    prefetching each row PACK_PREFETCH_FLOATS further on.
    probe: the sum of the rows times 0, NaN in some lane if any value was NaN or infinite."""
    V = target.vector_width
    vty = U.vec(V)
    fnty = ir.FunctionType(vty, (ir.PointerType(U.f32_ptr), U.i64, U.f32_ptr, U.i64))
    fn = ir.Function(module, fnty, name=name)
    fn.linkage = "internal"
    for arg, n in zip(fn.args, ("srcs", "offset", "dst", "dst_stride")):
        arg.name = n
    a = {arg.name: arg for arg in fn.args}
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    rows = []
    probe = U.const(vty, 0.0)
    prefetch = U.intrinsic(module, "llvm.prefetch.p0", U.void,
                           [ir.PointerType(ir.IntType(8)), U.i32, U.i32, U.i32])  # fmt: skip
    ahead = b.add(a["offset"], U.int64(PACK_PREFETCH_FLOATS), name="ahead")
    for i in range(V):
        row = b.load(b.gep(a["srcs"], [U.int64(i)], inbounds=True), name=f"src{i}")
        rows.append(U.load_vec(b, U.gep(b, row, a["offset"]), V, 4, name=f"row{i}"))
        b.call(prefetch, [b.bitcast(U.gep(b, row, ahead), ir.PointerType(ir.IntType(8))),
                          *_PREFETCH_READ])  # fmt: skip
        probe = b.fadd(probe, b.fmul(rows[-1], U.const(vty, 0.0)))
    for j, col in enumerate(U.transpose(b, rows, name="t")):
        U.store_vec(b, col, U.gep(b, a["dst"], b.mul(U.int64(j), a["dst_stride"])), 4 * V)
    b.ret(probe)
    return fn


def _emit_pack(module, name, target: Target) -> ir.Function:
    """pack(x, x_stride, tn, kc, panel, width, stride, zeros, probe): panel[k * stride + t] =
    x[t * x_stride + k] for t < tn, k < kc, and 0 for tn <= t < width (width and stride
    multiples of V; panel 4V-byte aligned): V x V transposes. The rows of tokens past tn are
    read from `zeros` (kc floats), never from past the end of x. *probe += the sum of the
    packed values times 0: it turns NaN if X holds a NaN or an infinity, which the caller
    must then handle as a dense product does (the kernel skips zero weights)."""
    V = target.vector_width
    vty = U.vec(V)
    transpose_rows = _emit_transpose_rows(module, "transpose_rows", target)
    fn, b, a = _new_function(
        module, name,
        ("x", "x_stride", "tn", "kc", "panel", "width", "stride", "zeros", "probe"),
        _HELPER_TYPES["pack"], internal=False,
    )  # fmt: skip
    with b.goto_entry_block():
        srcs = b.alloca(U.f32_ptr, size=U.int64(V), name="src_rows")
        probe_vec = b.alloca(vty, name="probe_vec")
        probe_scalar = b.alloca(U.f32, name="probe_scalar")
    b.store(U.const(vty, 0.0), probe_vec)
    b.store(ir.Constant(U.f32, 0.0), probe_scalar)
    kv_end = b.mul(b.sdiv(a["kc"], U.int64(V)), U.int64(V), name="kc_vec")
    with U.for_range(b, 0, a["width"], V, name="tb") as tb:
        # source rows of the V tokens of this column block (the zero page past tn)
        with U.for_range(b, 0, V, name="i") as i:
            t = b.add(tb, i, name="t")
            valid = b.icmp_signed("<", t, a["tn"], name="valid")
            xrow = b.gep(
                a["x"], [b.select(valid, b.mul(t, a["x_stride"]), U.int64(0))], name="x_row"
            )
            b.store(b.select(valid, xrow, a["zeros"], name="src"), b.gep(srcs, [i]))
        col0 = U.gep(b, a["panel"], tb, name="panel_cols")
        with U.for_range(b, 0, kv_end, V, name="kv") as kv:
            dst = U.gep(b, col0, b.mul(kv, a["stride"]))
            p = b.call(transpose_rows, [srcs, kv, dst, a["stride"]])
            b.store(b.fadd(b.load(probe_vec), p), probe_vec)
        # the last kc % V columns, scalar
        with U.for_range(b, kv_end, a["kc"], name="kr") as k:
            dst = U.gep(b, col0, b.mul(k, a["stride"]))
            with U.for_range(b, 0, V, name="ir") as i:
                row = b.load(b.gep(srcs, [i]))
                v = b.load(U.gep(b, row, k))
                b.store(v, U.gep(b, dst, i))
                zero = ir.Constant(U.f32, 0.0)
                b.store(b.fadd(b.load(probe_scalar), b.fmul(v, zero)), probe_scalar)
    total = b.load(probe_scalar)
    pv = b.load(probe_vec)
    for lane in range(V):
        total = b.fadd(total, b.extract_element(pv, ir.Constant(U.i32, lane)))
    b.store(b.fadd(b.load(a["probe"]), total), a["probe"])
    b.ret_void()
    return fn


_helper_cache = jit.CompiledOnce()

# C signatures of the helpers (the kernels declare them by these types and link them by name)
_HELPER_TYPES = {
    "pack": (U.f32_ptr, U.i64, U.i64, U.i64, U.f32_ptr, U.i64, U.i64, U.f32_ptr, U.f32_ptr),
    "store_block": (U.f32_ptr, U.i64, U.i64, U.i64, U.f32_ptr, U.f32_ptr, U.i64, U.i64),
    "copy_rows": (U.f32_ptr, U.i64, U.i64, U.i64, U.f32_ptr, U.i64, U.i64),
    "store_panel": (U.f32_ptr, U.i64, U.i64, U.f32_ptr, U.f32_ptr, U.i64, U.f32_ptr),
}
# helpers compiled in the module of another (one module, one code generation, per epilogue)
_HELPER_MODULE = {"store_panel": "store_block"}


def _target_key(target: Target) -> tuple:
    return (target.cpu_name, target.features, target.isa, target.vector_width, target.triple)


def _code_key(*parts) -> str:
    """The on-disk cache key of a module's machine code (see cache.py)."""
    return kcache.digest("code", cache_mod_version(), *parts)


def cache_mod_version() -> str:
    return kcache.code_version()


def _helper_name(kind: str, target: Target, activation: str, has_bias: bool) -> str:
    if kind in ("pack", "copy_rows"):
        return f"sparsednn_{kind}_{target.isa}"
    return "sparsednn_" + _kernel_name(kind, "", target.isa, has_bias, activation)[4:]


def _helper(kind: str, target: Target, activation: str, has_bias: bool):
    """(JIT module, symbol, function type) of a shared helper ("pack", "store_block",
    "store_panel" or "copy_rows"), compiled (or loaded from the kernel cache) on first use
    and exported to the JIT's linker under its symbol."""
    module_kind = _HELPER_MODULE.get(kind, kind)
    kinds = [module_kind] + [k for k, m in _HELPER_MODULE.items() if m == module_kind]
    epilogue = module_kind not in ("pack", "copy_rows")
    key = (module_kind, target) + ((activation, has_bias) if epilogue else ())
    names = {k: _helper_name(k, target, activation, has_bias) for k in kinds}

    def build():
        name = names[module_kind]

        def emit():
            module = jit.new_module(name, target)
            if module_kind == "pack":
                _emit_pack(module, name, target)
            elif module_kind == "copy_rows":
                _emit_copy_rows(module, name, target)
            else:
                _emit_store_block(module, name, target, activation, has_bias)
                _emit_store_panel(module, names["store_panel"], target, activation, has_bias)
            return module

        jm = jit.cached_module(_code_key("helper", name, _target_key(target)), target, emit)
        for symbol in names.values():
            jit.export_symbol(symbol, jm.function_address(symbol))
        return jm

    return _helper_cache.get(key, build), names[kind], ir.FunctionType(U.void, _HELPER_TYPES[kind])


# --------------------------------------------------------------------------------------------
# SpMV-shaped kernel for a few tokens (AVX-512): 16 outputs per vector, x looked up in registers
# --------------------------------------------------------------------------------------------
#
# With M = 1..SPMV_MAX_M a panel of TN tokens wastes most lanes. This kernel puts 16 consecutive
# OUTPUTS in the lanes instead: a "slice" of 16 rows of Wᵀ is a list of steps; a step holds, for
# each lane, one nonzero of that lane's row within one 32-wide chunk of K (a byte index 0..31,
# or 0x80 for none) and its weight. The 32 x values of the chunk are two vector loads and
# vpermi2ps picks each lane's x in one instruction: acc += permute(x chunk, idx) * w. A step's
# chunk is a window sliding along K (see _build_spmv), all steps in one flat loop (the step's
# window offset is data), so there is no per-chunk branch. Measured on AVX-512 at 90% random
# sparsity: 62% of the step slots are filled, ~2.5 cycles per step, against a gather per 16
# nonzeros at ~17 cycles.

SPMV_CHUNK = 32
SPMV_LANES = 16
# tokens per pass over the weights (each a separate accumulator chain set)
_SPMV_GROUPS = (4, 2, 1)
SPMV_SORT_VARIANCE_RATIO = 4.0  # see _build_spmv
_SPMV_UNROLL = 4  # steps per iteration, each into its own accumulators
# params: int64 [slice_ptr, idx, val, off, perm, bias, K, N], the layer's arrays and shape
# (one argument instead of eight: ctypes converts each in ~45 ns, and a one-token call takes
# ~5 us; the code is the same for every shape)
_SPMV_ARGS = ("x", "m", "y", "s_begin", "s_end", "params", "scratch")
_SPMV_ARG_TYPES = (U.f32_ptr, U.i64, U.f32_ptr, U.i64, U.i64, ir.PointerType(U.i64), U.f32_ptr)
_SPMV_PARAMS = ("slice_ptr", "idx", "val", "off", "perm", "bias")  # then K, N
# the token groups' functions (internal) take the arrays apart; dims points at [K, N]
_SPMV_GROUP_ARGS = ("x", "y", "s_begin", "s_end", *_SPMV_PARAMS, "dims", "scratch")
_SPMV_GROUP_TYPES = (U.f32_ptr, U.f32_ptr, U.i64, U.i64, U.i32_ptr,
                     ir.PointerType(ir.IntType(8)), U.f32_ptr, U.i32_ptr, U.i32_ptr, U.f32_ptr,
                     ir.PointerType(U.i64), U.f32_ptr)  # fmt: skip
_SPMV_KINDS = "i" * len(_SPMV_ARGS)
_SPMV_SIG = ctypes.CFUNCTYPE(
    None, ctypes.c_void_p, _WORD, ctypes.c_void_p, _WORD, _WORD, ctypes.c_void_p, ctypes.c_void_p
)


@dataclass
class _SpmvLayout:
    """The steps of every 16-output slice (see above)."""

    slice_ptr: np.ndarray  # int32 [n_slices + 1]: steps of slice s are slice_ptr[s]..[s+1]
    idx: np.ndarray  # uint8 [(steps + 1) * 16], 64-byte aligned: lane's k within the chunk
    val: np.ndarray  # float32 [(steps + 1) * 16], 64-byte aligned
    off: np.ndarray  # int32 [steps + 1]: first k of the step's chunk
    perm: np.ndarray  # int32 [n_slices * 16 + 1]: output row of each lane (rows sorted by
    #                   nonzeros, -1 past N), then 1 if that is the identity

    @property
    def steps(self) -> int:
        return int(self.slice_ptr[-1])

    def fill(self, nnz: int) -> float:
        return nnz / max(1, self.steps * SPMV_LANES)


def _aligned_empty(count: int, dtype, align: int = 64) -> np.ndarray:
    dtype = np.dtype(dtype)
    buf = np.empty(count * dtype.itemsize + align, np.uint8)
    start = -buf.ctypes.data % align
    return buf[start : start + count * dtype.itemsize].view(dtype)


def _build_spmv(o, k, v, n_rows: int, n_cols: int, unroll: int = 2,
                sort_rows: bool | None = None) -> _SpmvLayout:  # fmt: skip
    """Steps of the SpMV kernel from the nonzeros (o, k, v) of Wᵀ sorted by (o, k).

    A step's chunk is a window of 32 k starting at a multiple of 16 (so its two x loads stay
    aligned): the window of a slice's next step starts at the smallest k any of its lanes has
    left (rounded down to 16, and at most K rounded up to 32, minus 32), and every lane whose
    next nonzero lies inside takes it. Chunks at fixed multiples of 32 made every lane wait
    for the fullest one at each boundary: at 90% random sparsity the sliding windows fill 63%
    of the lanes against 50% (20% fewer steps; 95%: 50% against 40%).

    Output rows are reordered by their number of nonzeros (most first) when their counts vary
    several times more than random pruning makes them (binomially): with magnitude-pruned
    weights (rows of very different density) the 16 lanes of a slice then have similar
    counts, 15-50% fewer steps. (Measured on BERT shapes at 50-98% sparsity: the variance
    ratio is 0.9-1.05 for random masks, where sorting saves 0.5-3% of the steps, and 11-460
    for magnitude pruning of weights whose rows' scales vary 1.5-4x, where it saves 12-50%.
    Deciding so takes one build instead of two; layers of fewer than 65536 nonzeros, where
    the ratio says less and builds are cheap, build both and keep the one with a tenth fewer
    steps.)"""
    L, C, A = SPMV_LANES, SPMV_CHUNK, SPMV_LANES
    n_sl = max(1, -(-n_rows // L))
    kp = _round_up(max(n_cols, 1), C)
    o = o.astype(np.int64)
    row_counts = np.bincount(o, minlength=n_rows)
    perm = np.argsort(-row_counts, kind="stable")  # lane slot -> row
    if sort_rows is None and len(o) < 1 << 16:  # cheap: build both, keep the shorter
        plain = _build_spmv(o, k, v, n_rows, n_cols, unroll, False)
        if len(o) == 0:
            return plain
        by_count = _build_spmv(o, k, v, n_rows, n_cols, unroll, True)
        return by_count if by_count.steps < 0.9 * plain.steps else plain
    if sort_rows is None:
        mean = row_counts.mean()
        binomial = mean * (1.0 - mean / max(n_cols, 1))
        sort_rows = bool(row_counts.var() > SPMV_SORT_VARIANCE_RATIO * binomial)
    if not sort_rows:
        perm = np.arange(n_rows)
    rank = np.empty(max(n_rows, 1), np.int64)
    rank[perm] = np.arange(n_rows)
    if sort_rows:  # by new row, k order kept (the input is sorted by (o, k))
        order = _stable_order(rank[o])
        o, k, v = rank[o][order], k[order].astype(np.int64), v[order]
    else:
        k = k.astype(np.int64)
    # (one more element: 1 if the order is the identity, so that whole slices store as vectors)
    perm_pad = np.full(n_sl * L + 1, -1, np.int32)
    perm_pad[:n_rows] = perm
    perm_pad[-1] = int(np.array_equal(perm, np.arange(n_rows)))

    # Windows, all slices at once. Each lane's nonzeros are followed by a sentinel k (past
    # every window), so heads[lane slot], the lane's next nonzero, stops there by itself; a
    # slice is active until all its lanes reach their sentinels, and it takes one step per
    # round while active, so round i is step i of every active slice.
    n_lanes = n_sl * L
    counts = np.bincount(o, minlength=n_lanes)
    lane_ptr = np.zeros(n_lanes + 1, np.int64)
    np.cumsum(counts + 1, out=lane_ptr[1:])
    end_of = np.iinfo(np.int64).max // 2  # the sentinel: past every window
    k_ext = np.full(int(lane_ptr[-1]), end_of, np.int64)
    pos_ext = np.arange(len(o)) + np.repeat(np.arange(n_lanes), counts)  # nonzero -> place
    k_ext[pos_ext] = k
    heads = lane_ptr[:-1].copy()
    last_off = max(kp - C, 0)
    taken_place, taken_slot, taken_round = [], [], []
    win_slice, win_round, win_off = [], [], []
    rounds = 0
    while True:
        nxt = k_ext[heads].reshape(n_sl, L)
        first = nxt.min(axis=1)
        active = np.flatnonzero(first < end_of)
        if not len(active):
            break
        off = np.minimum(first // A * A, last_off)
        take = np.flatnonzero(nxt < (off + C)[:, None])
        win_slice.append(active)
        win_off.append(off[active])
        win_round.append(len(active))
        taken_place.append(heads[take])
        taken_slot.append(take)
        taken_round.append(len(take))
        heads[take] += 1
        rounds += 1
    ws = np.concatenate(win_slice) if win_slice else np.zeros(0, np.int64)
    steps_so_far = np.bincount(ws, minlength=n_sl)
    per_slice = steps_so_far + (-steps_so_far) % unroll  # whole unrolled iterations
    slice_ptr = np.zeros(n_sl + 1, np.int64)
    np.cumsum(per_slice, out=slice_ptr[1:])
    if slice_ptr[-1] >= 2**31 // L:
        raise CompileError(f"too many SpMV steps for int32 indices: {slice_ptr[-1]}")
    n_steps = int(slice_ptr[-1])
    idx = _aligned_empty((n_steps + 1) * L, np.uint8)
    idx.fill(0x80)
    val = _aligned_empty((n_steps + 1) * L, np.float32)
    val.fill(0.0)
    off = np.zeros(n_steps + 1, np.int32)
    if win_slice:
        rounds_of = np.arange(rounds)
        off[slice_ptr[ws] + np.repeat(rounds_of, win_round)] = np.concatenate(win_off)
        slot = np.concatenate(taken_slot)
        step = slice_ptr[slot // L] + np.repeat(rounds_of, taken_round)
        # places in k_ext back to nonzeros: a lane's place minus the sentinels before it
        place = np.concatenate(taken_place)
        pos = place - slot
        idx[step * L + slot % L] = (k[pos] - off[step]).astype(np.uint8)
        val[step * L + slot % L] = v[pos]
    return _SpmvLayout(slice_ptr.astype(np.int32), idx, val, off, perm_pad)


class _SpmvEmitter:
    """spmv(x, m, y, s_begin, s_end, params, scratch): y[0:m, 16 s_begin : 16 s_end] (clipped
    to N) for m tokens, in groups of 4/2/1 tokens per pass over the steps; params =
    [slice_ptr, idx, val, off, perm, bias, K, N] (_SPMV_PARAMS). The shape is data: one
    compiled kernel per epilogue serves every layer (the steps loop never depended on it), so
    a layer of a new shape costs no LLVM for its SpMV code (~50 ms each before).

    Each group's rows of x are first copied to 64-byte aligned scratch rows of K rounded up
    to the chunk (zero padded), so that chunk loads are aligned and never read past x."""

    def __init__(self, module, name, target: Target, activation: str, has_bias: bool):
        self.module, self.name = module, name
        self.target, self.activation, self.has_bias = target, activation, has_bias
        self.v16 = U.vec(SPMV_LANES)
        self.i8v = ir.VectorType(ir.IntType(8), SPMV_LANES)
        self.i32v = ir.VectorType(U.i32, SPMV_LANES)
        self.perm = U.intrinsic(module, "llvm.x86.avx512.vpermi2var.ps.512", self.v16,
                                [self.v16, self.i32v, self.v16])  # fmt: skip

    def emit(self):
        groups = {t: self._emit_group(t) for t in _SPMV_GROUPS}
        fn, b, a = _new_function(self.module, self.name, _SPMV_ARGS, _SPMV_ARG_TYPES,
                                 internal=False)  # fmt: skip
        params = a["params"]
        types = dict(zip(_SPMV_GROUP_ARGS, _SPMV_GROUP_TYPES))
        arrays = [b.inttoptr(b.load(U.gep(b, params, i)), types[name], name=name)
                  for i, name in enumerate(_SPMV_PARAMS)]  # fmt: skip
        dims = U.gep(b, params, len(_SPMV_PARAMS), name="dims")
        rest = [a["s_begin"], a["s_end"], *arrays, dims, a["scratch"]]
        k, n = self._dims(b, dims)[:2]
        t0_slot = U.alloca_once_value(b, U.int64(0), name="t0")
        for t in _SPMV_GROUPS:  # groups of 4 while 4 are left, then 2, then 1
            cond_bb = fn.append_basic_block(f"g{t}.cond")
            body_bb = fn.append_basic_block(f"g{t}.body")
            end_bb = fn.append_basic_block(f"g{t}.end")
            b.branch(cond_bb)
            b.position_at_end(cond_bb)
            t0 = b.load(t0_slot)
            b.cbranch(b.icmp_signed("<=", b.add(t0, U.int64(t)), a["m"]), body_bb, end_bb)
            b.position_at_end(body_bb)
            x = U.gep(b, a["x"], b.mul(t0, k))
            y = U.gep(b, a["y"], b.mul(t0, n))
            b.call(groups[t], [x, y] + rest)
            b.store(b.add(t0, U.int64(t)), t0_slot)
            b.branch(cond_bb)
            b.position_at_end(end_bb)
        b.ret_void()
        return fn

    @staticmethod
    def _dims(b, dims):
        """(K, N, KP, n_slices) from dims = [K, N]: KP = K rounded up to the chunk (at least
        one), n_slices = N in slices of 16 (at least one)."""
        k = b.load(dims, name="K")
        n = b.load(U.gep(b, dims, 1), name="N")
        kp = b.mul(b.sdiv(b.add(b.select(b.icmp_signed(">", k, U.int64(0)), k, U.int64(1)),
                                U.int64(SPMV_CHUNK - 1)), U.int64(SPMV_CHUNK)),
                   U.int64(SPMV_CHUNK), name="KP")  # fmt: skip
        slices = b.sdiv(b.add(n, U.int64(SPMV_LANES - 1)), U.int64(SPMV_LANES))
        slices = b.select(b.icmp_signed(">", slices, U.int64(0)), slices, U.int64(1),
                          name="n_slices")  # fmt: skip
        return k, n, kp, slices

    def _emit_group(self, T: int):
        L = SPMV_LANES
        fn, b, a = _new_function(self.module, f"spmv_group{T}", _SPMV_GROUP_ARGS,
                                 _SPMV_GROUP_TYPES)  # fmt: skip
        K, N, KP, n_slices = self._dims(b, a["dims"])
        math = U.Math(b, self.v16, True, "avx512")
        zero = U.const(self.v16, 0.0)
        xs = a["scratch"]
        # copy x rows to aligned, zero-padded scratch rows
        kv = b.and_(K, U.int64(-L), name="kv")
        for t in range(T):
            src = U.gep(b, a["x"], b.mul(U.int64(t), K))
            dst = U.gep(b, xs, b.mul(U.int64(t), KP))
            with U.for_range(b, 0, kv, L, name=f"cp{t}") as j:
                U.store_vec(b, U.load_vec(b, U.gep(b, src, j), L, 4), U.gep(b, dst, j), 64)
            with U.for_range(b, kv, KP, name=f"cpt{t}") as j:
                inside = b.icmp_signed("<", j, K)
                with b.if_else(inside) as (then, otherwise):
                    with then:
                        b.store(b.load(U.gep(b, src, j)), U.gep(b, dst, j))
                    with otherwise:
                        b.store(ir.Constant(U.f32, 0.0), U.gep(b, dst, j))
        with b.goto_entry_block():
            tmp = b.alloca(ir.ArrayType(U.f32, L), name="tail_out")
            tmp.align = 64
        tmp = b.bitcast(tmp, U.f32_ptr)
        U_ = _SPMV_UNROLL
        accs = [[U.alloca_once(b, self.v16, name=f"acc{t}.{u}") for u in range(U_)]
                for t in range(T)]  # fmt: skip
        high = ir.Constant(self.i8v, [ir.Constant(ir.IntType(8), 0x80)] * L)
        with U.for_range(b, a["s_begin"], a["s_end"], name="s") as s:
            for row in accs:
                for slot in row:
                    b.store(zero, slot)
            beg = b.sext(b.load(U.gep(b, a["slice_ptr"], s)), U.i64, name="step_begin")
            end = b.sext(b.load(U.gep(b, a["slice_ptr"], b.add(s, U.int64(1)))), U.i64,
                         name="step_end")  # fmt: skip
            with U.for_range(b, beg, end, U_, name="j") as j:
                for u in range(U_):
                    jj = b.add(j, U.int64(u)) if u else j
                    ip = b.gep(a["idx"], [b.mul(jj, U.int64(L))], inbounds=True)
                    ib = b.load(b.bitcast(ip, ir.PointerType(self.i8v)), align=16, name="idx")
                    live = b.icmp_unsigned("<", ib, high, name="live")
                    iv = b.zext(ib, self.i32v)
                    off = b.sext(b.load(U.gep(b, a["off"], jj)), U.i64, name="chunk")
                    w = U.load_vec(b, U.gep(b, a["val"], b.mul(jj, U.int64(L))), L, 64, name="w")
                    for t in range(T):
                        xp = U.gep(b, xs, b.add(off, b.mul(U.int64(t), KP)))
                        lo = U.load_vec(b, xp, L, 64)
                        hi = U.load_vec(b, U.gep(b, xp, L), L, 64)
                        xv = b.call(self.perm, [lo, iv, hi], name="xk")
                        # empty lanes (weight 0) take x = 0, not the accumulator: inf or NaN
                        # in x must not leak into them, and the accumulator chain stays a
                        # plain FMA (a masked permute; 4 chains hide the FMA latency)
                        xv = b.select(live, xv, zero)
                        b.store(math.fma(xv, w, b.load(accs[t][u])), accs[t][u])
            o0 = b.mul(s, U.int64(L), name="o0")
            bias = U.load_vec(b, U.gep(b, a["bias"], o0), L, 4) if self.has_bias else None
            # lanes are rows perm[o0 + i] (rows sorted by nonzeros): stored one by one
            n_valid = b.sub(N, o0)
            n_valid = b.select(b.icmp_signed("<", n_valid, U.int64(L)), n_valid, U.int64(L))
            rows = [b.sext(b.load(U.gep(b, a["perm"], b.add(o0, U.int64(i)))), U.i64)
                    for i in range(L)]  # fmt: skip
            whole = b.icmp_signed("==", n_valid, U.int64(L), name="whole")
            ident_flag = b.load(U.gep(b, a["perm"], b.mul(n_slices, U.int64(L))))
            contiguous = b.and_(whole, b.icmp_signed("!=", ident_flag, ir.Constant(U.i32, 0)))
            for t in range(T):
                parts = [b.load(slot) for slot in accs[t]]
                while len(parts) > 1:
                    parts = [b.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
                r = parts[0]
                if bias is not None:
                    r = b.fadd(r, bias)
                r = math.activation(r, self.activation)
                y_t = U.gep(b, a["y"], b.mul(U.int64(t), N))
                with b.if_else(contiguous, likely=True) as (vec_store, by_lane):
                    with vec_store:
                        U.store_vec(b, r, U.gep(b, y_t, o0), 4)
                    with by_lane:
                        U.store_vec(b, r, tmp, 64)  # lane by lane: scalar loads beat extracts
                        with b.if_else(whole, likely=True) as (then, otherwise):
                            with then:
                                for i in range(L):
                                    b.store(b.load(U.gep(b, tmp, i)), U.gep(b, y_t, rows[i]))
                            with otherwise:
                                with U.for_range(b, 0, n_valid, name="tail") as i:
                                    row = b.sext(b.load(U.gep(b, a["perm"], b.add(o0, i))),
                                                 U.i64)  # fmt: skip
                                    b.store(b.load(U.gep(b, tmp, i)), U.gep(b, y_t, row))
        b.ret_void()
        return fn


# --------------------------------------------------------------------------------------------
# Validation helpers (shared by the sparse and dense kernels)
# --------------------------------------------------------------------------------------------


def _check_weight(weight, bias, activation):
    if not isinstance(weight, np.ndarray) or weight.ndim != 2:
        raise InvalidInputError(
            f"linear weight must be a 2-D numpy array [K, N], got {type(weight).__name__} "
            f"with shape {getattr(weight, 'shape', None)}"
        )
    if weight.dtype != np.float32:
        if not np.issubdtype(weight.dtype, np.floating):
            raise InvalidInputError(f"linear weight must be float32, got {weight.dtype}")
        weight = weight.astype(np.float32)
    n = weight.shape[1]
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (n,):
            raise InvalidInputError(f"linear bias must have shape ({n},), got {bias.shape}")
        bias = np.ascontiguousarray(bias, dtype=np.float32)
    if activation not in ACTIVATIONS:
        raise InvalidInputError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return weight, bias


def empty_aligned(shape, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous float32 array whose data starts on an `align`-byte
    boundary (numpy's large allocations are only 16-byte aligned): the kernels' row stores
    then do not straddle cache lines (measured 2-5% on BERT shapes)."""
    count = int(np.prod(shape))
    buf = np.empty(count + align // 4, dtype=np.float32)
    start = (-buf.ctypes.data % align) // 4
    return buf[start : start + count].reshape(shape)


def _check_call(name, k, n, x, out):
    if not isinstance(x, np.ndarray):
        raise InvalidInputError(f"{name}: input must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise InvalidInputError(f"{name}: input dtype must be float32, got {x.dtype}")
    if x.ndim != 2 or x.shape[1] != k:
        raise InvalidInputError(f"{name}: input shape must be [M, {k}], got {list(x.shape)}")
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    m = x.shape[0]
    if out is None:
        out = empty_aligned((m, n))
    else:
        if not isinstance(out, np.ndarray):
            raise InvalidInputError(f"{name}: out must be a numpy array, got {type(out).__name__}")
        if out.dtype != np.float32:
            raise InvalidInputError(f"{name}: out dtype must be float32, got {out.dtype}")
        if out.shape != (m, n):
            raise InvalidInputError(f"{name}: out shape must be [{m}, {n}], got {list(out.shape)}")
        if not out.flags.c_contiguous:
            raise InvalidInputError(f"{name}: out must be C-contiguous")
        if not out.flags.writeable:
            raise InvalidInputError(f"{name}: out must be writable")
        if m and np.may_share_memory(x, out):
            raise InvalidInputError(f"{name}: out must not overlap the input")
    return x, out


# --------------------------------------------------------------------------------------------
# Scratch memory: one growable 64-byte aligned buffer per thread
# --------------------------------------------------------------------------------------------


def _fn_address(fn) -> int:
    """The code address of a ctypes function object (for the native pool's trampolines)."""
    return ctypes.cast(fn, ctypes.c_void_p).value


# --------------------------------------------------------------------------------------------
# The lean call path: these kernels take microseconds at M = 1, where numpy's .ctypes (~0.8 us
# per array) and a full validation would cost as much as the product.
# --------------------------------------------------------------------------------------------

_F32 = np.dtype(np.float32)
_from_buffer = ctypes.c_char.from_buffer
_addressof = ctypes.addressof


def _addr(a: np.ndarray) -> int:
    """Address of the data of a C-contiguous array (writable ones through the buffer protocol,
    ~3x cheaper than .ctypes.data)."""
    if a.flags.writeable:
        try:
            return _addressof(_from_buffer(a))
        except (ValueError, TypeError, BufferError):
            pass
    return a.ctypes.data


_SMALL_OUT_BYTES = 16 * 1024


def stream_out_bytes() -> int:
    """Outputs of a call from this size on are written by streaming stores (LAYOUT_STREAM_OUT):
    a quarter of the last-level cache. Measured with two 1024x1024 layers, the second reading
    the first's Y (32 MB L3, one thread, bench/stream_outputs.py; stop 19, tiles streamed
    straight to Y), the pair's time streamed / not: 90% 1.035 at 1-2 MB each (Y then stays in
    L2), 0.99-1.005 at 4 MB (the second layer reads Y from DRAM, not L3), 0.94 at 8 MB, 0.92
    at 16 MB; 98% 0.96-0.98 at 2 MB, 0.95 at 4 MB, 0.81 at 8 MB, 0.73-0.75 at 16 MB. From 4 MB
    instead, BERT-base at batch 16 (2 threads) measured 1-2.5% slower: 8 MB stays. Where X
    comes from DRAM (prefetch_x_bytes()) outputs from half this size on stream too (and
    those of unstaged layers, see _emit_finish): X passing through the L3 evicts them before
    they could be read. 3072x768 at 2048 tokens (X 25 MB, Y 6 MB), one thread, same process:
    98% -3%, 90% -3.4%; followed by a 768x768 layer reading Y, the pair 98% -4%, 90% -0.6%;
    by a 768x3072 one, 98% -1%, 90% +1%."""
    return last_level_cache_bytes() // 4


def prefetch_x_bytes() -> int:
    """Inputs of a call from this size on are prefetched a K-block ahead (LAYOUT_PREFETCH_X):
    half the last-level cache (X then comes from DRAM; at 6 MB, in the L3, it cost 3-4%)."""
    return last_level_cache_bytes() // 2


def _new_out(m: int, n: int) -> tuple[np.ndarray, int]:
    """An uninitialised [m, n] float32 output and its address; 64-byte aligned unless small."""
    count = m * n
    if count * 4 <= _SMALL_OUT_BYTES:
        out = np.empty((m, n), _F32)
        return out, _addr(out)
    buf = np.empty(count + 16, _F32)
    addr = _addr(buf)
    start = (-addr % 64) // 4
    return buf[start : start + count].reshape(m, n), addr + 4 * start


def _fast_args(name, k, n, x, out, num_threads):
    """(x, out or None, x address, m) after the checks of _check_call, cheaply when the
    arguments are what they should be; the full checks (and their messages) otherwise."""
    if not (type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 2 and x.shape[1] == k
            and x.flags.c_contiguous) or (out is not None and not (
            type(out) is np.ndarray and out.dtype is _F32 and out.shape == (x.shape[0], n)
            and out.flags.c_contiguous and out.flags.writeable)):  # fmt: skip
        x, out = _check_call(name, k, n, x, out)
    if num_threads.__class__ is not int or num_threads < 1:
        if not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
            raise InvalidInputError(
                f"{name}: num_threads must be a positive int, got {num_threads!r}"
            )
    return x, out


def _split_rows(row_nnz: np.ndarray, parts: int, align: int) -> list[tuple[int, int]]:
    """Split rows 0..N into <= parts contiguous ranges of about equal cost (nonzeros, plus a
    little per row for the epilogue and store), with boundaries at multiples of `align`."""
    n = len(row_nnz)
    if parts <= 1 or n <= align:
        return [(0, n)]
    cost = np.cumsum(row_nnz.astype(np.float64) + 4.0)
    total = cost[-1]
    bounds = [0]
    for p in range(1, parts):
        target = total * p / parts
        i = int(np.searchsorted(cost, target))  # rows 0..i inclusive reach the target
        i = round((i + 1) / align) * align
        i = min(max(i, bounds[-1]), n)
        bounds.append(i)
    bounds.append(n)
    ranges = [(s, e) for s, e in itertools.pairwise(bounds) if e > s]
    return ranges or [(0, n)]


# --------------------------------------------------------------------------------------------
# The kernels
# --------------------------------------------------------------------------------------------


def _kernel_name(kind: str, tile: str, isa: str, has_bias: bool, activation: str) -> str:
    name = f"f32_{kind}_{tile}_{isa}" if tile else f"f32_{kind}_{isa}"
    if has_bias:
        name += "_bias"
    if activation != "none":
        name += f"_{activation}"
    return name


# columns of Y gathered in the staging buffer before they are copied out
_STAGE_COLS = 256
# The panel kernel reads its layer's shape from the first _SHAPE_HEADER int32 of its index
# argument (then the CSR's index), so that one compiled kernel serves layers of every shape.
_SHAPE_FIELDS = ("K", "N", "KB", "n_blocks", "block_stride", "n_groups", "slab_rows")
_SHAPE_HEADER = 8  # (32 bytes: the CSR's index stays 16-byte aligned)

# The partial sums of a panel's rows between K-blocks stay in L2 up to this size; beyond it
# (wide layers: 64 tokens x 3072 rows are 768 KB) the rows run in slabs of this size, each
# through all K-blocks, from X's whole K packed once (_emit_panel). The bound measured by
# keeping every slab's partial sums at one place (wrong results, one thread, 2048 tokens):
# 1024x4096 at 90% -9.7%, 768x3072 -5.7%, 98% -2.7%; as well with 1024 rows as with 128.
PARTIAL_SLAB_BYTES = 256 * 1024
# ... while X's whole K packed for a panel is at most this size
SLAB_PACKED_BYTES = 512 * 1024


def _slab_rows(k: int, n: int, tn: int, n_blocks: int, unit: int) -> int:
    """Rows of a slab (a multiple of unit), or 0: all rows at once (see PARTIAL_SLAB_BYTES)."""
    if n_blocks == 1 or 4 * tn * _round_up(n, unit) <= PARTIAL_SLAB_BYTES:
        return 0
    if 4 * tn * k > SLAB_PACKED_BYTES:
        return 0
    return max(unit, PARTIAL_SLAB_BYTES // (4 * tn) // unit * unit)


def _row_sets(n: int, rows: int = 16) -> int:
    """How many sets of a 64-set L1 (64-byte lines: 48 KB 12-way, 32 KB 8-way) the same
    column of `rows` consecutive rows of N floats falls in. 1 for N = 3072 (12 KB stride: a
    tile's stores all thrash one set; staging gains 12-14%), 4 for N = 768 (no gain: -3%)."""
    if (4 * n) % 64:
        return rows  # rows shift by part of a line: spread
    step = (4 * n // 64) % 64
    return min(rows, 64 // math.gcd(step, 64)) if step else 1


_code_cache = jit.CompiledOnce()


def _compiled_code(key, name):
    """(JIT module, C function, helper modules) of one panel-kernel specialisation, compiled
    once per process (or loaded from the on-disk cache): the code depends on the tiling, ISA,
    epilogue and structure (staged stores, one K-block) only, not on the weights or the shape
    (both passed as data), so layers of every shape with the same epilogue share it."""

    def build():
        (nv, group_rows, sort_span, shared, wide, staged, one_block, last_span, activation,
         has_bias, target) = key  # fmt: skip
        # helpers first: the kernel's code calls them by name
        kinds = ("pack", "store_block") + (("copy_rows",) if staged else ())
        helpers = [_helper(kind, target, activation, has_bias)[0] for kind in kinds]

        def emit():
            module = jit.new_module(name, target)
            _SpmmEmitter(module, name, target, activation, has_bias, nv, group_rows, shared,
                         staged, one_block, sort_span, wide, last_span).emit()  # fmt: skip
            return module

        jm = jit.cached_module(_code_key("spmm", name, key[:-1], _target_key(target)), target,
                               emit)  # fmt: skip
        return jm, _CTYPES_SIG(jm.function_address(name)), tuple(helpers)

    return _code_cache.get(key, build)


def _compiled_spmv(key, name):
    """(JIT module, C function) of the SpMV kernel of (activation, bias, target)."""

    def build():
        _, activation, has_bias, target = key

        def emit():
            module = jit.new_module(name, target)
            _SpmvEmitter(module, name, target, activation, has_bias).emit()
            return module

        jm = jit.cached_module(_code_key("spmv", name, key[:-1], _target_key(target)), target,
                               emit)  # fmt: skip
        return jm, _SPMV_SIG(jm.function_address(name))

    return _code_cache.get(key, build)


def clear_code_cache() -> None:
    """Forget compiled kernels (kernels already built keep theirs alive)."""
    _code_cache.clear()


# The SpMV kernel serves M <= SPMV_MAX_M on AVX-512 (measured crossover with the panel kernel,
# see bench/kernels.py); 0 switches it off.
SPMV_MAX_M = 8


def _weight_digest(weight: np.ndarray) -> str:
    return kcache.digest(weight)


class SparseLinearKernel:
    """Y = act(X @ W + b) with W sparse, as generated native code. Call it: kernel(x).

    cache_hit: the kernel's arrays and code came from the on-disk kernel cache (or the code
    from this process's), so creating it ran neither LLVM nor the CSR build."""

    holds_weight = True  # its grouped CSR: the node's dense weight may be dropped
    weight_format = "compressed"

    def __init__(self, weight, bias, activation, target: Target, tuning: SpmmTuning,
                 use_cache: bool | None = None, nonzeros: int | None = None):  # fmt: skip
        t_start = time.perf_counter()
        k, n = weight.shape
        self.in_features = int(k)
        self.out_features = int(n)
        self.activation = activation
        self.target = target
        self.tuning = tuning
        V = target.vector_width
        nonzeros = nonzero_count(weight) if nonzeros is None else nonzeros
        density = nonzeros / max(weight.size, 1)
        # a group's accumulators nv * R (+ broadcasts) must fit the registers: 32 zmm, 16 ymm
        regs = 32 if target.isa == "avx512" else 16
        shares: dict[int, bool] = {}

        def shared_rows_for(nv: int) -> int:
            """R of the shared-rows variant (weights pruned in blocks of R outputs sharing
            their inputs: groups of R rows that load each panel row once for all of them; R *
            nv accumulators, nv panel vectors and R weights in registers), or 0."""
            for r in (4, 2):
                if tuning.use_shared and r * nv + nv + r <= regs and V % r == 0:
                    if r not in shares:
                        shares[r] = _shares_rows(weight, r)
                    if shares[r]:
                        return r
            return 0

        plan_nv, block_bytes, most = tuning.panel_plan(density, target.isa, k)
        if most > _MAX_K_BLOCK and shared_rows_for(max(1, min(8, plan_nv))):
            # the shared-rows quads keep 8-bit k: their weights take the default panels
            plan_nv, most = tuning.vectors_per_panel, _MAX_K_BLOCK
            block_bytes = tuning.block_bytes_for(density)
        nv = max(1, min(8, plan_nv))
        self.tile_tokens = nv * V
        kb, n_blocks = _k_blocking(k, V, self.tile_tokens, block_bytes, most)
        row_bytes = 4 * self.tile_tokens
        group_rows = 1
        most_rows = tuning.group_rows if n_blocks > 1 else min(tuning.group_rows, 2)
        for r in (4, 2):
            if r <= most_rows and r * nv <= regs - 4 and V % r == 0:
                group_rows = r
                break
        shared_r = shared_rows_for(nv)
        shared = shared_r > 0
        if shared:
            group_rows = shared_r
        self.shared_rows = group_rows if shared else 1
        # rows sorted by count together (_CsrBlocks): S past one tile when K-blocks keep the
        # partial sums of every row anyway
        span, last_span = max(V, _round_up(tuning.sort_span, V)), 0
        if not shared:
            span, last_span = _row_spans(weight, kb, n_blocks, V, span, group_rows, nonzeros)
            if n_blocks == 1 and last_span and tuning.group_rows >= 4 and 4 * nv <= regs - 4:
                # one K-block sorted within spans, not tiles: groups of four (see group_rows)
                group_rows = 4
        sort_span = V if shared or (n_blocks == 1 and not last_span) else span
        stride = _csr_block_stride(n, sort_span, group_rows)
        wide = not shared and kb > _MAX_K_BLOCK  # (as _CsrBlocks.wide)
        # a tail panel's tokens past M read the code's zero page, one block long at most
        if kb > (_MAX_WIDE_K_BLOCK if wide else _MAX_K_BLOCK):
            raise CompileError(f"K-block of {kb} columns exceeds the zero page")
        self._has_bias = bias is not None
        # stage output tiles when Y's row stride would thrash L1 sets (see _emit_staged_store)
        self._stage_cols = _STAGE_COLS if (n >= 2 * _STAGE_COLS and _row_sets(n) <= 2) else 0
        key = (nv, group_rows, sort_span, shared, wide, bool(self._stage_cols), n_blocks == 1,
               last_span, activation, bias is not None, target)  # fmt: skip
        code_known = key in _code_cache
        self.spmv_max_m = SPMV_MAX_M if target.isa == "avx512" else 0
        if not code_known:
            # the code this kernel shares with others but its panel code, compiled beside the
            # CSR build and the panel code (a first layer: 213-244 -> 143-147 ms, see
            # codegen/README.md)
            for kind in ("store_block", "copy_rows") if self._stage_cols else ("store_block",):
                jit.in_background(_helper, kind, target, activation, bias is not None)
            if self.spmv_max_m:
                jit.in_background(self._spmv_compiled)
            jit.in_background(pyentry.available)
        self._use_cache = kcache.enabled() if use_cache is None else bool(use_cache)
        self._data_key = None
        if self._use_cache:
            self._data_key = kcache.digest("spmm-data", kcache.code_version(), kb, n_blocks,
                                           row_bytes, V, sort_span, last_span, group_rows,
                                           shared, _weight_digest(weight))  # fmt: skip
        data = None
        qty = _quad_type(group_rows, shared, wide)
        if self._data_key is not None:
            data = kcache.load_arrays(self._data_key, {"index": np.int32, "entries": np.uint8,
                                                       "row_nnz": np.int64})  # fmt: skip
            if data is not None and not (
                data["index"].shape == (n_blocks * stride,) and data["row_nnz"].shape == (n,)
                and len(data["entries"]) % qty.itemsize == 0
                and len(data["entries"]) // qty.itemsize * 4 * (group_rows if shared else 1)
                >= int(data["row_nnz"].sum())
            ):  # fmt: skip
                data = None
        data_hit = data is not None
        if data_hit:
            self._csr = _CsrBlocks(kb, n_blocks, np.ascontiguousarray(data["index"]),
                                   np.ascontiguousarray(data["entries"]), data["row_nnz"],
                                   row_bytes, group_rows, V, shared, sort_span,
                                   last_span)  # fmt: skip
            self._spmv_arrays = {
                name[5:]: a for name, a in data.items() if name.startswith("spmv_")
            }
        else:
            # panels of every width keep the full panel's row stride, so that the byte offsets
            # in the entries serve them all
            if shared:
                self._csr = _build_shared_csr(weight, kb, n_blocks, row_bytes, V, group_rows)
            else:
                self._csr = _build_csr(weight, kb, n_blocks, row_bytes, V, group_rows, sort_span,
                                       last_span)  # fmt: skip
            self._spmv_arrays = {}
            if self._data_key is not None:
                kcache.store_arrays(self._data_key, self._csr_arrays())
        self.nnz = int(self._csr.row_nnz.sum())
        self.sparsity = 1.0 - self.nnz / (k * n) if k * n else 1.0
        self.name = _kernel_name(
            "spmm", f"csr_{self.tile_tokens}x1", target.isa, bias is not None, activation
        )
        # bias padded to whole vectors: the epilogue loads bias[o:o+V] for every tile
        self._bias = np.zeros(_round_up(max(n, 1), max(V, SPMV_LANES)), np.float32)
        if bias is not None:
            self._bias[:n] = bias
        self._jit, self._fn, self._helpers = _compiled_code(key, self.name)
        self._fn_addr = _fn_address(self._fn)
        self.cache_hit = bool(data_hit and (code_known or self._jit.from_cache))
        # the kernel's index: the layer's shape (_SHAPE_FIELDS), then the CSR's index
        self._slab_rows = _slab_rows(k, n, self.tile_tokens, n_blocks, self._csr.sort_unit)
        header = [k, n, kb, n_blocks, stride, self._csr.n_groups, self._slab_rows]
        self._kernel_index = np.concatenate(
            [np.array(header + [0] * (_SHAPE_HEADER - len(header)), np.int32), self._csr.index]
        )
        self._csr.index = self._kernel_index[_SHAPE_HEADER:]  # (a view: held once)
        self._ptrs = (
            self._kernel_index.ctypes.data,
            self._csr.entries.ctypes.data,
            self._bias.ctypes.data,
        )
        self._scratch_full = self._scratch_floats(n)
        self._splits: dict[int, list[tuple[int, int]]] = {}
        self._token_plans: dict[tuple, tuple] = {}
        # the SpMV variant (M <= spmv_max_m): its code now (no LLVM while running), its steps
        # on first use (from the cache entry if there)
        self._spmv = None
        self._spmv_lock = threading.Lock()
        if self.spmv_max_m:
            self._spmv_code = self._spmv_compiled()
            self.cache_hit = self.cache_hit and (code_known or self._spmv_code[0].from_cache)
        self._entry = self._entry_point()
        self.compile_seconds = time.perf_counter() - t_start

    @property
    def k_block(self) -> int:
        return self._csr.k_block

    @property
    def llvm_ir(self) -> str:
        """Optimised IR of the kernel, then of the shared helpers it calls by address."""
        parts = [self._jit.llvm_ir] + [
            f"; ---- helper called by address ----\n{h.llvm_ir}" for h in self._helpers
        ]
        return "\n".join(parts)

    @property
    def asm(self) -> str:
        """Machine code of the kernel, then of the shared helpers it calls by address."""
        parts = [self._jit.asm] + [
            f"# ---- helper called by address ----\n{h.asm}" for h in self._helpers
        ]
        return "\n".join(parts)

    def _scratch_floats(self, rows: int) -> int:
        tn = self.tile_tokens
        stage = tn * _SpmmEmitter.STAGE_STRIDE if self._stage_cols else 0  # (see _emit_panel)
        if self._csr.n_blocks == 1:  # the partial sums of one unit of the last block's rows
            return self._csr.k_block * tn + self._csr.last_unit * tn + stage
        if 0 < self._slab_rows < rows:  # X's whole K, the partial sums of a slab
            return self.in_features * tn + self._slab_rows * tn + stage
        return self._csr.k_block * tn + _round_up(rows, self._csr.sort_unit) * tn + stage

    # -- the native entry point (codegen/pyentry.py) -----------------------------------------

    def _entry_point(self):
        """The kernel's native entry point, or None (not available in this process): its
        scratch holds the panel kernel's or the SpMV kernel's, then the probe of a call."""
        spmv = max(_SPMV_GROUPS) * _round_up(max(self.in_features, 1), SPMV_CHUNK) + 64
        self._entry_floats = max(self._scratch_full, spmv if self.spmv_max_m else 0) + 16
        self._entry_keys: set = set()
        if not (self.in_features and self.out_features and pyentry.available()):
            return None
        return pyentry.SpmmEntry(self.in_features, self.out_features, self._fn_addr,
                                 self._ptrs, 4 * (self._entry_floats - 16), self.spmv_max_m,
                                 (self._kernel_index, self._csr.entries, self._bias, self._jit))  # fmt: skip

    def forget_plans(self) -> None:
        """Plan calls afresh (for tests and benchmarks that change what plans depend on, such
        as stream_out_bytes): the Python path's plans and the entry point's table, which only
        fills, replaced by a new entry point (its SpMV state set again)."""
        self._token_plans.clear()
        self._entry = self._entry_point()
        if self._spmv is not None:
            self._teach_entry_spmv()

    def _teach_entry_spmv(self) -> None:
        """Give the entry point the SpMV state (self._spmv, built)."""
        fn, _, n_slices, _, _, jm, _, params = self._spmv
        if self._entry is not None:
            self._entry.set_spmv(_fn_address(fn), params.ctypes.data, n_slices, (self._spmv, jm))

    def _entry_takes(self, num_threads) -> bool:
        """Whether the entry point will run calls with num_threads of a shape not planned yet."""
        entry = self._entry
        return entry is not None and not entry.full and type(num_threads) is int

    def _add_entry_plan(self, key, m: int, num_threads: int, plan) -> None:
        """Teach the entry point a call shape the Python path has just planned (once: with the
        table full, or a num_threads it does not take, the shape is not tried again)."""
        threads, tasks, dispatch, layout = plan
        if not self._entry_takes(num_threads):
            pass
        elif threads == 1:
            self._entry.add_plan(m, num_threads, layout)
        elif dispatch is not None:  # (without the native pool the Python path splits it)
            prepared = dispatch.native_copy()
            if prepared is None:
                return  # (the pool was busy: the next call of this shape tries again)
            offsets = [(xo, yo) for xo, _, yo, _, _ in tasks]
            self._entry.add_plan(m, num_threads, layout, offsets, prepared, columns=(0, 2, 9))
        self._entry_keys.add(key)

    def _add_entry_spmv_plan(self, key, m: int, num_threads: int, spans) -> None:
        """Teach the entry point how the Python path splits an SpMV call over threads (once)."""
        if not self._entry_takes(num_threads):
            pass
        elif not spans:
            self._entry.add_plan(m, num_threads)  # (one thread after all)
        elif native_pool_active():  # (else the Python path splits the call)
            from sparsednn.runtime.native_pool import PreparedDispatch

            fn, ptrs, _, scratch = self._spmv_state()[:4]
            rows = [(0, m, 0, s, e, *ptrs, 0) for s, e in spans]
            prepared = PreparedDispatch(_fn_address(fn), _SPMV_KINDS, rows, len(_SPMV_KINDS) - 1,
                                        scratch).native_copy()  # fmt: skip
            if prepared is None:
                return  # (the pool was busy: the next call of this shape tries again)
            self._entry.add_plan(m, num_threads, 0, [(0, 0)] * len(rows), prepared,
                                 columns=(0, 2, None))  # fmt: skip
        self._entry_keys.add(key)

    # -- the SpMV variant (few tokens) --------------------------------------------------------

    def dense_weight(self) -> np.ndarray:
        """The weight [K, N] rebuilt from the kernel's arrays (the kernel keeps no dense copy)."""
        dense = np.zeros((self.in_features, self.out_features), np.float32)
        o, k, w = self._csr.triplets()
        dense[k, o] = w
        return dense

    def _csr_arrays(self) -> dict:
        csr = self._csr
        return {"index": csr.index, "entries": csr.entries, "row_nnz": csr.row_nnz}

    def _spmv_compiled(self):
        name = _kernel_name("spmv", f"{SPMV_LANES}x{SPMV_CHUNK}", self.target.isa,
                            self._has_bias, self.activation)  # fmt: skip
        return _compiled_spmv(("spmv", self.activation, self._has_bias, self.target), name)

    def _spmv_state(self):
        sp = self._spmv
        if sp is not None:
            return sp
        with self._spmv_lock:
            if self._spmv is not None:
                return self._spmv
            arrays = self._spmv_arrays
            if {"slice_ptr", "idx", "val", "off", "perm"} <= arrays.keys():
                layout = _SpmvLayout(np.ascontiguousarray(arrays["slice_ptr"], np.int32),
                                     _aligned_copy(arrays["idx"]), _aligned_copy(arrays["val"]),
                                     np.ascontiguousarray(arrays["off"], np.int32),
                                     np.ascontiguousarray(arrays["perm"], np.int32))  # fmt: skip
            else:
                layout = _build_spmv(
                    *self._csr.triplets(), self.out_features, self.in_features, _SPMV_UNROLL
                )
                if self._data_key is not None:  # add the layout to the layer's cache entry
                    kcache.store_arrays(self._data_key, {
                        **self._csr_arrays(), "spmv_slice_ptr": layout.slice_ptr,
                        "spmv_idx": layout.idx, "spmv_val": layout.val, "spmv_off": layout.off,
                        "spmv_perm": layout.perm,
                    })  # fmt: skip
            jm, fn = self._spmv_code
            n_slices = len(layout.slice_ptr) - 1
            kp = _round_up(max(self.in_features, 1), SPMV_CHUNK)
            bias = np.zeros(len(layout.perm), np.float32)  # in lane order
            valid = layout.perm >= 0
            bias[valid] = self._bias[layout.perm[valid]]
            params = np.array([layout.slice_ptr.ctypes.data, layout.idx.ctypes.data,
                               layout.val.ctypes.data, layout.off.ctypes.data,
                               layout.perm.ctypes.data, bias.ctypes.data, self.in_features,
                               self.out_features], np.int64)  # fmt: skip
            ptrs = (params.ctypes.data,)
            self._spmv = sp = (fn, ptrs, n_slices, max(_SPMV_GROUPS) * kp + 64, layout, jm, bias,
                               params)  # fmt: skip
            self._teach_entry_spmv()
            return sp

    @property
    def spmv_layout(self) -> _SpmvLayout:
        return self._spmv_state()[4]

    # -- running ------------------------------------------------------------------------------

    # Handing work to another thread costs tens of microseconds (measured ~40 us through
    # parallel_for); one thread takes about 0.35 ns + 0.3 ns per vector of a panel for each
    # nonzero (AVX-512, 90% sparse BERT shapes). A second thread measured break-even at
    # ~180 us of work (768x768, M=128), so each extra thread needs 100 us of estimated work.
    _NS_PER_NZ_PANEL = 0.35
    _NS_PER_NZ_VECTOR = 0.3
    _NS_PER_SPMV_STEP = 0.75  # per step of the SpMV layout and token
    _NS_PER_EXTRA_THREAD = 100_000
    # With the native pool (runtime.native_pool, ~1-3 us per dispatch) two threads measured
    # faster from ~24 us of estimated work (768x768 at M=8: 1.22x; at M=4, 22 us: 0.93x).
    _NS_PER_EXTRA_THREAD_NATIVE = 12_000
    # The SpMV variant split by slices: 2 threads measured 1.05-1.13x from ~7 us of estimated
    # work (768x768 at 80% and M = 1: 1.05x; 768x3072 at 98%, 6.9 us: 1.11x; 4.5 us: 0.87x).
    _NS_PER_EXTRA_SPMV_THREAD_NATIVE = 7_000
    # ... and through the kernel's native entry point (codegen/pyentry.py), which dispatches
    # in ~1 us with no Python (stop 17, one thread against two, alternating in one process,
    # the workers spinning as in a run): panels faster on two from ~5 us of work (768x768 at
    # 98%, M = 9: 8.7 -> 5.0 us), SpMV from ~0.8 us estimated (768x768 at 99.5%, M = 1: 1.44
    # -> 1.20 us; at 95%, 3.2 -> 2.1 us; 256x256 at 98%, 0.2 us estimated: 0.70 -> 0.72 us).
    _NS_PER_EXTRA_THREAD_ENTRY = 1_500
    _NS_PER_EXTRA_SPMV_THREAD_ENTRY = 400

    def _estimate_ns(self, m: int) -> float:
        V, tn = self.target.vector_width, self.tile_tokens
        panels = -(-m // tn)
        vectors = (m // tn) * (tn // V) + -(-(m % tn) // V)
        return self.nnz * (panels * self._NS_PER_NZ_PANEL + vectors * self._NS_PER_NZ_VECTOR)

    def _useful_threads(self, m: int, num_threads: int, est_ns: float | None = None,
                        per_native: float | None = None) -> int:  # fmt: skip
        """As many threads as asked, but only as many as the work pays for."""
        if num_threads <= 1 or self._NS_PER_EXTRA_THREAD <= 0:
            return max(1, num_threads)
        if est_ns is None:
            est_ns = self._estimate_ns(m)
        per = self._NS_PER_EXTRA_THREAD
        if native_pool_active():
            per = min(per, per_native or (self._NS_PER_EXTRA_THREAD_ENTRY
                                          if self._entry_takes(num_threads)
                                          else self._NS_PER_EXTRA_THREAD_NATIVE))  # fmt: skip
        return max(1, min(num_threads, int(est_ns // per)))

    def _token_plan(self, m: int, num_threads: int) -> tuple:
        """(threads, tasks, dispatch, layout) of a call with m rows. tasks: (x offset, tokens,
        y offset, first row, end row) of each thread's call: with enough panels the threads
        split the tokens (each packs only its own panels) at multiples of V, else the rows.
        dispatch: the native pool's PreparedDispatch of those calls (None without the pool),
        the addresses of X, Y and the probes written per call. _run keeps plans per (m,
        num_threads, native pool on): the calls of a batch shape repeat them. layout:
        LAYOUT_PREFETCH_ENTRIES, with LAYOUT_PREFETCH_X for inputs of prefetch_x_bytes() or
        more, and LAYOUT_STREAM_OUT for outputs of stream_out_bytes() or more (half that with
        LAYOUT_PREFETCH_X)."""
        threads = self._useful_threads(m, num_threads) if num_threads > 1 else 1
        if len(self._token_plans) > 256:  # (many distinct batch shapes: start over)
            self._token_plans.clear()
        layout = LAYOUT_PREFETCH_ENTRIES
        x_bytes, y_bytes = 4 * m * self.in_features, 4 * m * self.out_features
        if x_bytes >= prefetch_x_bytes():
            layout |= LAYOUT_PREFETCH_X
        if y_bytes >= stream_out_bytes() or (layout & LAYOUT_PREFETCH_X
                                             and y_bytes >= stream_out_bytes() // 2):  # fmt: skip
            layout |= LAYOUT_STREAM_OUT
        if threads == 1:
            return 1, (), None, layout
        k, n = self.in_features, self.out_features
        tn, V = self.tile_tokens, self.target.vector_width
        if m >= tn * threads:
            bounds = [min(m, round(m * i / threads / V) * V) for i in range(threads)] + [m]
            tasks = tuple((4 * k * t0, t1 - t0, 4 * n * t0, 0, n)
                          for t0, t1 in itertools.pairwise(bounds) if t1 > t0)  # fmt: skip
            floats = self._scratch_full
        else:
            tasks = tuple((0, m, 0, s, e) for s, e in self.row_ranges(threads))
            floats = max(self._scratch_floats(e - s) for _, _, _, s, e in tasks)
        dispatch = None
        if native_pool_active():
            from sparsednn.runtime.native_pool import PreparedDispatch

            rows = [(0, tokens, 0, s, e, *self._ptrs, 0, 0, layout)
                    for _, tokens, _, s, e in tasks]  # fmt: skip
            dispatch = PreparedDispatch(self._fn_addr, _KERNEL_KINDS, rows, 8, floats,
                                        varying=(0, 2, 9))  # fmt: skip
        return threads, tasks, dispatch, layout

    def row_ranges(self, num_threads: int) -> list[tuple[int, int]]:
        """Output rows of each thread, balanced by nonzeros."""
        r = self._splits.get(num_threads)
        if r is None:
            r = _split_rows(self._csr.row_nnz, num_threads, self._csr.sort_unit)
            self._splits[num_threads] = r
        return r

    def __call__(
        self, x: np.ndarray, out: np.ndarray | None = None, num_threads: int = 1
    ) -> np.ndarray:
        entry = self._entry  # the native entry point runs the call shapes it knows
        if entry is not None:
            if out is None:
                out = self._new_output(x)
            if out is not None and entry.call(x, out, num_threads,
                                              thread_scratch(self._entry_floats)) is not None:  # fmt: skip
                return out
        # One thread and a few tokens: the SpMV call without the general path's layers (it
        # takes ~5 us at M = 1, where those cost ~1 us); a given output only when it is what
        # the full checks would accept, and apart from x.
        spmv = self._spmv
        if (num_threads == 1 and spmv is not None and type(x) is np.ndarray
                and x.dtype is _F32 and x.ndim == 2 and 0 < x.shape[0] <= self.spmv_max_m
                and x.shape[1] == self.in_features and x.flags.c_contiguous):  # fmt: skip
            m = x.shape[0]
            xa = _addr(x)
            if out is None:
                y = np.empty((m, self.out_features), _F32)
                ya = _addressof(_from_buffer(y))
            elif (type(out) is np.ndarray and out.dtype is _F32
                  and out.shape == (m, self.out_features) and out.flags.c_contiguous
                  and out.flags.writeable):  # fmt: skip
                y, ya = out, _addr(out)
                if ya < xa + x.nbytes and xa < ya + y.nbytes:  # overlap: the full checks say
                    return self._run(x, out, num_threads)[0]
            else:
                return self._run(x, out, num_threads)[0]
            fn, ptrs, n_slices, scratch = spmv[:4]
            fn(xa, m, ya, 0, n_slices, *ptrs, thread_scratch(scratch))
            return y
        return self._run(x, out, num_threads)[0]

    def call_and_probe(
        self, x: np.ndarray, out: np.ndarray | None = None, num_threads: int = 1
    ) -> tuple[np.ndarray, bool | None]:
        """(the product, whether X held a NaN or an infinity): the panel kernel finds out while
        packing X, for free; None when the call did not look (the SpMV variant, M <= 8)."""
        entry = self._entry
        if entry is not None:
            if out is None:
                out = self._new_output(x)
            if out is not None:
                ran = entry.call(x, out, num_threads, thread_scratch(self._entry_floats))
                if ran is not None:
                    return out, (None if ran == 2 else ran == 0)
        y, probe = self._run(x, out, num_threads)
        # (a task's probe is NaN when its part of X was not finite; a list beats numpy here)
        return y, (None if probe is None else any(map(math.isnan, probe.tolist())))

    def _new_output(self, x) -> np.ndarray | None:
        """A new output for x when x looks like a valid input (else None: the checks say why)."""
        if (type(x) is np.ndarray and x.dtype is _F32 and x.ndim == 2 and x.shape[0]
                and x.shape[1] == self.in_features):  # fmt: skip
            return _new_out(x.shape[0], self.out_features)[0]
        return None

    def _run(self, x, out, num_threads) -> tuple[np.ndarray, np.ndarray | None]:
        k, n = self.in_features, self.out_features
        x, out = _fast_args(self.name, k, n, x, out, num_threads)
        m = x.shape[0]
        if m == 0 or n == 0:
            return (np.empty((m, n), _F32) if out is None else out), None
        x_addr = _addr(x)
        if out is None:
            out, y_addr = _new_out(m, n)
        else:
            y_addr = _addr(out)
            if x_addr < y_addr + 4 * m * n and y_addr < x_addr + 4 * m * k:
                raise InvalidInputError(f"{self.name}: out must not overlap the input")
        if m <= self.spmv_max_m:
            self._run_spmv(x_addr, m, y_addr, num_threads)
            return out, None
        plan_key = (m, num_threads, num_threads > 1 and native_pool_active())
        plan = self._token_plans.get(plan_key)
        if plan is None:
            plan = self._token_plans[plan_key] = self._token_plan(m, num_threads)
        if self._entry is not None and plan_key not in self._entry_keys:
            self._add_entry_plan(plan_key, m, num_threads, plan)
        threads, tasks, dispatch, layout = plan
        probe = np.empty(threads, _F32)  # one per task
        p_addr = _addr(probe)
        if threads == 1:
            self._fn(x_addr, m, y_addr, 0, n, *self._ptrs, thread_scratch(self._scratch_full),
                     p_addr, layout)  # fmt: skip
            return out, probe
        used = probe[: len(tasks)]
        if dispatch is not None and dispatch.run(
            [v for i, (xo, _, yo, _, _) in enumerate(tasks)
             for v in (x_addr + xo, y_addr + yo, p_addr + 4 * i)]
        ):  # fmt: skip
            return out, used
        fn, ptrs = self._fn, self._ptrs
        parallel_for([
            (lambda xo=xo, tokens=tokens, yo=yo, s=s, e=e, i=i: fn(
                x_addr + xo, tokens, y_addr + yo, s, e, *ptrs,
                thread_scratch(self._scratch_floats(e - s)), p_addr + 4 * i, layout))
            for i, (xo, tokens, yo, s, e) in enumerate(tasks)
        ])  # fmt: skip
        return out, used

    def _run_spmv(self, x_addr: int, m: int, y_addr: int, num_threads: int) -> None:
        fn, ptrs, n_slices, scratch, layout = (self._spmv or self._spmv_state())[:5]
        spans = None
        if num_threads > 1:  # (the split of a call shape is kept: numpy per call costs ~5 us)
            plan_key = ("spmv", m, num_threads, native_pool_active())
            spans = self._token_plans.get(plan_key)
            if spans is None:
                spans = self._token_plans[plan_key] = self._spmv_plan(m, num_threads)
            if self._entry is not None and plan_key not in self._entry_keys:
                self._add_entry_spmv_plan(plan_key, m, num_threads, spans)
        if not spans:
            fn(x_addr, m, y_addr, 0, n_slices, *ptrs, thread_scratch(scratch))
            return
        rows = [(x_addr, m, y_addr, s, e, *ptrs, 0) for s, e in spans]
        if parallel_native(_fn_address(fn), _SPMV_KINDS, rows, len(_SPMV_KINDS) - 1, scratch):
            return
        parallel_for([
            (lambda s=s, e=e: fn(x_addr, m, y_addr, s, e, *ptrs, thread_scratch(scratch)))
            for s, e in spans
        ])  # fmt: skip

    def _spmv_plan(self, m: int, num_threads: int) -> tuple:
        """Slice spans of the threads of an SpMV call with m tokens (balanced by steps), or ()
        for one thread."""
        state = self._spmv_state()
        n_slices, layout = state[2], state[4]
        est = layout.steps * m * self._NS_PER_SPMV_STEP
        per_native = (self._NS_PER_EXTRA_SPMV_THREAD_ENTRY if self._entry_takes(num_threads)
                      else self._NS_PER_EXTRA_SPMV_THREAD_NATIVE)  # fmt: skip
        threads = min(self._useful_threads(m, num_threads, est, per_native), n_slices)
        if threads <= 1:
            return ()
        cost = layout.slice_ptr[1:].astype(np.float64) + 2.0 * np.arange(1, n_slices + 1)
        cuts = [0] + [int(np.searchsorted(cost, cost[-1] * i / threads)) for i in
                      range(1, threads)] + [n_slices]  # fmt: skip
        if len(self._token_plans) > 256:
            self._token_plans.clear()
        return tuple((s, e) for s, e in itertools.pairwise(cuts) if e > s)

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} K={self.in_features} N={self.out_features} "
                f"nnz={self.nnz} sparsity={self.sparsity:.3f}>")  # fmt: skip


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    out = _aligned_empty(a.size, a.dtype)
    out[:] = a.reshape(-1)
    return out


def compile_sparse_linear(weight: np.ndarray, bias: np.ndarray | None = None, activation: str = "none",
                          target: Target | None = None, tuning: SpmmTuning | None = None,
                          nonzeros: int | None = None) -> SparseLinearKernel:  # fmt: skip
    """Compile Y = act(X @ weight + bias) for a sparse weight [K, N] into a native kernel.
    nonzeros: the weight's count of nonzeros, if known (not counted again)."""
    weight, bias = _check_weight(weight, bias, activation)
    return SparseLinearKernel(weight, bias, activation, target or host_target(),
                              tuning or DEFAULT_TUNING, nonzeros=nonzeros)  # fmt: skip


_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS = 101, 111
_F32_ONE_BITS = int(np.float32(1.0).view(np.uint32))
_SGEMM_KINDS = "iiiiiifiiiifii"  # cblas_sgemm's arguments, for native_pool.run_kernel
_sgemm_address: list = []


def _cblas_sgemm_address() -> int | None:
    """Address of numpy's OpenBLAS cblas_sgemm (found through threadpoolctl, with its symbol
    prefix and suffix: scipy_cblas_sgemm64_ in numpy's wheels), or None (another BLAS, no
    threadpoolctl): the dense kernel's slices then run through parallel_for."""
    if not _sgemm_address:
        addr = None
        try:
            from threadpoolctl import ThreadpoolController

            for lc in ThreadpoolController().select(internal_api="openblas").lib_controllers:
                name = f"{getattr(lc, '_symbol_prefix', '')}cblas_sgemm"
                name += getattr(lc, "_symbol_suffix", "")
                fn = getattr(ctypes.CDLL(lc.filepath), name, None)
                if fn is not None:
                    addr = ctypes.cast(fn, ctypes.c_void_p).value
                    break
        except Exception:  # no threadpoolctl, or a library it cannot read: no native path
            addr = None
        _sgemm_address.append(addr)
    return _sgemm_address[0]


class DenseLinearKernel:
    """Y = act(X @ W + b) for layers too dense for the sparse kernel: generated code over the
    weight packed once, bias and activation fused (codegen/gemm.py), on AVX-512 and AVX2; else
    BLAS (numpy) and a native bias/activation epilogue. Same interface as SparseLinearKernel."""

    def __init__(self, weight, bias, activation, target: Target):
        t_start = time.perf_counter()
        k, n = weight.shape
        self.in_features = int(k)
        self.out_features = int(n)
        self.activation = activation
        self.target = target
        self.weight = np.ascontiguousarray(weight, dtype=np.float32)
        self.bias = bias
        self.nnz = int(np.count_nonzero(self.weight))
        self.sparsity = 1.0 - self.nnz / (k * n) if k * n else 1.0
        self._epilogue = None
        self._gemm = None
        self.holds_weight = False  # (True: the node's weight may be dropped, see lowering.py)
        self.weight_format = "packed"
        if gemm.supported(target):  # generated code, the weight packed once (codegen/gemm.py)
            self._gemm = gemm.PackedGemm(self.weight, bias, activation, target)
            self.weight = None  # the packed copy is the only one kept
            self.holds_weight = True
            self.name = _kernel_name("gemm", "packed", target.isa, bias is not None, activation)
            self.cache_hit = self._gemm.module.from_cache
        else:  # BLAS, and a compiled epilogue
            self.name = _kernel_name("gemm", "blas", target.isa, bias is not None, activation)
            self.name = self.name.replace(f"_{target.isa}", "")  # BLAS picks its own ISA
            if bias is not None or activation != "none":
                self._epilogue = Epilogue(n, bias is not None, activation, target)
            # nothing to build but the epilogue's code: a "hit" when that needed no LLVM
            self.cache_hit = self._epilogue is None or self._epilogue.cache_hit
        self.compile_seconds = time.perf_counter() - t_start

    def dense_weight(self) -> np.ndarray:
        """W [K, N] (unpacked anew from the packed panels when the code is generated)."""
        return self.weight if self._gemm is None else self._gemm.dense_weight()

    @property
    def llvm_ir(self) -> str:
        if self._gemm is not None:
            return self._gemm.module.llvm_ir
        return self._epilogue.llvm_ir if self._epilogue else "; no epilogue: BLAS only\n"

    @property
    def asm(self) -> str:
        if self._gemm is not None:
            return self._gemm.module.asm
        return self._epilogue.asm if self._epilogue else "# no epilogue: BLAS only\n"

    def _run(self, x, out):
        np.matmul(x, self.weight, out=out)
        if self._epilogue is not None:
            self._epilogue(out, self.bias)

    def _run_cols(self, x, out, c0, c1):
        """Columns c0:c1 of the output: BLAS reads the weight's columns in place (a strided
        view, leading dimension N: no copy)."""
        np.matmul(x, self.weight[:, c0:c1], out=out[:, c0:c1])

    def _run_native(self, x, out, m: int, parts: int) -> bool:
        """The slices as cblas_sgemm calls on the native pool (its workers are the threads that
        run the sparse kernels and spin between them: no Python hand-off, no third thread
        competing for the cores), then the epilogue over row slices. False: not available."""
        sgemm = _cblas_sgemm_address() if native_pool_active() else None
        if sgemm is None:
            return False
        k, n = self.in_features, self.out_features
        x_addr, w_addr, y_addr = x.ctypes.data, self.weight.ctypes.data, out.ctypes.data
        one, zero = _F32_ONE_BITS, 0  # alpha, beta as float32 bits (see native_pool.float_bits)
        head = (_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_NO_TRANS)
        if m > self.COLUMN_SPLIT_MAX_M and m >= 16 * parts:
            rb = [m * i // parts for i in range(parts + 1)]
            rows = [(*head, e - s, n, k, one, x_addr + 4 * s * k, k, w_addr, n, zero,
                     y_addr + 4 * s * n, n) for s, e in itertools.pairwise(rb) if e > s]  # fmt: skip
        else:
            parts = min(parts, max(1, n // 16))
            cb = [min(n, round(n * i / parts / 16) * 16) for i in range(parts)] + [n]
            rows = [(*head, m, e - s, k, one, x_addr, k, w_addr + 4 * s, n, zero,
                     y_addr + 4 * s, n) for s, e in itertools.pairwise(cb) if e > s]  # fmt: skip
        with single_threaded_blas:  # (one BLAS thread per slice, as with parallel_for)
            if not parallel_native(sgemm, _SGEMM_KINDS, rows):
                return False
        ep = self._epilogue
        if ep is not None:
            bias_addr = self.bias.ctypes.data if ep.has_bias else 0
            rb = [m * i // parts for i in range(parts + 1)]
            rows = [(y_addr + 4 * s * n, e - s, bias_addr) for s, e in itertools.pairwise(rb)
                    if e > s]  # fmt: skip
            if not parallel_native(ep.address, "iii", rows):
                ep(out, self.bias)
        return True

    def _epilogue_rows(self, out, s, e):
        self._epilogue(out[s:e], self.bias)

    # A hand-off to another thread costs tens of microseconds: each extra thread needs this
    # much estimated work (BLAS at ~150 GFLOP/s, or streaming W at ~40 GB/s for few rows).
    _NS_PER_EXTRA_THREAD = 100_000
    # up to this many rows threads split W's columns, not X's rows (see __call__)
    COLUMN_SPLIT_MAX_M = 512
    # a column-split call's epilogue (bias, activation) runs on one thread below this size
    PARALLEL_EPILOGUE_MIN = 128 * 1024

    def _useful_threads(self, m: int, num_threads: int) -> int:
        if num_threads <= 1:
            return 1
        k, n = self.in_features, self.out_features
        est_ns = max(2.0 * m * k * n / 150.0, 4.0 * k * n / 40.0)
        return max(1, min(num_threads, int(est_ns // max(self._NS_PER_EXTRA_THREAD, 1))))

    def __call__(
        self, x: np.ndarray, out: np.ndarray | None = None, num_threads: int = 1
    ) -> np.ndarray:
        k, n = self.in_features, self.out_features
        x, out = _fast_args(self.name, k, n, x, out, num_threads)
        m = x.shape[0]
        if out is None:
            out = _new_out(m, n)[0] if m and n else np.empty((m, n), _F32)
        elif m and np.may_share_memory(x, out):
            raise InvalidInputError(f"{self.name}: out must not overlap the input")
        if m == 0 or n == 0:
            return out
        parts = self._useful_threads(m, int(num_threads))
        if self._gemm is not None:
            self._gemm(x, out, parts)
            return out
        if parts <= 1:
            self._run(x, out)
            return out
        if self._run_native(x, out, m, parts):
            return out
        # each slice a single-threaded BLAS call on its own thread (BLAS releases the GIL);
        # numpy's BLAS is held to one thread meanwhile (no oversubscription)
        if m > self.COLUMN_SPLIT_MAX_M and m >= 16 * parts:  # rows of X in equal slices
            bounds = [m * i // parts for i in range(parts + 1)]
            tasks = [(lambda s=s, e=e: self._run(x[s:e], out[s:e]))
                     for s, e in itertools.pairwise(bounds)]  # fmt: skip
            with single_threaded_blas:
                parallel_for(tasks)
            return out
        # few rows: columns of W in slices (multiples of 16), so that each thread streams only
        # its part of W (at batch 1 a model's weights come from DRAM: a row split made every
        # thread read all of W; measured 5-17% faster at M = 128, BERT shapes)
        parts = min(parts, max(1, n // 16))
        bounds = [min(n, round(n * i / parts / 16) * 16) for i in range(parts)] + [n]
        tasks = [(lambda s=s, e=e: self._run_cols(x, out, s, e))
                 for s, e in itertools.pairwise(bounds) if e > s]  # fmt: skip
        with single_threaded_blas:
            parallel_for(tasks)
        if self._epilogue is not None:
            if m * n < self.PARALLEL_EPILOGUE_MIN:
                self._epilogue(out, self.bias)
            else:
                rb = [m * i // parts for i in range(parts + 1)]
                parallel_for([(lambda s=s, e=e: self._epilogue_rows(out, s, e))
                              for s, e in itertools.pairwise(rb) if e > s])  # fmt: skip
        return out

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name} K={self.in_features} N={self.out_features} "
                f"nnz={self.nnz} sparsity={self.sparsity:.3f}>")  # fmt: skip


def compile_dense_linear(weight: np.ndarray, bias: np.ndarray | None = None, activation: str = "none",
                         target: Target | None = None) -> DenseLinearKernel:  # fmt: skip
    """Y = act(X @ weight + bias) with BLAS and a compiled epilogue."""
    weight, bias = _check_weight(weight, bias, activation)
    return DenseLinearKernel(weight, bias, activation, target or host_target())


# compile_linear picks the kernel by the same measured break-even as the session's pass
SPARSE_MIN_SPARSITY = DEFAULT_SPARSE_THRESHOLD


def compile_linear(weight: np.ndarray, bias: np.ndarray | None = None, activation: str = "none",
                   target: Target | None = None, min_sparsity: float | None = None):  # fmt: skip
    """The sparse kernel if the weight is sparse enough, else the dense one."""
    weight, bias = _check_weight(weight, bias, activation)
    threshold = SPARSE_MIN_SPARSITY if min_sparsity is None else min_sparsity
    sparsity = zero_fraction(weight)
    if sparsity >= threshold:
        return SparseLinearKernel(weight, bias, activation, target or host_target(), DEFAULT_TUNING)
    return DenseLinearKernel(weight, bias, activation, target or host_target())
