"""Resources: many runs leave memory flat; destroyed sessions free their code and buffers;
models and inputs that would need more memory than the machine has are refused before
anything is allocated. (bench/soak.py runs 10,000+ runs on BERT-like models.)"""

import gc
import os
import resource
import weakref

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

import sparsednn
from sparsednn.errors import InvalidGraphError, InvalidInputError, ModelLoadError, SparseDNNError
from sparsednn.ir.verify import memory_limit
from sparsednn.models import ARCHITECTURES, build_encoder, example_inputs
from sparsednn.testing import small_mlp, unguarded_allocation

MIB = 1 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_memory_limit_is_the_machines_memory(monkeypatch):
    monkeypatch.delenv("SPARSEDNN_MEMORY_LIMIT", raising=False)
    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert 0 < memory_limit() <= physical
    monkeypatch.setenv("SPARSEDNN_MEMORY_LIMIT", "12345")
    assert memory_limit() == 12345


def test_2000_runs_leave_memory_flat(observe):
    session = sparsednn.InferenceSession(small_mlp())
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1 + i % 40, 12)).astype(np.float32)} for i in range(50)]
    for i in range(300):  # warm up: allocator pools, lazily built caches
        session.run(None, feeds[i % 50])
    gc.collect()
    before = rss()
    for i in range(2000):
        session.run(None, feeds[i % 50])
    gc.collect()
    growth = rss() - before
    observe(
        "robustness",
        f"2000 runs of small_mlp: RSS {before / MIB:.1f} -> {(before + growth) / MIB:.1f} MiB",
    )
    assert growth < 4 * MIB


def test_200_sessions_created_and_destroyed_leave_memory_flat(observe):
    x = np.ones((8, 12), np.float32)

    def cycle(seed):
        s = sparsednn.InferenceSession(small_mlp(seed=seed))  # new weights: new packed data
        s.run(None, {"x": x})
        return weakref.ref(s)

    refs = [cycle(seed) for seed in range(20)]
    gc.collect()
    before = rss()
    refs += [cycle(seed) for seed in range(20, 220)]
    gc.collect()
    growth = rss() - before
    observe(
        "robustness",
        f"200 sessions created and destroyed: RSS {before / MIB:.1f} -> "
        f"{(before + growth) / MIB:.1f} MiB",
    )
    assert all(r() is None for r in refs), "a destroyed session is still referenced"
    assert growth < 8 * MIB


def test_destroyed_session_frees_its_linear_kernels():
    """Linear kernels (packed weights, buffers) go with their session. (Compiled code is
    shared per shape through process-wide caches, bounded by the distinct shapes seen.)"""
    s = sparsednn.InferenceSession(build_encoder(ARCHITECTURES["bert-tiny"], 0.9, seed=5))
    kernels = [weakref.ref(k) for k in s.kernels.values() if "Linear" in type(k).__name__]
    assert kernels
    s.run(None, example_inputs(ARCHITECTURES["bert-tiny"], 1, 4))
    del s
    gc.collect()
    assert all(k() is None for k in kernels)


# -- refused before allocating ------------------------------------------------------------
def limited_address_space(gib):
    """Cap this process's address space for a block, so that an unguarded huge allocation
    fails fast instead of swapping the machine; restored afterwards."""

    class Cap:
        def __enter__(self):
            self.old = resource.getrlimit(resource.RLIMIT_AS)
            used = int(open("/proc/self/statm").read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
            resource.setrlimit(resource.RLIMIT_AS, (used + (gib << 30), self.old[1]))

        def __exit__(self, *exc):
            resource.setrlimit(resource.RLIMIT_AS, self.old)

    return Cap()


def encoder_session():
    return sparsednn.InferenceSession(build_encoder(ARCHITECTURES["bert-tiny"], 0.9))


def test_inputs_whose_intermediates_exceed_memory_are_refused_before_running(monkeypatch):
    session = encoder_session()
    ran = []
    monkeypatch.setattr(session, "_execute", lambda env: ran.append(1))
    # Zero-strided views: they stand for 2**17 x 2**15 token ids without taking the memory.
    ids = np.broadcast_to(np.int64(1), (1 << 17, 1 << 15))
    feed = {"input_ids": ids, "attention_mask": ids, "token_type_ids": ids}
    with limited_address_space(2):
        with pytest.raises(InvalidInputError, match="batch=131072.*sequence=32768.*memory") as e:
            session.run(None, feed)
    assert not ran and not unguarded_allocation(e.value)
    assert "TiB" in str(e.value) or "PiB" in str(e.value)


def test_memory_limit_applies_to_run_inputs(monkeypatch):
    session = encoder_session()
    feed = example_inputs(ARCHITECTURES["bert-tiny"], 4, 64)
    session.run(None, feed)
    monkeypatch.setenv("SPARSEDNN_MEMORY_LIMIT", str(64 << 10))  # 64 KiB
    with pytest.raises(InvalidInputError, match="SPARSEDNN_MEMORY_LIMIT"):
        session.run(None, feed)


def constant_model(op, inputs, inits, out_type=TensorProto.FLOAT):
    graph = helper.make_graph(
        [helper.make_node(op, inputs, ["y"])],
        op.lower(),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1])],
        [helper.make_tensor_value_info("y", out_type, None)],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def shape(name, *dims):
    return numpy_helper.from_array(np.array(dims, np.int64), name)


@pytest.mark.parametrize(
    "model",
    [
        constant_model("ConstantOfShape", ["s"], [shape("s", 1 << 20, 1 << 20)]),
        constant_model("Expand", ["x", "s"], [shape("s", 1 << 20, 1 << 20)]),
        constant_model("Tile", ["x", "s"], [shape("s", 1 << 20, 1 << 20)]),
    ],
    ids=["ConstantOfShape", "Expand", "Tile"],
)
def test_models_needing_more_than_memory_fail_before_allocating(model):
    with limited_address_space(2):
        with pytest.raises(SparseDNNError, match="memory") as e:
            s = sparsednn.InferenceSession(model)
            s.run(None, {"x": np.ones((1, 1), np.float32)})
    assert not unguarded_allocation(e.value)
    assert isinstance(e.value, (InvalidGraphError, SparseDNNError))


def test_initializer_larger_than_the_memory_limit(monkeypatch):
    monkeypatch.setenv("SPARSEDNN_MEMORY_LIMIT", str(1 << 20))
    big = numpy_helper.from_array(np.ones((1024, 512), np.float32), "c")  # 2 MiB
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "big",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [big],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(InvalidGraphError, match="'c'.*2.0 MiB.*SPARSEDNN_MEMORY_LIMIT"):
        sparsednn.InferenceSession(m)


def test_external_data_larger_than_memory_is_not_read(tmp_path):
    """A sparse 1 TiB file (no disk used) named as a tensor's external data."""
    big = tmp_path / "huge.bin"
    with open(big, "wb") as f:
        f.truncate(1 << 40)
    t = onnx_tensor_external("c", [1 << 38], "huge.bin", 1 << 40)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"])],
        "huge",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [t],
    )
    path = tmp_path / "m.onnx"
    path.write_bytes(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    )
    with limited_address_space(2):
        with pytest.raises(ModelLoadError, match="1.0 TiB.*refused before reading"):
            sparsednn.InferenceSession(str(path))


def onnx_tensor_external(name, dims, location, length):
    t = helper.make_tensor(name, TensorProto.FLOAT, [0], [])
    t.dims[:] = dims
    t.data_location = TensorProto.EXTERNAL
    for k, v in {"location": location, "offset": "0", "length": str(length)}.items():
        e = t.external_data.add()
        e.key, e.value = k, v
    return t
