"""The command line: `sparsednn benchmark | profile | dump | prune`.

Errors print as one readable line with a non-zero exit code; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from sparsednn.errors import SparseDNNError


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_model(model: str) -> str:
    """A path to an ONNX file, building a built-in model (e.g. bert-base-90) if so named."""
    from sparsednn import models

    if Path(model).exists():
        return model
    if models.is_builtin(model):
        return str(models.builtin_model_path(model, progress=_say))
    raise SparseDNNError(
        f"{model!r} is neither an ONNX file nor a built-in model "
        f"(built-in: {', '.join(a + '[-SPARSITY]' for a in models.ARCHITECTURES)})"
    )


def _parse_shapes(text: str | None) -> dict[str, list[int]] | None:
    """'input_ids:1x128,attention_mask:1x128' -> {'input_ids': [1, 128], ...}."""
    if not text:
        return None
    shapes = {}
    for item in text.split(","):
        name, _, dims = item.partition(":")
        try:
            shapes[name.strip()] = [int(d) for d in dims.lower().split("x")]
        except ValueError:
            raise SparseDNNError(f"--shapes: cannot read {item!r}; write NAME:1x128,...") from None
    return shapes


@contextlib.contextmanager
def benchmark_bar(total_seconds: float):
    """A bar filling over the benchmark's duration (on a terminal only)."""
    if not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(
        total=round(total_seconds),
        desc="benchmarking",
        unit="s",
        leave=False,
        file=sys.stderr,
        bar_format="{desc} {bar} {n:.0f}/{total:.0f}s",
    ) as bar:
        yield lambda fraction: bar.update(fraction * total_seconds - bar.n)


def engine_summary(session) -> dict:
    """What the engine chose for this model: CPU, ISA, threads, sparse share, compile time."""
    import sparsednn
    from sparsednn.codegen.target import host_target

    target = host_target()
    sparse = dense = 0
    for node in session.graph.nodes:
        if node.op == "Linear":
            size = node.attrs["weight"].size
            if node.attrs["kernel"].startswith("f32_spmm"):
                sparse += size
            else:
                dense += size
    return {
        "sparsednn": sparsednn.__version__,
        "cpu": target.cpu_name,
        "isa": target.isa,
        "threads": session.options.num_threads,
        "linear_layers": sum(1 for n in session.graph.nodes if n.op == "Linear"),
        "sparse_weight_share": round(sparse / max(sparse + dense, 1), 4),
        "compile_seconds": round(session.compile_seconds, 3),
        "kernel_cache": _cache_summary(session),
    }


def _cache_summary(session) -> str:
    if os.environ.get("SPARSEDNN_KERNEL_CACHE", "1") == "0":
        return "off (SPARSEDNN_KERNEL_CACHE=0)"
    hits = [k.cache_hit for k in session.kernels.values() if hasattr(k, "cache_hit")]
    if not hits:
        return "no kernels"
    state = "hit" if all(hits) else "miss" if not any(hits) else "partial hit"
    return f"{state} ({sum(hits)}/{len(hits)} kernels from the cache)"


def cmd_benchmark(args) -> int:
    import sparsednn
    from sparsednn.benchmark import PEERS, synthetic_inputs, time_engines

    path = resolve_model(args.model)
    _say(f"compiling {path} ...")
    options = sparsednn.SessionOptions(intra_op_num_threads=args.threads or 0, show_progress=True)
    session = sparsednn.InferenceSession(path, options)
    threads = options.num_threads
    feed = synthetic_inputs(
        session.graph, args.batch_size, args.seq_len, _parse_shapes(args.shapes)
    )
    engines = {"sparsednn": lambda f: session.run(None, f)}
    labels = {"sparsednn": f"sparsednn {sparsednn.__version__}"}
    for peer in args.compare or []:
        try:
            engines[peer], labels[peer] = PEERS[peer](path, threads)
        except ImportError:
            raise SparseDNNError(
                f"--compare {peer}: {peer} is not installed (pip install {peer})"
            ) from None
    max_abs = {}
    reference = session.run(None, feed)[0]
    for peer in engines.keys() - {"sparsednn"}:
        out = engines[peer](feed)
        out = out[0] if isinstance(out, list) else next(iter(out.values()))
        max_abs[peer] = (
            float(np.max(np.abs(np.asarray(out) - reference))) if reference.size else 0.0
        )

    summary = engine_summary(session)
    print("== engine ==")
    for key, value in summary.items():
        print(f"  {key:22s} {value}")
    shape_text = ", ".join(f"{k}{list(v.shape)}" for k, v in feed.items())
    print(f"== {args.model}: {shape_text}, scenario {args.scenario}, {args.time:g}s per engine ==")
    _say("benchmarking ...")
    with benchmark_bar(args.time * len(engines)) as advance:
        timings = time_engines(engines, feed, args.time, args.warmup, args.scenario, advance)
    items = next(iter(feed.values())).shape[0] if feed else 1
    base = timings["sparsednn"].throughput(items)
    report = {
        "model": args.model,
        "engine": summary,
        "inputs": {k: list(v.shape) for k, v in feed.items()},
        "scenario": args.scenario,
        "results": [],
    }
    for name, t in timings.items():
        s = t.summary(items)
        s["label"] = labels[name]
        lat = s["latency_ms"]
        line = (
            f"  {labels[name]:32s} {s['throughput_items_per_s']:10.2f} items/s   latency ms "
            f"mean {lat['mean']:.2f}  median {lat['median']:.2f}  p90 {lat['p90']:.2f}  "
            f"p99 {lat['p99']:.2f}   iterations {t.iterations}"
        )
        if name != "sparsednn":
            ratio = base / max(t.throughput(items), 1e-12)
            s["sparsednn_speedup"] = round(ratio, 3)
            s["max_abs_diff"] = max_abs[name]
            line += (
                f"\n  {'':32s} sparsednn is {ratio:.2f}x faster; max-abs diff {max_abs[name]:.2e}"
            )
        report["results"].append(s)
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
        _say(f"wrote {args.json}")
    return 0


