"""Fuzz the model loader and runtime with corrupted models; report crashes (must be 0).

    python bench/fuzz.py --cases 10000

Cases run in worker processes, so that a crash (a signal) is counted, not fatal: the parent
notes the case that killed its worker and starts a new worker after it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

WORKER = r"""
import sys, numpy as np
from sparsednn.testing import mutate, small_mlp, try_model
valid = small_mlp().SerializeToString()
start, stop = int(sys.argv[1]), int(sys.argv[2])
for case in range(start, stop):
    data = mutate(valid, np.random.default_rng(case)) if case % 10 else \
        np.random.default_rng(case).bytes(int(np.random.default_rng(case).integers(1, 4096)))
    try:
        outcome = try_model(data)
    except BaseException as e:
        outcome = "unexpected:" + type(e).__name__ + ":" + str(e)[:200].replace("\n", " ")
    print(case, outcome, flush=True)
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10000)
    parser.add_argument("--json", help="write the counts as JSON here")
    args = parser.parse_args()
    counts = {"ok": 0, "error": 0, "unexpected": 0, "crash": 0}
    examples: list[str] = []
    case, t0 = 0, time.time()
    while case < args.cases:
        proc = subprocess.run([sys.executable, "-c", WORKER, str(case), str(args.cases)],
                              capture_output=True, text=True)
        last = case - 1
        for line in proc.stdout.splitlines():
            number, _, outcome = line.partition(" ")
            last = int(number)
            kind = outcome.split(":")[0]
            counts[kind] += 1
            if kind == "unexpected" and len(examples) < 10:
                examples.append(f"case {number}: {outcome}")
        if proc.returncode != 0:  # the worker died on case last + 1
            counts["crash"] += 1
            examples.append(f"case {last + 1}: worker died with code {proc.returncode}")
            last += 1
        case = last + 1
    counts["cases"] = sum(counts[k] for k in ("ok", "error", "unexpected", "crash"))
    counts["seconds"] = round(time.time() - t0, 1)
    print(json.dumps(counts))
    for e in examples:
        print(" ", e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**counts, "examples": examples}, f, indent=2)
    return 0 if counts["crash"] == 0 and counts["unexpected"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
