"""Soak test: BERT-like models on random inputs for minutes, against onnxruntime; memory flat.

    python bench/soak.py --minutes 5                    # bert-tiny and minilm-l6 at 0/50/90/97%
    python bench/soak.py --minutes 1 --runs 2000 --json soak.json

Two phases:
1. numerics, for --minutes: the built-in encoders (--models) at each of --sparsities, on random
   token ids, attention masks (padded tails) and token types, with random batch (1..--max-batch)
   and sequence (1..--max-sequence) lengths; every output is compared with onnxruntime's
   (CPUExecutionProvider, same ONNX model). Reports cases, the largest max-abs deviation of
   last_hidden_state per model (must stay within --tolerance, 1e-4) and RSS before and after.
2. memory, --runs runs (10,000 by default) of one session (--memory-model) over a fixed set of
   shapes: RSS after a warm-up and after the runs must differ by less than --rss-tolerance-mib.

Exit status 0 only when every deviation is within tolerance and memory stayed flat.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import numpy as np


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def random_feed(config, rng, max_batch: int, max_sequence: int) -> dict[str, np.ndarray]:
    batch = int(rng.integers(1, max_batch + 1))
    sequence = int(rng.integers(1, max_sequence + 1))
    mask = np.ones((batch, sequence), np.int64)
    for row in range(batch):  # padded tails of random length, never a fully padded row
        mask[row, int(rng.integers(1, sequence + 1)) :] = 0
    feed = {
        "input_ids": rng.integers(0, config.vocab, (batch, sequence), dtype=np.int64),
        "attention_mask": mask,
    }
    if config.type_vocab:
        split = int(rng.integers(0, sequence + 1))
        types = np.zeros((batch, sequence), np.int64)
        types[:, split:] = 1
        feed["token_type_ids"] = types
    return feed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of phase 1")
    parser.add_argument("--models", default="bert-tiny,minilm-l6")
    parser.add_argument("--sparsities", default="0,50,90,97", help="percent, comma-separated")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-sequence", type=int, default=128)
    parser.add_argument("--threads", type=int, default=0, help="intra_op_num_threads (0: all)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--runs", type=int, default=10000, help="runs of phase 2")
    parser.add_argument("--memory-model", default="bert-tiny-90")
    parser.add_argument("--rss-tolerance-mib", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import onnxruntime as ort

    import sparsednn
    from sparsednn.models import ARCHITECTURES, build_encoder, example_inputs, parse_name

    options = sparsednn.SessionOptions(intra_op_num_threads=args.threads)
    rss_start = rss_mib()
    configs = []
    for arch in args.models.split(","):
        for percent in (float(p) for p in args.sparsities.split(",")):
            t0 = time.perf_counter()
            model = build_encoder(
                ARCHITECTURES[arch], percent / 100, seed=0, name=f"{arch}-{percent:g}"
            ).SerializeToString()
            ours = sparsednn.InferenceSession(model, options)
            theirs = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            kernels = sorted(
                {k.name.split("_")[1] for k in ours.kernels.values() if hasattr(k, "name")}
            )
            print(
                f"{arch}-{percent:g}: compiled in {time.perf_counter() - t0:.1f} s "
                f"(kernels: {', '.join(kernels)})",
                flush=True,
            )
            configs.append(
                {
                    "name": f"{arch}-{percent:g}",
                    "arch": arch,
                    "ours": ours,
                    "theirs": theirs,
                    "cases": 0,
                    "max_abs": 0.0,
                    "worst": None,
                    "seconds_ours": 0.0,
                    "seconds_theirs": 0.0,
                }
            )

    # -- phase 1: numerics ----------------------------------------------------------------
    rng = np.random.default_rng(args.seed)
    for c in configs:  # warm up both runtimes before measuring memory
        feed = example_inputs(ARCHITECTURES[c["arch"]], 2, 16)
        c["ours"].run(None, feed)
        c["theirs"].run(None, feed)
    gc.collect()
    rss_before = rss_mib()
    deadline = time.time() + 60 * args.minutes
    cases = 0
    while time.time() < deadline:
        c = configs[cases % len(configs)]
        config = ARCHITECTURES[c["arch"]]
        feed = random_feed(config, rng, args.max_batch, args.max_sequence)
        t0 = time.perf_counter()
        (got,) = c["ours"].run(None, feed)
        t1 = time.perf_counter()
        (want,) = c["theirs"].run(None, feed)
        c["seconds_ours"] += t1 - t0
        c["seconds_theirs"] += time.perf_counter() - t1
        if got.shape != want.shape or not np.isfinite(got).all():
            deviation = float("inf")
        else:
            deviation = float(np.max(np.abs(got.astype(np.float64) - want))) if got.size else 0.0
        if deviation > c["max_abs"]:
            c["max_abs"] = deviation
            c["worst"] = list(feed["input_ids"].shape)
        c["cases"] += 1
        cases += 1
    gc.collect()
    rss_after = rss_mib()
    largest = max(c["max_abs"] for c in configs)
    print(
        f"\nphase 1: {cases} cases in {args.minutes:g} min; largest max-abs deviation from "
        f"onnxruntime {largest:.2e} (tolerance {args.tolerance:g}); RSS {rss_before:.1f} -> "
        f"{rss_after:.1f} MiB"
    )
    for c in configs:
        ratio = c["seconds_theirs"] / c["seconds_ours"] if c["seconds_ours"] else 0.0
        print(
            f"  {c['name']:16s} cases {c['cases']:6d}  max-abs {c['max_abs']:.2e}"
            f" (at batch x sequence {c['worst']})  time vs onnxruntime x{ratio:.2f}"
        )

    # -- phase 2: memory over many runs ---------------------------------------------------
    arch, config, sparsity = parse_name(args.memory_model)
    session = sparsednn.InferenceSession(build_encoder(config, sparsity, seed=1), options)
    shapes = [(1, 8), (2, 16), (4, 33), (1, 128), (3, 5), (8, 64), (2, 1), (5, 100)]
    feeds = [example_inputs(config, b, s, seed=i) for i, (b, s) in enumerate(shapes)]
    for i in range(200):
        session.run(None, feeds[i % len(feeds)])
    gc.collect()
    rss_runs_before = rss_mib()
    t0 = time.perf_counter()
    for i in range(args.runs):
        session.run(None, feeds[i % len(feeds)])
    seconds = time.perf_counter() - t0
    gc.collect()
    rss_runs_after = rss_mib()
    growth = rss_runs_after - rss_runs_before
    print(
        f"\nphase 2: {args.runs} runs of {args.memory_model} ({len(shapes)} shapes) in "
        f"{seconds:.1f} s; RSS {rss_runs_before:.1f} -> {rss_runs_after:.1f} MiB "
        f"({growth:+.1f} MiB, tolerance {args.rss_tolerance_mib:g})"
    )
    print(f"process RSS: {rss_start:.1f} MiB at start, {rss_mib():.1f} MiB at the end")

    ok = largest <= args.tolerance and growth < args.rss_tolerance_mib
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "minutes": args.minutes,
                    "cases": cases,
                    "largest_max_abs": largest,
                    "tolerance": args.tolerance,
                    "rss_phase1_mib": [rss_before, rss_after],
                    "runs": args.runs,
                    "rss_phase2_mib": [rss_runs_before, rss_runs_after],
                    "per_model": [
                        {
                            k: c[k]
                            for k in (
                                "name",
                                "cases",
                                "max_abs",
                                "worst",
                                "seconds_ours",
                                "seconds_theirs",
                            )
                        }
                        for c in configs
                    ],
                    "ok": ok,
                },
                f,
                indent=2,
            )
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