def cmd_profile(args) -> int:
    import sparsednn
    from sparsednn.benchmark import synthetic_inputs

    path = resolve_model(args.model)
    _say(f"compiling {path} ...")
    options = sparsednn.SessionOptions(
        intra_op_num_threads=args.threads or 0, enable_profiling=True, show_progress=True
    )
    session = sparsednn.InferenceSession(path, options)
    feed = synthetic_inputs(
        session.graph, args.batch_size, args.seq_len, _parse_shapes(args.shapes)
    )
    session.run(None, feed)  # warm up, then forget the warm-up's times
    session.reset_profile()
    start = time.perf_counter()
    for _ in range(args.runs):
        session.run(None, feed)
    wall = (time.perf_counter() - start) / args.runs
    nodes = {n.name: n for n in session.graph.nodes}
    profile = session.profile()
    total = sum(p.seconds for p in profile) or 1.0
    rows = []
    for p in profile:
        node = nodes[p.node]
        shape = node.outputs[0].type_str() if node.outputs else ""
        sparsity = node.attrs.get("sparsity")
        rows.append(
            {
                "node": p.node,
                "op": p.op,
                "output": shape,
                "sparsity": "" if sparsity is None else f"{100 * sparsity:.1f}%",
                "kernel": getattr(session.kernels.get(p.node), "name", "numpy"),
                "ms": 1e3 * p.seconds / args.runs,
                "share": 100 * p.seconds / total,
                "gflops": p.gflops,
            }
        )
    shown = rows if args.all else rows[: args.top]
    print(
        f"{'node':40s} {'op':10s} {'output':28s} {'sparsity':>8s} {'kernel':36s} "
        f"{'ms/run':>8s} {'share':>6s} {'GFLOP/s':>8s}"
    )
    for r in shown:
        print(
            f"{r['node'][-40:]:40s} {r['op']:10s} {r['output'][:28]:28s} {r['sparsity']:>8s} "
            f"{r['kernel'][:36]:36s} {r['ms']:8.3f} {r['share']:5.1f}% "
            f"{r['gflops'] or 0:8.1f}"
        )
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} more nodes (--all shows them)")
    by_op: dict[str, float] = {}
    for r in rows:
        by_op[r["op"]] = by_op.get(r["op"], 0.0) + r["share"]
    print(
        "by op: "
        + ", ".join(
            f"{op} {share:.1f}%" for op, share in sorted(by_op.items(), key=lambda kv: -kv[1])
        )
    )
    print(f"total {1e3 * total / args.runs:.3f} ms/run over {args.runs} runs; wall {1e3 * wall:.3f} ms/run")
    if total / args.runs > 1.2 * wall:
        print("(a batch that runs in parts, one per thread, counts each node's time in every "
              "part: runtime/batch_parts.py)")
    if args.plot:
        _plot_profile(by_op, rows, args.plot, f"{args.model}: {1e3 * total / args.runs:.1f} ms/run")
        _say(f"wrote {args.plot}")
    return 0


