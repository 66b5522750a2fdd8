"""Session creation of pruned BERT-base, cold and warm, each in a fresh process.

    python bench/load.py                                # 90%, 5 rounds, all cores
    python bench/load.py --sparsity 0.9,0.98 --rounds 7 --threads 1
    python bench/load.py --rounds 3 --then 0.91                  # and a model never seen

Each round creates the session in a fresh process with an empty kernel cache (cold: LLVM
generates every code variant the model needs, once per process, and every sparse layer is
compressed), then in another fresh process with the cache the first one filled (warm: machine
code and compressed weights come from the cache, and LLVM is never loaded). Prints, for each,
the median and range over the rounds: the seconds to create the session, the seconds of it in
which LLVM ran (`jit.compile_module`: verifying, optimising and generating code; threads
compile at once, so their summed work is printed too), per linear layer, and the peak RSS.
The model is built and pruned as in bench/e2e.py (needs the `models` extra).

--then SPARSITY adds a third process per round: the same model pruned to that sparsity (its
weights never seen) on the cache the first two filled ("new weights"): every sparse layer is
compressed again, but the code the layers share (one compiled kernel per epilogue and
structure, whatever the shape and the weights) comes from the cache, as for a model loaded on
a machine where sparsednn has run before.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from e2e import pruned_model

PROBE = r"""
import json, sys, threading, time
from sparsednn.codegen import jit
llvm = {"active": 0, "since": 0.0, "wall": 0.0, "work": 0.0}
lock = threading.Lock()
compile_module = jit.compile_module
def timed(*args, **kwargs):  # (threads compile at once: the time any runs, and their sum)
    t = time.perf_counter()
    with lock:
        if llvm["active"] == 0:
            llvm["since"] = t
        llvm["active"] += 1
    try:
        return compile_module(*args, **kwargs)
    finally:
        end = time.perf_counter()
        with lock:
            llvm["work"] += end - t
            llvm["active"] -= 1
            if llvm["active"] == 0:
                llvm["wall"] += end - llvm["since"]
jit.compile_module = timed
import sparsednn
def peak_mb():  # this process's own: ru_maxrss counts the parent's RSS at the fork too
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:")) / 1024
t = time.perf_counter()
s = sparsednn.InferenceSession(sys.argv[1], sparsednn.SessionOptions(intra_op_num_threads=int(sys.argv[2])))
seconds = time.perf_counter() - t
print(json.dumps({"seconds": seconds, "llvm_seconds": llvm["wall"], "llvm_work": llvm["work"],
                  "linear": sum(n.op == "Linear" for n in s.graph.nodes),
                  "peak_mb": peak_mb()}))
"""


def create(path: Path, threads: int, cache: str) -> dict:
    env = dict(os.environ, SPARSEDNN_CACHE_DIR=cache)
    env.pop("SPARSEDNN_KERNEL_CACHE", None)
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(threads)], env=env,
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


def spread(values) -> str:
    return f"{np.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sparsity", default="0.9", help="comma list, e.g. 0.9,0.98")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--then",
        type=float,
        default=None,
        help="then create the model pruned to this sparsity on the filled cache",
    )
    args = parser.parse_args()
    for sparsity in (float(s) for s in args.sparsity.split(",")):
        path = pruned_model(sparsity)
        runs: dict[str, list[dict]] = {"cold": [], "warm": []}
        then = None
        if args.then is not None:
            then = (f"new weights ({args.then:.0%})", pruned_model(args.then))
            runs[then[0]] = []
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="sparsednn-load-") as cache:
                runs["cold"].append(create(path, args.threads, cache))
                runs["warm"].append(create(path, args.threads, cache))
                if then is not None:
                    runs[then[0]].append(create(then[1], args.threads, cache))
        print(f"== BERT-base {sparsity:.0%}, {args.threads} thread(s), {args.rounds} rounds "
              f"(median, range)")  # fmt: skip
        for kind, rs in runs.items():
            seconds = [r["seconds"] for r in rs]
            layers = rs[0]["linear"]
            print(f"   {kind}: {spread(seconds)} s, of it LLVM {spread([r['llvm_seconds'] for r in rs])} s"
                  f" ({np.median([r['llvm_work'] for r in rs]):.2f} s of work on all threads);"
                  f" {layers} linear layers: {1e3 * np.median(seconds) / layers:.1f} ms a layer"
                  f" in all; peak RSS {np.median([r['peak_mb'] for r in rs]):.0f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
