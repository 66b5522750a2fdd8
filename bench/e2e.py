"""End to end: pruned BERT-base on sparsednn against onnxruntime (and OpenVINO if installed).

    python bench/e2e.py                      # 0% and 90%, seq 128, batch 1 and 16
    python bench/e2e.py --full               # 0/80/90/94%, seq 128 and 384, batch 1 and 16
    python bench/e2e.py --memory             # also peak RSS of a session, in fresh processes

BERT-base is built with transformers from its config (seeded random weights), exported by
torch.onnx.export (TorchScript exporter, opset 17, dynamic batch and sequence) and pruned by
magnitude in every encoder linear layer (embeddings, biases and layer norms kept). Engines
run on the same inputs with the same thread count, alternating in short slices within one
process, so that they share the machine's noise. Needs the `models` and `bench` extras.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sparsednn.benchmark import PEERS, time_engines
from sparsednn.models import cache_dir
from sparsednn.models.hf import ModelSpec, export, make_inputs


def pruned_model(sparsity: float, block: tuple[int, int] = (1, 1)) -> Path:
    """BERT-base exported by torch and pruned to `sparsity` (in blocks of `block` of each
    [K, N] weight), cached beside its export."""
    import onnx

    from sparsednn.prune import prune_model

    exported = export(ModelSpec("bert", "base", "legacy"))
    suffix = "" if block == (1, 1) else f"-block{block[0]}x{block[1]}"
    name = f"{exported.path.parent.name}-pruned{round(sparsity * 100)}{suffix}.onnx"
    path = cache_dir() / "bench" / name
    if not path.exists():
        model, _ = prune_model(onnx.load(str(exported.path)), sparsity, block=block)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        onnx.save(model, str(tmp))
        os.replace(tmp, path)
    return path


def sparsednn_runner(path: Path, threads: int):
    import sparsednn

    start = time.perf_counter()
    session = sparsednn.InferenceSession(
        str(path), sparsednn.SessionOptions(intra_op_num_threads=threads)
    )
    seconds = time.perf_counter() - start
    return (lambda feed: session.run(None, feed)), f"sparsednn {sparsednn.__version__}", seconds


def first_output(result) -> np.ndarray:
    if isinstance(result, dict):  # OpenVINO returns {output: array}
        result = list(result.values())
    return np.asarray(result[0])


MEMORY_PROBE = r"""
import sys, numpy as np
engine, path, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
if engine == "sparsednn":
    import sparsednn
    s = sparsednn.InferenceSession(path, sparsednn.SessionOptions(intra_op_num_threads=threads))
    run = lambda f: s.run(None, f)
else:
    import onnxruntime as ort
    o = ort.SessionOptions(); o.intra_op_num_threads = threads
    s = ort.InferenceSession(path, o, providers=["CPUExecutionProvider"])
    run = lambda f: s.run(None, f)
