"""When to write a layer's output with streaming stores (spmm.stream_out_bytes).

Two sparse layers in a row, the second reading the first's Y, timed with both outputs
streamed and with neither, at growing output sizes: streaming pays once Y would not stay in
the cache until the next layer reads it anyway.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/stream_outputs.py
    python bench/stream_outputs.py --features 1024 --sparsity 0.9 --m 256,512,1024,2048
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from sparsednn.codegen import spmm
from sparsednn.codegen.target import last_level_cache_bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", type=int, default=1024, help="K = N of both layers")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--m", default="256,512,1024,2048", help="comma list of token counts")
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args(argv)
    n = args.features
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(2):
        w = rng.standard_normal((n, n)).astype(np.float32)
        w[rng.random((n, n)) < args.sparsity] = 0
        layers.append(spmm.compile_sparse_linear(w))
    default = spmm.stream_out_bytes
    print(f"# last-level cache {last_level_cache_bytes() >> 20} MB; streaming from "
          f"{default() / (1 << 20):g} MB of output (stream_out_bytes)")  # fmt: skip
    print(f"{'M':>6} {'Y MB':>6} {'plain ms':>9} {'streamed ms':>12} {'streamed/plain':>15}")
    try:
        for m in (int(v) for v in args.m.split(",")):
            x = spmm.empty_aligned((m, n))
            x[:] = rng.standard_normal((m, n))
            y1, y2 = spmm.empty_aligned((m, n)), spmm.empty_aligned((m, n))
            times = {}
            for streamed in (False, True, False, True):  # alternating, both see the same load
                spmm.stream_out_bytes = (lambda: 0) if streamed else (lambda: 1 << 62)
                for layer in layers:
                    layer.forget_plans()  # (plans keep the flag of their output size)
                runs = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    layers[0](x, out=y1)
                    layers[1](y1, out=y2)
                    runs.append(time.perf_counter() - t)
                times.setdefault(streamed, []).append(np.median(runs))
            plain, streamed = min(times[False]), min(times[True])
            print(f"{m:>6} {4 * m * n / (1 << 20):>6.1f} {plain * 1e3:>9.3f} {streamed * 1e3:>12.3f}"
                  f" {streamed / plain:>15.3f}")  # fmt: skip
    finally:
        spmm.stream_out_bytes = default
        for layer in layers:
            layer.forget_plans()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
