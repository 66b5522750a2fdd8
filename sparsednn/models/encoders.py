"""BERT-style encoders built directly as ONNX (onnx.helper + numpy, no torch).

The graphs follow what torch.onnx.export produces for Hugging Face encoders (Gather
embeddings, LayerNormalization, MatMul + Add linears, Reshape/Transpose attention heads, an
additive attention mask, GELU as its erf decomposition), with seeded random weights pruned by
magnitude to the requested sparsity in every encoder linear layer. Embeddings, biases and
layer norms stay dense, as pruning recipes leave them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class EncoderConfig:
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int = 30522
    max_positions: int = 512
    type_vocab: int = 2  # 0: no token_type_ids input (DistilBERT)


ARCHITECTURES = {
    "bert-base": EncoderConfig(768, 12, 12, 3072),
    "bert-large": EncoderConfig(1024, 24, 16, 4096),
    "distilbert": EncoderConfig(768, 6, 12, 3072, type_vocab=0),
    "minilm-l6": EncoderConfig(384, 6, 12, 1536),
    "bert-tiny": EncoderConfig(128, 2, 2, 512, vocab=1000),
}


def prune_by_magnitude(weight: np.ndarray, sparsity: float) -> np.ndarray:
    """Zero the `sparsity` fraction of entries with the smallest magnitude."""
    k = int(round(sparsity * weight.size))
    if k <= 0:
        return weight
    flat = np.abs(weight).reshape(-1)
    cut = np.partition(flat, k - 1)[k - 1]
    pruned = weight.copy()
    pruned[np.abs(weight) <= cut] = 0.0
    return pruned


class _Builder:
    def __init__(self, rng: np.random.Generator, sparsity: float):
        self.rng, self.sparsity = rng, sparsity
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, array, hint: str = "const") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, **attrs) -> str:
        out = self.name(hint or op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=f"/{out}", **attrs))
        return out

    def weight(self, *shape: int, std: float = 0.02, prune: bool = False) -> np.ndarray:
        w = (self.rng.standard_normal(shape) * std).astype(np.float32)
        return prune_by_magnitude(w, self.sparsity) if prune else w

    def linear(self, x: str, k: int, n: int, hint: str) -> str:
        w = self.const(self.weight(k, n, prune=True), f"{hint}.weight")
        b = self.const(self.weight(n), f"{hint}.bias")
        return self.op("Add", [self.op("MatMul", [x, w], f"{hint}/MatMul"), b], f"{hint}/Add")

    def layer_norm(self, x: str, n: int, hint: str) -> str:
        gamma = self.const((1.0 + self.weight(n, std=0.1)).astype(np.float32), f"{hint}.weight")
        beta = self.const(self.weight(n), f"{hint}.bias")
        return self.op("LayerNormalization", [x, gamma, beta], hint, axis=-1, epsilon=1e-12)

    def gelu(self, x: str) -> str:
        scaled = self.op("Div", [x, self.const(np.float32(np.sqrt(2.0)))])
        erf_plus_1 = self.op("Add", [self.op("Erf", [scaled]), self.const(np.float32(1.0))])
        return self.op("Mul", [self.op("Mul", [x, erf_plus_1]), self.const(np.float32(0.5))])


def build_encoder(
    config: EncoderConfig, sparsity: float = 0.0, seed: int = 0, name: str = "encoder"
) -> onnx.ModelProto:
    """An encoder taking input_ids and attention_mask [batch, sequence] (int64), and
    token_type_ids when the config has token types; output last_hidden_state."""
    c = config
    b = _Builder(np.random.default_rng(seed), sparsity)
    head_dim = c.hidden // c.heads
    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if c.type_vocab else [])

    # Embeddings: word + position (sliced to the sequence length, as HF does) + token type.
    x = b.op("Gather", [b.const(b.weight(c.vocab, c.hidden), "word_embeddings"), "input_ids"])
    seq_len = b.op("Gather", [b.op("Shape", ["input_ids"]), b.const(np.array([1], np.int64))])
    positions = b.op(
        "Slice",
        [
            b.const(np.arange(c.max_positions, dtype=np.int64)[None, :], "position_ids"),
            b.const(np.array([0], np.int64)),
            seq_len,
            b.const(np.array([1], np.int64)),
        ],
    )
    pos = b.op(
        "Gather", [b.const(b.weight(c.max_positions, c.hidden), "position_embeddings"), positions]
    )
    x = b.op("Add", [x, pos])
    if c.type_vocab:
        types = b.op(
            "Gather",
            [b.const(b.weight(c.type_vocab, c.hidden), "token_type_embeddings"), "token_type_ids"],
        )
        x = b.op("Add", [x, types])
    x = b.layer_norm(x, c.hidden, "embeddings.LayerNorm")

    # Additive mask [batch, 1, 1, sequence]: 0 where attended, float32 min where padded.
    mask = b.op(
        "Cast",
        [b.op("Unsqueeze", ["attention_mask", b.const(np.array([1, 2], np.int64))])],
        to=TensorProto.FLOAT,
    )
    mask = b.op(
        "Mul",
        [
            b.op("Sub", [b.const(np.float32(1.0)), mask]),
            b.const(np.float32(np.finfo(np.float32).min)),
        ],
        "extended_mask",
    )

    split_heads = b.const(np.array([0, 0, c.heads, head_dim], np.int64), "split_heads")
    merge_heads = b.const(np.array([0, 0, c.hidden], np.int64), "merge_heads")
    scale = b.const(np.float32(np.sqrt(head_dim)), "attention_scale")
    for i in range(c.layers):
        p = f"encoder.layer.{i}"

        def heads(t: str, perm: list[int]) -> str:
            return b.op("Transpose", [b.op("Reshape", [t, split_heads])], perm=perm)

        q = heads(b.linear(x, c.hidden, c.hidden, f"{p}.attention.self.query"), [0, 2, 1, 3])
        k = heads(b.linear(x, c.hidden, c.hidden, f"{p}.attention.self.key"), [0, 2, 3, 1])
        v = heads(b.linear(x, c.hidden, c.hidden, f"{p}.attention.self.value"), [0, 2, 1, 3])
        scores = b.op("Add", [b.op("Div", [b.op("MatMul", [q, k]), scale]), mask])
        probs = b.op("Softmax", [scores], axis=-1)
        context = b.op("Transpose", [b.op("MatMul", [probs, v])], perm=[0, 2, 1, 3])
        context = b.op("Reshape", [context, merge_heads])
        attn = b.linear(context, c.hidden, c.hidden, f"{p}.attention.output.dense")
        x = b.layer_norm(b.op("Add", [attn, x]), c.hidden, f"{p}.attention.output.LayerNorm")
        h = b.gelu(b.linear(x, c.hidden, c.intermediate, f"{p}.intermediate.dense"))
        h = b.linear(h, c.intermediate, c.hidden, f"{p}.output.dense")
        x = b.layer_norm(b.op("Add", [h, x]), c.hidden, f"{p}.output.LayerNorm")
    b.nodes.append(helper.make_node("Identity", [x], ["last_hidden_state"], name="/output"))

    graph = helper.make_graph(
        b.nodes,
        name,
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in inputs
        ],
        [
            helper.make_tensor_value_info(
                "last_hidden_state", TensorProto.FLOAT, ["batch", "sequence", c.hidden]
            )
        ],
        b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="sparsednn.models"
    )
    model.ir_version = 8  # readable by every onnxruntime that supports opset 17
    return model


def example_inputs(
    config: EncoderConfig, batch: int, sequence: int, seed: int = 0
) -> dict[str, np.ndarray]:
    """Random token ids with a padded tail on every other row, as real batches have."""
    rng = np.random.default_rng(seed)
    feed = {
        "input_ids": rng.integers(0, config.vocab, (batch, sequence), dtype=np.int64),
        "attention_mask": np.ones((batch, sequence), np.int64),
    }
    for row in range(1, batch, 2):
        feed["attention_mask"][row, sequence - sequence // 4 :] = 0
    if config.type_vocab:
        feed["token_type_ids"] = np.zeros((batch, sequence), np.int64)
        feed["token_type_ids"][:, sequence // 2 :] = 1
    return feed
