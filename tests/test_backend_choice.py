"""The measured backend choice of "auto" (arcopo_fast/backend_choice.py) and the Self-Forcing style SDPA
candidate (attention_backends.py), on CPU: "auto" is made to measure on CPU, with fake timers."""

from __future__ import annotations

import json

from triton_env import require_kernel_device

require_kernel_device()  # sets TRITON_INTERPRET=1 (CPU) unless chosen; before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast import attention_backends, backend_choice, ops, selftest  # noqa: E402
from arcopo_fast.backend_choice import Chooser  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402

B, LQ, H, D = 2, 16, 2, 16


class FakeTimer:
    """Milliseconds per candidate from a table (the chooser's warm-up call already ran the candidate)."""

    def __init__(self, table):
        self.table, self.calls = dict(table), []

    def __call__(self, name, fn, device):
        self.calls.append(name)
        return self.table[name]


@pytest.fixture
def measured_on_cpu(monkeypatch, tmp_path):
    monkeypatch.setattr(ops, "MEASURE_ON", ("cuda", "cpu"))
    monkeypatch.delenv("ARCOPO_BACKEND", raising=False)
    monkeypatch.setenv("ARCOPO_SELFTEST", "0")  # test_never_picks_... turns the checks on
    selftest.reset()

    def install(table, env=None):
        timer = FakeTimer(table)
        kw = {} if env is None else {"env": env}
        backend_choice.set_chooser(Chooser(tmp_path, timer=timer, **kw))
        ops._AUTO_MEMO.clear()
        return timer

    yield install
    backend_choice.set_chooser(None)
    selftest.reset()


def _inputs(cap, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, LQ, H, D, generator=g, dtype=dtype) for _ in range(3))
    kc, vc = (torch.randn(B, cap, H, D, generator=g, dtype=dtype) for _ in range(2))
    return q, k, v, kc, vc


def test_buckets_keep_an_81_frame_video_to_three_timings():
    lks = [4680 * c for c in range(1, 8)]
    assert len({backend_choice.bucket(4, 4680, lk, 12, 128) for lk in lks}) == 3
    assert backend_choice.bucket(3, 4680, 9360, 12, 128) == "B4-Lq8192-Lk16384-H12-D128"


