"""The command line, run as users run it: subprocesses, output checked."""

import json
import os
import subprocess
import sys

import pytest

import sparsednn
from sparsednn.models import ARCHITECTURES, build_encoder


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {**os.environ, "SPARSEDNN_CACHE_DIR": str(cache)}


def sparsednn_cli(*args, env, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "sparsednn", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.mark.parametrize("command", ["benchmark", "profile", "dump", "prune"])
def test_every_command_has_help(command, env):
    out = sparsednn_cli(command, "--help", env=env).stdout
    assert "usage: sparsednn " + command in out


def test_benchmark_builtin_model_against_onnxruntime(env, tmp_path):
    report = tmp_path / "report.json"
    out = sparsednn_cli(
        "benchmark",
        "bert-tiny-90",
        "--time",
        "0.3",
        "--warmup",
        "1",
        "-b",
        "2",
        "-s",
        "16",
        "--compare",
        "onnxruntime",
        "--json",
        str(report),
        env=env,
    ).stdout
    assert "== engine ==" in out and "isa" in out and "sparse_weight_share" in out
    assert "items/s" in out and "sparsednn is" in out
    data = json.loads(report.read_text())
    assert data["inputs"]["input_ids"] == [2, 16]
    peer = data["results"][1]
    assert peer["engine"] == "onnxruntime" and peer["max_abs_diff"] < 1e-4
    assert data["results"][0]["iterations"] > 0
    assert data["engine"]["sparse_weight_share"] == 1.0


def test_profile_writes_a_table_and_a_chart(env, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "profile.png"
    out = sparsednn_cli(
        "profile", "bert-tiny-90", "-s", "16", "--runs", "2", "--plot", str(png), env=env
    ).stdout
    assert "Linear" in out and "by op:" in out and "ms/run" in out
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_prune_then_benchmark_a_user_model(env, tmp_path):
    dense = tmp_path / "dense.onnx"
    import onnx

    onnx.save(build_encoder(ARCHITECTURES["bert-tiny"], sparsity=0.0), dense)
    pruned = tmp_path / "pruned.onnx"
    out = sparsednn_cli("prune", str(dense), "--sparsity", "0.9", "-o", str(pruned), env=env).stdout
    assert "wrote" in out and "%" in out
    session = sparsednn.InferenceSession(str(pruned))
    linears = [n for n in session.graph.nodes if n.op == "Linear"]
    assert linears and all(n.attrs["sparsity"] >= 0.89 for n in linears)
    out = sparsednn_cli("benchmark", str(pruned), "--time", "0.2", "-s", "8", env=env).stdout
    assert "items/s" in out


def test_dump_shows_ir_after_a_pass_and_the_kernels(env):
    out = sparsednn_cli("dump", "bert-tiny-90", "--after", "fold_constants", env=env).stdout
    assert "MatMul" in out and "Linear" not in out
    out = sparsednn_cli("dump", "bert-tiny-90", env=env).stdout
    assert "Linear" in out and "activation='gelu'" in out and "kernel='sparse'" in out
    out = sparsednn_cli("dump", "bert-tiny-90", "--llvm", env=env).stdout
    assert "define" in out and "f32_spmm" in out


def test_errors_are_one_line_with_nonzero_exit(env):
    result = sparsednn_cli("benchmark", "no-such-model.onnx", env=env, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "no-such-model.onnx" in result.stderr
    assert "Traceback" not in result.stderr
    result = sparsednn_cli("dump", "bert-tiny-90", "--after", "nonsense", env=env, check=False)
    assert result.returncode == 1 and "fold_constants" in result.stderr
