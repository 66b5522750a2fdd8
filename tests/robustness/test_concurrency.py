"""run() is re-entrant: one session used from 8 threads at once returns what serial runs
return; several sessions (different models, different thread counts) in one process, run and
created concurrently, do not interfere."""

import threading

import numpy as np
import pytest

import sparsednn
from sparsednn.models import ARCHITECTURES, build_encoder, example_inputs
from sparsednn.testing import shape_ops_model, small_mlp

TINY = ARCHITECTURES["bert-tiny"]


def same(got, want):
    """Equal up to BLAS summation order: numpy's OpenBLAS is not pinned to one thread in every
    concurrent run (see SingleThreadedBlas), so dense products may differ in the last ulp."""
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def in_threads(n, work):
    """Run work(i) in n threads started together; re-raise the first error."""
    errors = []
    barrier = threading.Barrier(n)

    def body(i):
        try:
            barrier.wait()
            work(i)
        except BaseException as e:  # noqa: BLE001 (reported to the test)
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def bert_sessions():
    return {
        threads: sparsednn.InferenceSession(
            build_encoder(TINY, 0.9), sparsednn.SessionOptions(intra_op_num_threads=threads)
        )
        for threads in (1, 2)
    }


@pytest.mark.parametrize("threads", [1, 2])
def test_one_session_from_8_threads_matches_serial_runs(bert_sessions, threads):
    session = bert_sessions[threads]
    # different shapes per thread: (batch, sequence) from 1x1 to 5x40
    feeds = [example_inputs(TINY, 1 + i % 5, 1 + 5 * i, seed=i) for i in range(8)]
    expected = [session.run(None, f)[0] for f in feeds]
    results = [[] for _ in range(8)]

    def work(i):
        for _ in range(4):
            results[i].append(session.run(None, feeds[(i + _) % 8])[0])

    in_threads(8, work)
    for i in range(8):
        for j, got in enumerate(results[i]):
            same(got, expected[(i + j) % 8])


def test_errors_in_one_thread_do_not_disturb_the_others(bert_sessions):
    session = bert_sessions[2]
    good = example_inputs(TINY, 2, 9)
    want = session.run(None, good)[0]
    bad = {**good, "input_ids": good["input_ids"].astype(np.int32)}

    def work(i):
        for _ in range(5):
            if i % 2:
                with pytest.raises(sparsednn.errors.InvalidInputError):
                    session.run(None, bad)
            else:
                same(session.run(None, good)[0], want)

    in_threads(8, work)


def test_several_sessions_with_different_models_and_thread_counts(bert_sessions):
    dense = sparsednn.InferenceSession(
        build_encoder(TINY, 0.0, seed=1), sparsednn.SessionOptions(intra_op_num_threads=2)
    )
    mlp = sparsednn.InferenceSession(small_mlp(), sparsednn.SessionOptions(intra_op_num_threads=1))
    shapes = sparsednn.InferenceSession(shape_ops_model())
    x = np.random.default_rng(0).standard_normal((33, 12)).astype(np.float32)
    jobs = [
        (bert_sessions[1], example_inputs(TINY, 3, 20, seed=1)),
        (bert_sessions[2], example_inputs(TINY, 2, 31, seed=2)),
        (dense, example_inputs(TINY, 4, 16, seed=3)),
        (mlp, {"x": x}),
        (shapes, {"x": np.ones((1, 4), np.float32)}),
    ]
    expected = [s.run(None, f) for s, f in jobs]

    def work(i):
        s, f = jobs[i % len(jobs)]
        for _ in range(5):
            for got, want in zip(s.run(None, f), expected[i % len(jobs)]):
                same(got, want)

    in_threads(2 * len(jobs), work)


def test_sessions_created_while_others_run(bert_sessions):
    session = bert_sessions[2]
    feed = example_inputs(TINY, 2, 12)
    want = session.run(None, feed)[0]
    built = {}

    def work(i):
        if i < 3:  # compile new models (distinct weights) while the others run
            s = sparsednn.InferenceSession(small_mlp(seed=100 + i))
            built[i] = s.run(None, {"x": np.ones((2, 12), np.float32)})[0]
        else:
            for _ in range(6):
                same(session.run(None, feed)[0], want)

    in_threads(6, work)
    for i, got in built.items():
        again = sparsednn.InferenceSession(small_mlp(seed=100 + i))
        same(got, again.run(None, {"x": np.ones((2, 12), np.float32)})[0])


def test_profiling_counts_every_concurrent_run():
    s = sparsednn.InferenceSession(small_mlp(), sparsednn.SessionOptions(enable_profiling=True))
    x = np.ones((3, 12), np.float32)
    in_threads(8, lambda i: [s.run(None, {"x": x}) for _ in range(10)])
    assert {p.calls for p in s.profile()} == {80}