@pytest.mark.parametrize("past", [0, 24])
def test_contiguous_view_candidate_equals_the_reference(past):
    """Self-Forcing's way: the chunk's own K/V are written into the cache right after the past and SDPA
    (math backend on CPU) reads [past ; own] as one view. Equal to the float64 reference; without
    cache_scratch the cache is never written (the gathered path)."""
    q, k, v, kc, vc = _inputs(past + LQ + 5)
    want, _ = ref.chunk_attention_ref(q, k, v, kc, vc, past)
    before = kc.clone()
    got = ops.chunk_attention(q, k, v, kc, vc, past, backend="sdpa_math", cache_scratch=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc[:, past : past + LQ], k) and torch.equal(vc[:, past : past + LQ], v)
    assert torch.equal(kc[:, :past], before[:, :past]) and torch.equal(kc[:, past + LQ :], before[:, past + LQ :])
    kc2 = before.clone()
    got2 = ops.chunk_attention(q, k, v, kc2, vc, past, backend="sdpa_math")
    torch.testing.assert_close(got2, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(kc2, before)


def test_contiguous_view_only_where_valid():
    q, k, v, kc, vc = _inputs(30)
    ok = lambda **kw: attention_backends.contiguous_view_ok(
        q, k, kw.get("kc", kc), kw.get("n", 10), kw.get("rows"), kw.get("kp"), kw.get("scratch", True), kw.get("grad", False))
    assert ok()
    assert not ok(scratch=False) and not ok(grad=True) and not ok(n=torch.tensor([10, 10]))
    assert not ok(rows=torch.tensor([1, 0])) and not ok(kp=kc) and not ok(n=15)  # 15 + 16 > 30 slots
    assert not ok(kc=kc.double())


def test_auto_times_once_per_bucket_and_caches_on_disk(measured_on_cpu, tmp_path):
    timer = measured_on_cpu({"torch": 3.0, "triton": 2.0, "sdpa_math": 1.0, "sdpa_flash": 5.0})
    q, k, v, kc, vc = _inputs(64)
    for n in (20, 30, 33):  # Lk = 36, 46, 49: one bucket (Lk64)
        got = ops.chunk_attention(q, k, v, kc, vc, n, cache_scratch=True)
        torch.testing.assert_close(got, ref.chunk_attention_ref(q, k, v, kc, vc, n)[0], rtol=1e-5, atol=1e-5)
    assert sorted(timer.calls) == ["sdpa_flash", "sdpa_math", "torch", "triton"]
    assert torch.equal(kc[:, 33 : 33 + LQ], k)  # the winner (sdpa_math) read the contiguous view
    ops.chunk_attention(q, k, v, kc, vc, 10, cache_scratch=True)  # Lk 26: a new bucket
    assert len(timer.calls) == 8
    files = list(tmp_path.glob("backend_choice-*.json"))
    assert len(files) == 1
    data = json.loads(files[0].read_text())
    assert data["env"]["torch"] == torch.__version__ and "driver" in data["env"] and data["env"]["device"] == "cpu"
    entry = data["choices"]["chunk_attention|cache/fwd/d16|float32|B2-Lq16-Lk64-H2-D16"]
    assert entry["backend"] == "sdpa_math" and entry["ms"]["triton"] == 2.0

    # a new process (a new chooser on the same directory): no timing, the disk verdicts serve
    timer2 = measured_on_cpu({"torch": 1.0, "triton": 1.0, "sdpa_math": 1.0, "sdpa_flash": 1.0})
    ops.chunk_attention(q, k, v, kc, vc, 20, cache_scratch=True)
    assert timer2.calls == []
    # other versions / driver / device: measured again
    timer3 = measured_on_cpu({"torch": 1.0, "triton": 0.5, "sdpa_math": 2.0, "sdpa_flash": 2.0},
                             env=lambda d: {**backend_choice.environment(d), "driver": "999.9"})
    ops.chunk_attention(q, k, v, kc, vc, 20, cache_scratch=True)
    assert len(timer3.calls) == 4 and len(list(tmp_path.glob("backend_choice-*.json"))) == 2


def test_forward_and_backward_are_chosen_separately(measured_on_cpu):
    """Forward-only calls and calls that need gradients are separate variants with their own winners;
    the contiguous view never serves a call that needs gradients for k and v."""
    fwd_fast = {"torch": 3.0, "triton": 2.0, "sdpa_math": 1.0, "sdpa_flash": 4.0}
    timer = measured_on_cpu(fwd_fast)
    q, k, v, kc, vc = _inputs(64, seed=3)
    with torch.no_grad():
        ops.chunk_attention(q, k, v, kc, vc, 30, cache_scratch=True)
    n_fwd = len(timer.calls)
    timer.table.update({"triton": 0.5})  # the fwd+bwd timings: ours wins (no dk/dv work for the cache)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    kc_before = kc.clone()
    out = ops.chunk_attention(qg, kg, vg, kc, vc, 20, cache_scratch=True)
    out.square().sum().backward()
    assert len(timer.calls) == 2 * n_fwd
    assert torch.equal(kc[:, :20], kc_before[:, :20])
    choices = backend_choice.chooser().choices(torch.device("cpu"))
    by_variant = {k.split("|")[1]: c.backend for k, c in choices.items()}
    assert by_variant == {"cache/fwd/d16": "sdpa_math", "cache/fwd+bwd/d16": "triton"}
    q64, k64, v64 = (t.double().requires_grad_(True) for t in (q, k, v))
    ref.chunk_attention_ref(q64, k64, v64, kc, vc, 20)[0].square().sum().backward()
    for a, b in ((qg, q64), (kg, k64), (vg, v64)):
        torch.testing.assert_close(a.grad, b.grad.float(), rtol=1e-4, atol=1e-4)


def test_never_picks_a_candidate_that_failed_or_cannot_serve(measured_on_cpu, monkeypatch):
    """The fastest candidate on paper loses when it fails its self-test (never timed) or raises at the
    call's shape (recorded with its error); per-row lengths leave only the kernels that take a mask."""
    real = attention_backends.chunk_attention

    def wrong_flash(name, *a, **kw):
        out = real(name, *a, **kw)
        return out + 1.0 if name == "sdpa_flash" else out

    monkeypatch.setattr(attention_backends, "chunk_attention", wrong_flash)
    monkeypatch.setenv("ARCOPO_SELFTEST", "cpu")
    timer = measured_on_cpu({"torch": 3.0, "triton": 2.0, "sdpa_math": 1.0, "sdpa_flash": 0.1})
    from arcopo_fast.kernels import block_attn

    real_triton = block_attn.chunk_attention

    def no_fit(q, *a, **kw):  # passes its (Lq 24) self-test, raises at the call's shape (Lq 16)
        if q.shape[1] == LQ:
            raise RuntimeError("out of shared memory (injected)")
        return real_triton(q, *a, **kw)

    monkeypatch.setattr(block_attn, "chunk_attention", no_fit)
    q, k, v, kc, vc = _inputs(64, seed=5)
    with pytest.warns(RuntimeWarning, match="sdpa_flash' failed its self-test"):
        got = ops.chunk_attention(q, k, v, kc, vc, 25)
    assert "sdpa_flash" not in timer.calls
    (choice,) = backend_choice.chooser().choices(torch.device("cpu")).values()
    assert choice.backend == "sdpa_math" and "out of shared memory" in choice.failed["triton"]
    torch.testing.assert_close(got, ref.chunk_attention_ref(q, k, v, kc, vc, 25)[0], rtol=1e-5, atol=1e-5)
    timer.calls.clear()
    lens = torch.tensor([25, 9], dtype=torch.int32)
    ops.chunk_attention(q, k, v, kc, vc, lens)
    assert "sdpa_math" not in timer.calls and "torch" in timer.calls  # a key mask: SDPA kernels out


def test_forced_backend_wins_over_the_measured_choice(measured_on_cpu, monkeypatch):
    timer = measured_on_cpu({"torch": 3.0, "triton": 2.0, "sdpa_math": 1.0, "sdpa_flash": 4.0})
    monkeypatch.setenv("ARCOPO_BACKEND", "torch")
    q, k, v, kc, vc = _inputs(64, seed=6)
    before = kc.clone()
    ops.chunk_attention(q, k, v, kc, vc, 30, cache_scratch=True)
    assert timer.calls == [] and torch.equal(kc, before)


def test_compiled_graph_takes_the_largest_measured_bucket(measured_on_cpu):
    """Inside torch.compile the choice is a trace-time constant per variant: the winner of the largest
    measured bucket when it is our kernel, SDPA's dispatch (torch) otherwise; no timing while tracing."""
    timer = measured_on_cpu({"torch": 3.0, "triton": 1.0, "sdpa_math": 2.0, "sdpa_flash": 4.0})
    q, k, v, kc, vc = _inputs(200, seed=7)
    with torch.no_grad():
        ops.chunk_attention(q, k, v, kc, vc, 150, cache_scratch=True)  # bucket Lk256: triton wins
        n = len(timer.calls)
        f = torch.compile(lambda q, k, v, kc, vc: ops.chunk_attention(q, k, v, kc, vc, 5, cache_scratch=True),
                          fullgraph=True, backend="aot_eager")
        got = f(q, k, v, kc, vc)
    assert len(timer.calls) == n
    assert ops._traced_attention_backend("chunk_attention", "cache/fwd/d16", "cpu", "torch.float32") == "triton"
    torch.testing.assert_close(got, ref.chunk_attention_ref(q, k, v, kc, vc, 5)[0], rtol=1e-5, atol=1e-5)
