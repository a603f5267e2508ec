"""arcopo_fast.noise (NoisePlan) and the Philox4x32-10 generator behind it (reference and Triton)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from arcopo_fast import ops  # noqa: E402
from arcopo_fast.kernels import reference as ref  # noqa: E402
from arcopo_fast.noise import NoiseKind, NoisePlan, counter_words, split_seed  # noqa: E402

# Random123's known-answer vectors for philox4x32-10 (kat_vectors): (counter, key, output).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]

NORMAL_ATOL = 1e-5  # log/cos last bits differ between math libraries (see tests/test_sampler_step.py)


def _can_run_triton() -> bool:
    return ops.triton_available() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


needs_triton = pytest.mark.skipif(not _can_run_triton(), reason="needs triton (CUDA or TRITON_INTERPRET=1)")


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_reference_philox_known_answers(ctr, key, want):
    got = ref.philox4x32(*[torch.tensor([c]) for c in ctr], *key)
    assert [int(w) for w in got] == list(want)


@needs_triton
@pytest.mark.parametrize("ctr,key,want", KAT)
def test_triton_philox_known_answers(ctr, key, want):
    from arcopo_fast.kernels import sampler_step

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    got = sampler_step.philox_words(*[torch.tensor([c], device=dev) for c in ctr], *key)
    assert [int(w) for w in got] == list(want)


@needs_triton
def test_ops_philox_normal_triton_matches_torch():
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    c1, c3 = torch.tensor([0, 11, 2**32 - 1]), torch.tensor([3 << 24, 5, 0xFFFFFF])
    args = (4099, 0xDEADBEEF, 0x01020304, c1.to(dev), (NoiseKind.SOLVER << 24) | 6, c3.to(dev))
    a = ops.philox_normal(*args, backend="triton").cpu()
    b = ops.philox_normal(*args, backend="torch").cpu()
    assert a.shape == b.shape == (3, 4099)
    assert (a - b).abs().max().item() <= NORMAL_ATOL


def test_same_key_same_tensor():
    plan = NoisePlan(2024)
    key = plan.key([5, 9], chunk=2, step=1, kind=NoiseKind.SOLVER, branch=[0, 3])
    a = plan.normal((3, 4, 5), key)
    b = NoisePlan(2024).normal(
        (3, 4, 5), plan.key([5, 9], chunk=2, step=1, kind=NoiseKind.SOLVER, branch=[0, 3])
    )
    assert a.shape == (2, 3, 4, 5) and torch.equal(a, b)
    # a row depends on its own (sample, branch) only: the same sample in another batch is the same noise
    c = plan.normal((3, 4, 5), plan.key([9], chunk=2, step=1, kind=NoiseKind.SOLVER, branch=3))
    assert torch.equal(a[1], c[0])


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


@pytest.mark.parametrize(
    "field,other",
    [
        ("seed", 2),
        ("sample", 1),
        ("branch", 1),
        ("chunk", 1),
        ("step", 1),
        ("kind", NoiseKind.SOLVER),
    ],
)
def test_different_key_fields_give_uncorrelated_noise(field, other):
    n = 20_000
    base = dict(sample=0, chunk=0, step=0, kind=NoiseKind.INITIAL, branch=0)
    plan = NoisePlan(1)
    a = plan.normal((n,), plan.key(**base))[0]
    if field == "seed":
        b = NoisePlan(other).normal((n,), plan.key(**base))[0]
    else:
        b = plan.normal((n,), plan.key(**{**base, field: other}))[0]
    assert not torch.equal(a, b)
    assert abs(_corr(a, b)) < 5 / n**0.5  # 5 sigma of the null correlation
    # also no shifted copy (a counter layout bug would show up as b = a shifted by whole rows)
    assert abs(_corr(a[1:], b[:-1])) < 5 / n**0.5


def test_moments_close_to_standard_normal():
    n = 100_000
    plan = NoisePlan(0xFEEDFACECAFEBEEF)
    z = plan.normal((n,), plan.key(3, chunk=4, step=2, kind=NoiseKind.SOLVER, branch=5)).double().flatten()
    mean, std = z.mean().item(), z.std().item()
    kurt = (((z - z.mean()) / z.std()) ** 4).mean().item()
    skew = (((z - z.mean()) / z.std()) ** 3).mean().item()
    # 5-sigma bounds: se(mean) = 1/sqrt(n), se(std) = 1/sqrt(2n), se(skew) = sqrt(6/n), se(kurt) = sqrt(24/n)
    assert abs(mean) < 5 / n**0.5
    assert abs(std - 1) < 5 / (2 * n) ** 0.5
    assert abs(skew) < 5 * (6 / n) ** 0.5
    assert abs(kurt - 3) < 5 * (24 / n) ** 0.5
    assert torch.isfinite(z).all() and z.abs().max() < 6.0  # |z| <= sqrt(-2 ln 2^-24) = 5.77 by construction
    # the tail frequency matches the normal: P(|z| > 2) = 0.0455
    assert abs((z.abs() > 2).double().mean().item() - 0.0455) < 5 * (0.0455 * 0.9545 / n) ** 0.5


def test_dtype_and_device_arguments():
    plan = NoisePlan(3)
    z = plan.normal((4, 5), plan.key(0, 0), dtype=torch.bfloat16)
    assert z.dtype == torch.bfloat16 and z.shape == (1, 4, 5)
    torch.testing.assert_close(z, plan.normal((4, 5), plan.key(0, 0)).bfloat16(), rtol=0, atol=0)


def test_words_match_normal():
    """words() is what the fused step consumes: the generator on those words is normal()."""
    plan = NoisePlan(2**64 - 1)
    key = plan.key([1, 2], chunk=5, step=3, kind=NoiseKind.SOLVER, branch=[4, 0xFFFFFF])
    k0, k1, c1, c2, c3 = plan.words(key)
    assert (k0, k1) == (0xFFFFFFFF, 0xFFFFFFFF)
    z = ref.philox_normal_ref(12, k0, k1, c1, c2, c3)
    assert torch.equal(z.view(2, 3, 4), plan.normal((3, 4), key))


def test_counter_layout():
    c1, c2, c3 = counter_words(
        torch.tensor([7]), chunk=5, step=3, kind=NoiseKind.SOLVER, branch=torch.tensor([9])
    )
    assert int(c1) == 7 and int(c2) == (int(NoiseKind.SOLVER) << 24) | 5 and int(c3) == (3 << 24) | 9
    assert split_seed(0x0123456789ABCDEF) == (0x89ABCDEF, 0x01234567)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: NoisePlan(-1), "seed must be in"),
        (lambda: NoisePlan(2**64), "seed must be in"),
        (lambda: NoisePlan(0).key(-1, 0), "sample ids"),
        (lambda: NoisePlan(0).key(2**32, 0), "sample ids"),
        (lambda: NoisePlan(0).key(0, 0, branch=2**24), "branch ids"),
        (lambda: NoisePlan(0).key([[0, 1]], 0), "sample must be"),
        (lambda: NoisePlan(0).normal((4,), NoisePlan(0).key(0, 2**24)), "chunk must be"),
        (lambda: NoisePlan(0).normal((4,), NoisePlan(0).key(0, 0, step=256)), "step must be"),
        (lambda: NoisePlan(0).normal((2**16, 2**16), NoisePlan(0).key(0, 0)), "at most 2\\*\\*32"),
    ],
)
def test_key_validation(call, match):
    with pytest.raises(ValueError, match=match):
        call()
