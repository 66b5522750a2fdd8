"""Fuzz the model loader and runtime with corrupted models; report crashes (must be 0).

    python bench/fuzz.py --cases 10000

Four kinds of case, by case number: random bytes (1 in 10), byte mutations of a valid model
(flips, insertions, deletions, truncation, 0xff runs: 4 in 10), structured mutations that keep
a valid protobuf but break the model (missing fields, wrong attribute types, cycles, duplicate
and dangling names, absurd dims and shapes in initialisers, ConstantOfShape, Reshape, Expand,
Tile and Range, unknown types and opsets: 4 in 10), and a structured mutation followed by a
byte mutation (1 in 10). Each loaded model is run on inputs of its declared shapes.

Outcomes: ok (it loaded and ran), error (a clean sparsednn error), unexpected (any other
exception: a bug), unguarded (a sparsednn error, but caused by a failed allocation that
sparsednn's own memory checks did not catch first, or by a bug that the session's backstop
reported as an internal error), hang (no answer within --timeout
seconds) and crash (the worker process died). Cases run in worker processes under a memory
cap (--rlimit-gib of address space), with SPARSEDNN_MEMORY_LIMIT at --limit-mib: a crash or
hang is counted, not fatal; the parent starts a new worker after the case that killed one.
Exit status 0 only when unexpected, unguarded, hang and crash are all 0.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import subprocess
import sys
import threading
import time

WORKER = r"""
import resource, sys, time
import numpy as np
rlimit = int(sys.argv[3]) << 30
resource.setrlimit(resource.RLIMIT_AS, (rlimit, rlimit))
from sparsednn.errors import SparseDNNError
from sparsednn.testing import (BASE_MODELS, RngChooser, mutate, run_model,
                               structured_mutation, unguarded_allocation)
valid = {name: build().SerializeToString() for name, build in BASE_MODELS.items()}
start, stop = int(sys.argv[1]), int(sys.argv[2])


def case_data(case):
    rng = np.random.default_rng(case)
    kind = case % 10
    if kind == 0:
        return "bytes", rng.bytes(int(rng.integers(1, 4096)))
    if kind <= 4:
        return "byte-mutation", mutate(valid[sorted(valid)[case % len(valid)]], rng)
    data, _ = structured_mutation(RngChooser(rng))
    if kind == 9:
        return "structured+bytes", mutate(data, rng)
    return "structured", data


for case in range(start, stop):
    kind, data = case_data(case)
    t0 = time.perf_counter()
    try:
        run_model(data)
        outcome = "ok"
    except SparseDNNError as e:
        outcome = "unguarded:" + str(e)[:200].replace("\n", " ") if unguarded_allocation(e) \
            else "error"
    except BaseException as e:
        outcome = "unexpected:" + type(e).__name__ + ":" + str(e)[:200].replace("\n", " ")
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss >> 10
    print(case, kind, f"{seconds:.4f}", rss, outcome, flush=True)
"""


def run_worker(first: int, stop: int, args, on_line) -> tuple[int | None, str]:
    """Run cases first..stop-1 in one worker; returns (last case answered, how it ended)."""
    env = dict(os.environ, SPARSEDNN_MEMORY_LIMIT=str(args.limit_mib << 20))
    proc = subprocess.Popen(
        [sys.executable, "-c", WORKER, str(first), str(stop), str(args.rlimit_gib)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True
    ).start()
    stderr: list[str] = []
    threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True).start()
    last = None
    while True:
        try:
            line = lines.get(timeout=args.timeout)
        except queue.Empty:
            proc.kill()
            proc.wait()
            return last, "hang"
        if line is None:
            break
        last = on_line(line)
    code = proc.wait()
    if code != 0:
        return last, f"died with code {code}: {''.join(stderr)[-300:]}"
    return last, "done"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--start", type=int, default=0, help="first case number (seed)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        help="seconds one case may take before it counts as a hang",
    )
    parser.add_argument(
        "--limit-mib", type=int, default=1024, help="SPARSEDNN_MEMORY_LIMIT for the workers, in MiB"
    )
    parser.add_argument(
        "--rlimit-gib", type=int, default=8, help="address-space cap of a worker process, in GiB"
    )
    parser.add_argument("--json", help="write the counts as JSON here")
    args = parser.parse_args()
    kinds = ("ok", "error", "unexpected", "unguarded", "hang", "crash")
    counts = dict.fromkeys(kinds, 0)
    by_kind: dict[str, dict[str, int]] = {}
    examples: list[str] = []
    slowest = (0.0, -1)
    peak_rss_mib = 0

    def on_line(line: str) -> int:
        nonlocal slowest, peak_rss_mib
        number, kind, seconds, rss, outcome = line.rstrip("\n").split(" ", 4)
        result = outcome.split(":")[0]
        counts[result] += 1
        by_kind.setdefault(kind, dict.fromkeys(kinds, 0))[result] += 1
        slowest = max(slowest, (float(seconds), int(number)))
        peak_rss_mib = max(peak_rss_mib, int(rss))
        if result not in ("ok", "error") and len(examples) < 20:
            examples.append(f"case {number} ({kind}): {outcome}")
        return int(number)

    case, stop, t0 = args.start, args.start + args.cases, time.time()
    while case < stop:
        last, ended = run_worker(case, stop, args, on_line)
        last = case - 1 if last is None else last
        if ended != "done":  # the worker hung or died on case last + 1
            result = "hang" if ended == "hang" else "crash"
            counts[result] += 1
            examples.append(f"case {last + 1}: {ended}")
            last += 1
        case = last + 1
    counts["cases"] = sum(counts[k] for k in kinds)
    counts["seconds"] = round(time.time() - t0, 1)
    counts["slowest_case"] = {"seconds": round(slowest[0], 2), "case": slowest[1]}
    counts["worker_peak_rss_mib"] = peak_rss_mib
    print(json.dumps(counts))
    for kind, c in sorted(by_kind.items()):
        print(f"  {kind:18s} " + " ".join(f"{k}={v}" for k, v in c.items() if v))
    for e in examples:
        print(" ", e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**counts, "by_kind": by_kind, "examples": examples}, f, indent=2)
    bad = sum(counts[k] for k in ("unexpected", "unguarded", "hang", "crash"))
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