ids = np.ones((1, 128), np.int64)
run({"input_ids": ids, "attention_mask": ids, "token_type_ids": 0 * ids})
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across exec.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024)
"""


def peak_memory_mb(engine: str, path: Path, threads: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, engine, str(path), str(threads)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return float(out.split()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the issue's whole grid")
    parser.add_argument("--sparsity", default=None, help="comma list, e.g. 0,0.9")
    parser.add_argument("--seq", default=None, help="comma list of sequence lengths")
    parser.add_argument("--batch", default=None, help="comma list of batch sizes")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--time", type=float, default=5.0, help="seconds per engine per case")
    parser.add_argument("--peers", default="onnxruntime,openvino,openvino-default")
    parser.add_argument("--memory", action="store_true", help="peak RSS per session")
    parser.add_argument("--block", default="1x1",
                        help="prune in blocks of KxN of each [K, N] weight, e.g. 1x4 (4 outputs "
                             "sharing an input: the kernel's shared-rows variant)")  # fmt: skip
    parser.add_argument("--json", default="bench/results/e2e.json")
    parser.add_argument("--png", default="bench/results/e2e.png")
    args = parser.parse_args()

    sparsities = [
        float(s) for s in (args.sparsity or ("0,0.8,0.9,0.94" if args.full else "0,0.9")).split(",")
    ]
    seqs = [int(s) for s in (args.seq or ("128,384" if args.full else "128")).split(",")]
    batches = [int(b) for b in (args.batch or "1,16").split(",")]
    spec = ModelSpec("bert", "base", "legacy")
    block = tuple(int(v) for v in args.block.lower().split("x"))
    rows = []
    for sparsity in sparsities:
        path = pruned_model(sparsity, block)
        run, label, compile_s = sparsednn_runner(path, args.threads)
        engines, labels = {"sparsednn": run}, {"sparsednn": label}
        for peer in args.peers.split(","):
            try:
                engines[peer], labels[peer] = PEERS[peer](str(path), args.threads)
            except ImportError:
                continue
        _, _, cached_s = sparsednn_runner(path, args.threads)  # second creation: warm caches
        print(
            f"== BERT-base {sparsity:.0%} sparse{'' if block == (1, 1) else f' in {args.block} blocks'}: "
            f"sparsednn session {compile_s:.2f}s cold, "
            f"{cached_s:.2f}s second time; {', '.join(labels.values())}",
            flush=True,
        )
        memory = {}
        if args.memory:
            memory = {
                e: peak_memory_mb(e, path, args.threads) for e in ("sparsednn", "onnxruntime")
            }
            print("   peak RSS MB: " + ", ".join(f"{e} {m:.0f}" for e, m in memory.items()))
        for seq in seqs:
            for batch in batches:
                feed = make_inputs(spec, batch, seq, seed=seq + batch)
                reference = first_output(engines["sparsednn"](feed))
                diffs = {
                    p: float(np.max(np.abs(first_output(engines[p](feed)) - reference)))
                    for p in engines
                    if p != "sparsednn"
                }
                timings = time_engines(engines, feed, args.time, warmup=2)
                base = timings["sparsednn"].throughput(batch)
                for name, t in timings.items():
                    row = {
                        "sparsity": sparsity,
                        "block": args.block,
                        "seq": seq,
                        "batch": batch,
                        "engine": name,
                        "label": labels[name],
                        "threads": args.threads,
                        "sequences_per_s": round(t.throughput(batch), 3),
                        "p50_ms": round(t.percentile_ms(50), 3),
                        "p90_ms": round(t.percentile_ms(90), 3),
                        "p99_ms": round(t.percentile_ms(99), 3),
                        "iterations": t.iterations,
                        "sparsednn_speedup": round(base / max(t.throughput(batch), 1e-12), 3),
                        "max_abs_diff": diffs.get(name, 0.0),
                        "session_seconds": round(compile_s, 3) if name == "sparsednn" else None,
                        "peak_rss_mb": memory.get(name),
                    }
                    rows.append(row)
                    print(
                        f"  seq {seq:4d} batch {batch:3d} {labels[name]:28s} "
                        f"{row['sequences_per_s']:9.2f} seq/s  p50 {row['p50_ms']:8.2f} "
                        f"p90 {row['p90_ms']:8.2f} p99 {row['p99_ms']:8.2f} ms  "
                        + (
                            ""
                            if name == "sparsednn"
                            else f"sparsednn {row['sparsednn_speedup']:.2f}x, "
                            f"max-abs {row['max_abs_diff']:.1e}"
                        ),
                        flush=True,
                    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.json}")
    plot(rows, args.png)
    return 0


def plot(rows: list[dict], path: str) -> None:
    """Throughput bars per engine and sparsity, one panel per (sequence, batch)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(no matplotlib: no chart)")
        return
    cases = sorted({(r["seq"], r["batch"]) for r in rows})
    engines = list(dict.fromkeys(r["engine"] for r in rows))
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 4.5), squeeze=False)
    for ax, (seq, batch) in zip(axes[0], cases):
        sparsities = sorted({r["sparsity"] for r in rows})
        width = 0.8 / len(engines)
        for i, engine in enumerate(engines):
            values = [
                next(
                    (
                        r["sequences_per_s"]
                        for r in rows
                        if r["engine"] == engine
                        and r["sparsity"] == s
                        and r["seq"] == seq
                        and r["batch"] == batch
                    ),
                    0,
                )
                for s in sparsities
            ]
            label = next(r["label"] for r in rows if r["engine"] == engine)
            ax.bar(np.arange(len(sparsities)) + i * width, values, width, label=label)
        ax.set_xticks(
            np.arange(len(sparsities)) + 0.4 - width / 2, [f"{s:.0%}" for s in sparsities]
        )
        ax.set_xlabel("sparsity of encoder linear weights")
        ax.set_ylabel("sequences / s")
        ax.set_title(f"BERT-base, seq {seq}, batch {batch}")
        ax.set_ylim(
            top=1.4
            * max(r["sequences_per_s"] for r in rows if r["seq"] == seq and r["batch"] == batch)
        )
        ax.legend(loc="upper left", fontsize=8, ncol=2)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