def _plot_profile(by_op: dict[str, float], rows: list[dict], path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparseDNNError("--plot needs matplotlib (pip install 'sparsednn[bench]')") from None
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    ops = sorted(by_op, key=by_op.get)
    left.barh(ops, [by_op[o] for o in ops], color="tab:blue")
    left.set_xlabel("share of run time (%)")
    left.set_title("time by op")
    top = rows[:15][::-1]
    right.barh([r["node"][-32:] for r in top], [r["ms"] for r in top], color="tab:orange")
    right.set_xlabel("ms per run")
    right.set_title("slowest nodes")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def cmd_dump(args) -> int:
    from sparsednn.frontend.onnx_import import import_onnx
    from sparsednn.passes.pipeline import run_pipeline

    path = resolve_model(args.model)
    graph = run_pipeline(import_onnx(path, name=Path(path).name), stop_after=args.after)
    if not (args.llvm or args.asm):
        print(graph)
        return 0
    import sparsednn

    session = sparsednn.InferenceSession(path)
    for node in session.graph.nodes:
        if node.op != "Linear":
            continue
        kernel = session.kernels[node.name]
        print(
            f"; node {node.name}: {node.attrs['weight'].shape[0]}x{node.attrs['weight'].shape[1]}"
            f", {100 * node.attrs['sparsity']:.1f}% zeros, kernel {kernel.name}"
        )
        text = kernel.asm if args.asm else kernel.llvm_ir
        print(text or "; (no generated code: this kernel calls BLAS)")
        if not args.all:
            print("; (first Linear only; --all prints every kernel)")
            break
    return 0


def cmd_prune(args) -> int:
    import onnx

    from sparsednn.prune import prune_model

    path = resolve_model(args.model)
    block = tuple(int(x) for x in args.block.lower().split("x"))
    model, report = prune_model(onnx.load(path), args.sparsity, scope=args.scope, block=block)
    for layer in report:
        print(f"  {layer['name']:60s} {str(layer['shape']):16s} {100 * layer['sparsity']:6.2f}%")
    onnx.save(model, args.output)
    print(f"wrote {args.output}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsednn", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("benchmark", help="time a model (built-in by default) and its peers")
    bench.add_argument(
        "model",
        nargs="?",
        default="bert-base-90",
        help="ONNX file or built-in model such as bert-base-90 (default)",
    )
    bench.add_argument("-b", "--batch-size", type=int, default=1)
    bench.add_argument("-s", "--seq-len", type=int, default=128)
    bench.add_argument("--shapes", help="explicit input shapes, e.g. input_ids:1x128,...")
    bench.add_argument("-t", "--threads", type=int, default=0, help="0: all cores")
    bench.add_argument("--time", type=float, default=10.0, help="seconds per engine")
    bench.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    bench.add_argument("--scenario", choices=["sync", "async"], default="sync")
    bench.add_argument(
        "--compare",
        action="append",
        choices=["onnxruntime", "openvino", "openvino-default"],
        help="also run this peer on the same model and inputs",
    )
    bench.add_argument("--json", help="write the report as JSON to this file")
    bench.set_defaults(run=cmd_benchmark)

    prof = sub.add_parser("profile", help="per-node time table of a model")
    prof.add_argument("model", nargs="?", default="bert-base-90")
    prof.add_argument("-b", "--batch-size", type=int, default=1)
    prof.add_argument("-s", "--seq-len", type=int, default=128)
    prof.add_argument("--shapes", help="explicit input shapes, e.g. input_ids:1x128,...")
    prof.add_argument("-t", "--threads", type=int, default=0, help="0: all cores")
    prof.add_argument("--runs", type=int, default=10)
    prof.add_argument("--top", type=int, default=25, help="rows to show")
    prof.add_argument("--all", action="store_true", help="show every node")
    prof.add_argument("--plot", help="write a PNG bar chart of where the time goes")
    prof.set_defaults(run=cmd_profile)

    dump = sub.add_parser("dump", help="print the IR after a pass, or the generated kernels")
    dump.add_argument("model")
    dump.add_argument("--after", help="stop after this pass (default: all passes)")
    dump.add_argument("--llvm", action="store_true", help="print the kernels' LLVM IR")
    dump.add_argument("--asm", action="store_true", help="print the kernels' machine code")
    dump.add_argument("--all", action="store_true", help="every kernel, not just the first")
    dump.set_defaults(run=cmd_dump)

    prune = sub.add_parser("prune", help="magnitude-prune a model's linear and conv weights")
    prune.add_argument("model")
    prune.add_argument("--sparsity", type=float, required=True, help="fraction, e.g. 0.9")
    prune.add_argument("--scope", choices=["layer", "global"], default="layer")
    prune.add_argument("--block", default="1x1", help="block shape, e.g. 4x1")
    prune.add_argument("-o", "--output", required=True)
    prune.set_defaults(run=cmd_prune)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (SparseDNNError, OSError) as e:
        if args.debug:
            raise
        print(f"sparsednn {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
