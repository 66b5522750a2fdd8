"""sparsednn.prune.prune_model: what it prunes, how much, by which rule, and on real exports."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from model_checks import ORT_PROVIDERS
from sparsednn.models.hf import ModelSpec, make_inputs, num_layers
from sparsednn.prune import prune_model, weight_sparsity

RNG_SEED = 7


def _graph_model(nodes, inputs, outputs, arrays: dict[str, np.ndarray], opset=17):
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return model


def zoo_of_layers(seed: int = RNG_SEED) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """One model with every kind of weight prune_model must tell apart.

    Prunable: w_matmul [64, 96] (MatMul B), w_gemm [80, 96] (Gemm B, transB=1), w_t [48, 80]
    (Transpose -> MatMul), w_conv [16, 8, 3, 3] (Conv W, 1152 elements, so min_size=1000 to be
    pruned), w_ident [80, 64] (Identity -> MatMul, as the TorchScript exporter shares tensors).
    Left alone: table [100, 64] (Gather data), tied [100, 64]... read by both a Gather and a
    MatMul (tied embeddings), biases, a layer norm's scale and bias, small [8, 8] (tiny).
    """
    rng = np.random.default_rng(seed)

    def f(*shape):
        return rng.standard_normal(shape).astype(np.float32)

    arrays = {
        "table": f(100, 64),
        "tied": f(100, 64),
        "w_matmul": f(64, 96),
        "b_matmul": f(96),
        "w_gemm": f(80, 96),
        "b_gemm": f(80),
        "w_t": f(48, 80),
        "w_ident": f(80, 64),
        "ln_scale": f(64),
        "ln_bias": f(64),
        "small": f(64, 8),
        "w_conv": f(16, 8, 3, 3),
        "b_conv": f(16),
    }
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["emb"]),  # [n, 64]
        helper.make_node("Gather", ["tied", "ids"], ["emb2"]),
        helper.make_node("Add", ["emb", "emb2"], ["x"]),
        helper.make_node("LayerNormalization", ["x", "ln_scale", "ln_bias"], ["xn"], axis=-1),
        helper.make_node("MatMul", ["xn", "w_matmul"], ["h0"]),  # [n, 96]
        helper.make_node("Add", ["h0", "b_matmul"], ["h1"]),
        helper.make_node("Gemm", ["h1", "w_gemm", "b_gemm"], ["h2"], transB=1),  # [n, 80]
        helper.make_node("Transpose", ["w_t"], ["w_t_T"], perm=[1, 0]),  # [80, 48]
        helper.make_node("MatMul", ["h2", "w_t_T"], ["h3"]),  # [n, 48]
        helper.make_node("Identity", ["w_ident"], ["w_ident_alias"]),
        helper.make_node("MatMul", ["h2", "w_ident_alias"], ["h4"]),  # [n, 64]
        helper.make_node("MatMul", ["h4", "small"], ["h5"]),  # [n, 8]
        helper.make_node("Transpose", ["tied"], ["tied_T"], perm=[1, 0]),  # [64, 100]
        helper.make_node("MatMul", ["xn", "tied_T"], ["logits"]),  # tied decoder
        helper.make_node("Conv", ["img", "w_conv", "b_conv"], ["c"], pads=[1, 1, 1, 1]),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"]),
        helper.make_tensor_value_info("img", TensorProto.FLOAT, [1, 8, 6, 6]),
    ]
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
        for n in ("h3", "h5", "logits", "c")
    ]
    return _graph_model(nodes, inputs, outputs, arrays), arrays


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


PRUNABLE = {
    "w_matmul": "MatMul",
    "w_gemm": "Gemm",
    "w_t": "MatMul",
    "w_ident": "MatMul",
    "w_conv": "Conv",
}


def test_prunes_exactly_the_linear_weights():
    model, arrays = zoo_of_layers()
    before = model.SerializeToString()
    pruned, report = prune_model(model, 0.75, min_size=1000)
    assert model.SerializeToString() == before, "the input model was modified"
    assert {r["name"]: r["op"] for r in report} == PRUNABLE
    after = _initializers(pruned)
    for name, array in arrays.items():
        if name in PRUNABLE:
            assert after[name].shape == array.shape and after[name].dtype == np.float32
            assert weight_sparsity(after[name]) == pytest.approx(0.75, abs=1 / array.size)
            kept = after[name] != 0
            np.testing.assert_array_equal(after[name][kept], array[kept])
        else:
            np.testing.assert_array_equal(after[name], array, err_msg=f"{name} was changed")
    for r in report:
        assert r["shape"] == arrays[r["name"]].shape and r["size"] == arrays[r["name"]].size
        assert r["target"] == 0.75 and r["sparsity"] == pytest.approx(0.75, abs=1e-3)
        assert r["nodes"], r


def test_min_size_leaves_small_weights_alone():
    model, arrays = zoo_of_layers()
    _, report = prune_model(model, 0.5)  # default min_size 4096: only [64, 96], [80, 96]...
    assert {r["name"] for r in report} == {n for n in PRUNABLE if arrays[n].size >= 4096}
    _, report = prune_model(model, 0.5, min_size=0)
    assert "small" in {r["name"] for r in report}


def test_smallest_magnitudes_go_first_and_sparsity_is_exact():
    model, arrays = zoo_of_layers()
    for sparsity in (0.0, 0.5, 0.9, 0.97, 1.0):
        pruned, report = prune_model(model, sparsity, min_size=1000)
        after = _initializers(pruned)
        for name in PRUNABLE:
            w, p = arrays[name], after[name]
            zeros = int(round(sparsity * w.size))
            assert w.size - np.count_nonzero(p) == zeros, (name, sparsity)
            if 0 < zeros < w.size:
                assert np.abs(w[p == 0]).max() <= np.abs(w[p != 0]).min()


def test_global_scope_ranks_all_layers_together():
    rng = np.random.default_rng(3)
    loud = (10 * rng.standard_normal((64, 64))).astype(np.float32)
    quiet = (0.1 * rng.standard_normal((64, 64))).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "loud"], ["h"]),
        helper.make_node("MatMul", ["h", "quiet"], ["y"]),
    ]
    model = _graph_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        {"loud": loud, "quiet": quiet},
    )
    _, layer = prune_model(model, 0.5, scope="layer")
    assert [r["sparsity"] for r in layer] == [0.5, 0.5]
    pruned, glob = prune_model(model, 0.5, scope="global")
    by_name = {r["name"]: r["sparsity"] for r in glob}
    assert by_name["quiet"] > 0.9 and by_name["loud"] < 0.1
    after = _initializers(pruned)
    total = sum(a.size - np.count_nonzero(a) for a in after.values())
    assert total == 4096  # exactly half of all 8192 weights
    kept = np.concatenate([np.abs(a[after[n] != 0]) for n, a in (("loud", loud), ("quiet", quiet))])
    gone = np.concatenate([np.abs(a[after[n] == 0]) for n, a in (("loud", loud), ("quiet", quiet))])
    assert gone.max() <= kept.min()


def _blocks_are_whole(matrix_kn: np.ndarray, block: tuple[int, int]) -> bool:
    bk, bn = block
    k, n = matrix_kn.shape
    for i in range(0, k, bk):
        for j in range(0, n, bn):
            nz = np.count_nonzero(matrix_kn[i : i + bk, j : j + bn])
            if nz not in (0, matrix_kn[i : i + bk, j : j + bn].size):
                return False
    return True


@pytest.mark.parametrize("block", [(4, 1), (1, 4), (2, 2), (8, 1)])
def test_block_pruning_zeroes_whole_blocks_in_the_kn_layout(block):
    model, arrays = zoo_of_layers()
    pruned, report = prune_model(model, 0.8, block=block, min_size=1000)
    after = _initializers(pruned)
    # The [K, N] matrix each op multiplies by, from the stored tensor.
    as_kn = {
        "w_matmul": lambda a: a,
        "w_ident": lambda a: a,
        "w_gemm": lambda a: a.T,  # Gemm transB=1 stores [N, K]
        "w_t": lambda a: a.T,  # Transpose -> MatMul stores [N, K]
        "w_conv": lambda a: a.reshape(a.shape[0], -1).T,  # [O, I, kh, kw] -> [I*kh*kw, O]
    }
    for name, to_kn in as_kn.items():
        kn = to_kn(after[name])
        assert _blocks_are_whole(kn, block), f"{name}: a {block} block is partly pruned"
        assert weight_sparsity(kn) == pytest.approx(0.8, abs=0.02), name
        # Block order: every pruned block's L2 norm <= every kept block's.
        orig = to_kn(arrays[name])
        bk, bn = block
        norms_gone, norms_kept = [], []
        for i in range(0, kn.shape[0], bk):
            for j in range(0, kn.shape[1], bn):
                norm = np.linalg.norm(orig[i : i + bk, j : j + bn])
                (norms_gone if not kn[i : i + bk, j : j + bn].any() else norms_kept).append(norm)
        assert max(norms_gone) <= min(norms_kept) + 1e-6, name


def test_pruned_model_still_runs_in_onnxruntime_and_equals_numpy():
    model, arrays = zoo_of_layers()
    pruned, _ = prune_model(model, 0.9, min_size=1000)
    w = _initializers(pruned)
    ids = np.array([3, 17, 99, 0], np.int64)
    img = np.random.default_rng(0).standard_normal((1, 8, 6, 6)).astype(np.float32)
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=ORT_PROVIDERS)
    h3, h5, logits, _ = sess.run(None, {"ids": ids, "img": img})
    x = w["table"][ids] + w["tied"][ids]
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    xn = (x - mu) / np.sqrt(var + 1e-5) * w["ln_scale"] + w["ln_bias"]
    h2 = (xn @ w["w_matmul"] + w["b_matmul"]) @ w["w_gemm"].T + w["b_gemm"]
    np.testing.assert_allclose(h3, h2 @ w["w_t"].T, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(h5, (h2 @ w["w_ident"]) @ w["small"], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(logits, xn @ w["tied"].T, rtol=1e-4, atol=1e-3)


def test_weights_in_external_data(tmp_path):
    model, arrays = zoo_of_layers()
    path = tmp_path / "ext" / "model.onnx"
    path.parent.mkdir()
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(model)  # onnx.save moves the tensors of what it saves out: save a copy
    onnx.save(
        on_disk,
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="model.onnx.data",
        size_threshold=0,
    )
    assert (path.parent / "model.onnx.data").is_file()
    expected, _ = prune_model(model, 0.9, min_size=1000)
    want = _initializers(expected)

    # 1. A ModelProto whose tensors still point to the data file, with its folder given.
    shell = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == TensorProto.EXTERNAL for t in shell.graph.initializer)
    pruned, report = prune_model(shell, 0.9, min_size=1000, base_dir=path.parent)
    assert len(report) == len(PRUNABLE)
    assert all(t.data_location != TensorProto.EXTERNAL for t in pruned.graph.initializer)
    got = _initializers(pruned)
    for name in arrays:
        np.testing.assert_array_equal(got[name], want[name])
    assert any(t.data_location == TensorProto.EXTERNAL for t in shell.graph.initializer), (
        "the caller's proto was changed"
    )

    # 2. A path: its folder holds the data.
    pruned, report = prune_model(str(path), 0.9, min_size=1000)
    for name, array in _initializers(pruned).items():
        np.testing.assert_array_equal(array, want[name])

    # 3. onnx.load, which reads the data itself: the usual way.
    pruned, _ = prune_model(onnx.load(str(path)), 0.9, min_size=1000)
    for name, array in _initializers(pruned).items():
        np.testing.assert_array_equal(array, want[name])


def test_float16_and_float64_weights_keep_their_dtype():
    rng = np.random.default_rng(5)
    for dtype, elem in ((np.float16, TensorProto.FLOAT16), (np.float64, TensorProto.DOUBLE)):
        w = rng.standard_normal((64, 128)).astype(dtype)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        model = _graph_model(
            nodes,
            [helper.make_tensor_value_info("x", elem, [1, 64])],
            [helper.make_tensor_value_info("y", elem, None)],
            {"w": w},
        )
        pruned, report = prune_model(model, 0.9)
        p = _initializers(pruned)["w"]
        assert p.dtype == dtype and weight_sparsity(p) == pytest.approx(0.9, abs=1e-3)


def test_integer_weights_and_rank3_matmul_operands_are_not_pruned():
    rng = np.random.default_rng(5)
    wi = rng.integers(-5, 5, (64, 128)).astype(np.int32)
    w3 = rng.standard_normal((2, 64, 64)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["xi", "wi"], ["yi"]),
        helper.make_node("MatMul", ["x3", "w3"], ["y3"]),
    ]
    model = _graph_model(
        nodes,
        [
            helper.make_tensor_value_info("xi", TensorProto.INT32, [1, 64]),
            helper.make_tensor_value_info("x3", TensorProto.FLOAT, [2, 1, 64]),
        ],
        [
            helper.make_tensor_value_info("yi", TensorProto.INT32, None),
            helper.make_tensor_value_info("y3", TensorProto.FLOAT, None),
        ],
        {"wi": wi, "w3": w3},
    )
    _, report = prune_model(model, 0.9)
    assert report == []


@pytest.mark.parametrize(
    "bad",
    [
        dict(sparsity=1.5),
        dict(sparsity=-0.1),
        dict(scope="model"),
        dict(block=(0, 1)),
        dict(block=(4,)),
        dict(min_size=-1),
    ],
)
def test_bad_arguments_are_refused(bad):
    model, _ = zoo_of_layers()
    kwargs = dict(sparsity=0.5) | bad
    with pytest.raises(ValueError):
        prune_model(model, **kwargs)


# -- real exports -------------------------------------------------------------------------
@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("arch", ["bert", "distilbert", "roberta", "vit"])
def test_prunes_the_linear_layers_of_real_exports(zoo, observe, arch, exporter):
    spec = ModelSpec(arch, exporter=exporter)
    dense = zoo.model(spec, 0.0)
    layers = num_layers(spec)
    pruned, report = prune_model(dense, 0.9)
    ops = {r["op"] for r in report}
    linear = [r for r in report if r["op"] in ("MatMul", "Gemm")]
    assert len(linear) == 6 * layers, [r["name"] for r in report]
    assert ops <= {"MatMul", "Gemm", "Conv"}
    if arch == "vit":  # the patch embedding is a Conv [hidden, 3, 8, 8]
        assert [r["op"] for r in report].count("Conv") == 1
    assert all(r["sparsity"] == pytest.approx(0.9, abs=1e-3) for r in report)
    shapes = sorted(r["shape"] for r in linear)
    assert len(set(shapes)) in (2, 3), shapes  # [h, h], [h, 4h], [4h, h] (in some layout)
    before, after = _initializers(dense), _initializers(pruned)
    pruned_names = {r["name"] for r in report}
    untouched = [n for n in before if n not in pruned_names]
    for n in untouched:  # embeddings, biases, layer norms, position ids...
        np.testing.assert_array_equal(after[n], before[n], err_msg=n)
    embeddings = [n for n in untouched if before[n].ndim == 2 and before[n].shape[0] >= 512]
    if spec.is_text:
        assert embeddings, "no embedding table seen"
    observe(
        "prune on real exports",
        f"{spec.name}: {len(report)} weights pruned ({', '.join(sorted(ops))}), "
        f"e.g. {report[0]['name']} {report[0]['shape']}; untouched 2-D tables: "
        f"{[(n, before[n].shape) for n in embeddings][:3]}",
    )
    # The pruned model is still a valid model that onnxruntime runs.
    sess = ort.InferenceSession(pruned.SerializeToString(), providers=ORT_PROVIDERS)
    feed = make_inputs(spec, 2, 9)
    out = sess.run(None, feed)[0]
    assert np.isfinite(out).all()


def test_global_and_block_pruning_on_a_real_export(zoo):
    spec = ModelSpec("bert", exporter="legacy")
    dense = zoo.model(spec, 0.0)
    pruned, report = prune_model(dense, 0.9, scope="global", block=(4, 1))
    sizes = np.array([r["size"] for r in report])
    sparsities = np.array([r["sparsity"] for r in report])
    assert (sizes * sparsities).sum() / sizes.sum() == pytest.approx(0.9, abs=1e-3)
    assert sparsities.std() > 0  # global: layers differ
    after = _initializers(pruned)
    for r in report:  # MatMul B is stored [K, N] in these exports
        assert _blocks_are_whole(after[r["name"]], (4, 1)), r["name"]
