"""Timing sessions the way `sparsednn benchmark` reports them, and synthetic inputs.

Peers (onnxruntime) run on the same inputs, with the same thread count, alternating with
sparsednn in the same process, so that both see the same machine noise.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sparsednn.errors import InvalidInputError
from sparsednn.ir import Graph

RunFn = Callable[[dict[str, np.ndarray]], Any]


def _gather_bounds(graph: Graph) -> dict[str, int]:
    """For int inputs used as Gather indices, the size of the table they index."""
    bounds = {}
    inputs = {id(v): v.name for v in graph.inputs}
    for node in graph.nodes:
        if node.op == "Gather" and len(node.inputs) > 1 and id(node.inputs[1]) in inputs:
            table = node.inputs[0]
            axis = node.attrs.get("axis", 0)
            if table is not None and table.shape is not None and isinstance(table.shape[axis], int):
                name = inputs[id(node.inputs[1])]
                bounds[name] = min(bounds.get(name, table.shape[axis]), table.shape[axis])
    return bounds


def synthetic_inputs(
    graph: Graph,
    batch_size: int = 1,
    seq_len: int = 128,
    shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Random inputs of the right names, dtypes and shapes: symbolic dims become batch_size
    (first axis) or seq_len (others); ids stay inside their embedding tables."""
    rng = np.random.default_rng(seed)
    bounds = _gather_bounds(graph)
    feed = {}
    for v in graph.inputs:
        if shapes and v.name in shapes:
            shape = tuple(shapes[v.name])
        elif v.shape is None:
            raise InvalidInputError(f"input {v.name!r} has an unknown rank: give --shapes")
        else:
            shape = tuple(
                d if isinstance(d, int) else (batch_size if axis == 0 else seq_len)
                for axis, d in enumerate(v.shape)
            )
        dtype = np.dtype(v.dtype or np.float32)
        if dtype.kind == "f":
            feed[v.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype.kind == "b":
            feed[v.name] = np.ones(shape, dtype)
        elif "mask" in v.name:
            feed[v.name] = np.ones(shape, dtype)
        elif "type" in v.name:
            feed[v.name] = np.zeros(shape, dtype)
        else:
            feed[v.name] = rng.integers(0, bounds.get(v.name, 100), shape).astype(dtype)
    return feed


@dataclass
class Timing:
    engine: str
    iterations: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list, repr=False)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.latencies_ms) if self.latencies_ms else float("nan")

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")

    def throughput(self, items_per_run: int) -> float:
        return items_per_run * self.iterations / self.seconds if self.seconds else 0.0

    def summary(self, items_per_run: int) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "iterations": self.iterations,
            "seconds": round(self.seconds, 3),
            "throughput_items_per_s": round(self.throughput(items_per_run), 3),
            "latency_ms": {
                "mean": round(self.mean_ms, 3),
                "median": round(self.percentile_ms(50), 3),
                "p90": round(self.percentile_ms(90), 3),
                "p99": round(self.percentile_ms(99), 3),
            },
        }


SETTLE_S = 0.08  # untimed runs at the start of each engine's slice (see time_engines)


def time_engines(
    engines: dict[str, RunFn],
    feed: dict[str, np.ndarray],
    seconds: float,
    warmup: int = 2,
    scenario: str = "sync",
    streams: int = 2,
    progress: Callable[[float], None] | None = None,
) -> dict[str, Timing]:
    """Time each engine for about `seconds`, alternating between engines in short slices.

    Each slice starts with SETTLE_S of untimed runs, at least one: an engine's worker threads
    may go on spinning after its last run (onnxruntime's do for ~40 ms: the next engine's
    first two runs of a BERT-base measured 27-32 ms against 16 ms), and the engine whose slice
    starts must not be timed against them; nor woken from sleep. Long runs are no exception:
    a 90%-sparse BERT-base at batch 16 x 128 on two threads measured 216-222 ms right after an
    onnxruntime run against 187-195 ms after its own."""
    for run in engines.values():
        for _ in range(warmup):
            run(feed)
    timings = {name: Timing(name) for name in engines}
    slice_s = max(0.25, min(2.0, seconds / 10))
    deadline = time.perf_counter() + seconds * len(engines)
    while time.perf_counter() < deadline:
        for name, run in engines.items():
            settle_end = time.perf_counter() + SETTLE_S
            while True:
                run(feed)
                if time.perf_counter() >= settle_end:
                    break
            if scenario == "async":
                _time_async(run, feed, slice_s, streams, timings[name])
            else:
                _time_sync(run, feed, slice_s, timings[name])
        if progress:
            progress(min(1.0, 1.0 - (deadline - time.perf_counter()) / (seconds * len(engines))))
    return timings


def _time_sync(run: RunFn, feed, slice_s: float, timing: Timing) -> None:
    end = time.perf_counter() + slice_s
    while True:
        t0 = time.perf_counter()
        run(feed)
        t1 = time.perf_counter()
        timing.latencies_ms.append((t1 - t0) * 1e3)
        timing.iterations += 1
        timing.seconds += t1 - t0
        if t1 >= end:
            return


def _time_async(run: RunFn, feed, slice_s: float, streams: int, timing: Timing) -> None:
    """Several requests in flight, one per stream thread: measures throughput under load."""
    lock = threading.Lock()
    start = time.perf_counter()
    end = start + slice_s

    def stream():
        while True:
            t0 = time.perf_counter()
            run(feed)
            t1 = time.perf_counter()
            with lock:
                timing.latencies_ms.append((t1 - t0) * 1e3)
                timing.iterations += 1
            if t1 >= end:
                return

    threads = [threading.Thread(target=stream) for _ in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    timing.seconds += time.perf_counter() - start


def onnxruntime_runner(model_path: str, threads: int) -> tuple[RunFn, str]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])
    return (lambda feed: session.run(None, feed)), f"onnxruntime {ort.__version__}"


def openvino_runner(model_path: str, threads: int, precision: str | None = "f32"):
    """OpenVINO at f32 (the fair peer for fp32 kernels), or at its default precision (bf16 on
    CPUs with AMX) when precision is None; the label says which."""
    import openvino as ov

    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model_path, "CPU", config)
    used = str(compiled.get_property("INFERENCE_PRECISION_HINT")).split("'")[-2:-1] or ["?"]
    request = compiled.create_infer_request()
    version = ov.__version__.split("-")[0]
    return (lambda feed: request.infer(feed)), f"openvino {version} ({used[0]})"


PEERS = {
    "onnxruntime": onnxruntime_runner,
    "openvino": openvino_runner,
    "openvino-default": lambda path, threads: openvino_runner(path, threads, precision=None),
}
