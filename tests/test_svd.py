"""
svd.py against independent references: a matrix with a known spectrum, `torch.linalg.svd` (fp32 and float64) on
random and real weights, and sign flips. Run: python -m pytest -q tests/test_svd.py
"""

import pytest
import torch

import svd
from model import load_model
from tinylora import TARGETS, module_names


@pytest.fixture(scope="module")
def ck(make_checkpoint):
    return make_checkpoint("qwen2")


@svd.cpu_threads(1)  # tiny LAPACK calls: one thread is much faster on a shared CPU
def test_fast_svd_equals_full_svd(ck):
    g = torch.Generator().manual_seed(0)
    # a known spectrum with a near-tie between σ2 and σ3 (the hard case), tall and wide
    for m, n in ((300, 120), (96, 400)):
        k = min(m, n)
        U0, _ = torch.linalg.qr(torch.randn(m, k, generator=g, dtype=torch.float64))
        V0, _ = torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64))
        s = torch.cat([torch.tensor([10.0, 5.0, 4.99]), torch.linspace(4.5, 0.01, k - 3)]).double()
        W = ((U0 * s) @ V0.T).float()
        U, S, V = svd.top_svd(W, 2, "fast")
        assert torch.allclose(S.double(), s[:2], rtol=1e-5)
        Ur, Vr = svd.canonical_sign(U0[:, :2].float(), V0[:, :2].float())
        assert (U - Ur).abs().max() < 1e-3 and (V - Vr).abs().max() < 1e-3  # gap 0.2%: conditioning-limited
    model = load_model(str(ck), dtype=torch.float32, device="cpu")
    for i in range(2):
        for t in TARGETS:
            W = model.get_submodule(module_names(2, (t,))[i]).weight
            for r in (1, 2, 5):
                a, b = svd.top_svd(W, r, "fast"), svd.top_svd(W, r, "full")
                for x, y in zip(a, b):
                    assert (x - y).abs().max() < 1e-4, (t, r)
                # and it is the SVD: W V = U Σ
                assert torch.allclose(W @ a[2], a[0] * a[1], atol=1e-4)


@pytest.mark.slow
@svd.cpu_threads(1)
def test_fast_svd_on_real_weights(smollm2):
    """Real spectra have near-ties (σ3/σ2 up to 0.998 in SmolLM2): fast path vs a float64 SVD, first and last layer."""
    from safetensors import safe_open

    names = module_names(30)
    names = names[:7] + names[-7:]
    with safe_open(str(smollm2 / "model.safetensors"), framework="pt") as f:
        Ws = [f.get_tensor(n + ".weight").float() for n in names]
    R = torch.randn(2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name, W in zip(names, Ws):
        U, S, V = (t.double() for t in svd.top_svd(W, 2, "fast"))
        U0, S0, Vh0 = torch.linalg.svd(W.double(), full_matrices=False)
        U0, V0 = svd.canonical_sign(U0[:, :2], Vh0[:2].T)
        dW, dW0 = (U * S) @ R @ V.T, (U0 * S0[:2]) @ R @ V0.T
        assert ((dW - dW0).norm() / dW0.norm()).item() < 1e-4, name
        assert torch.allclose(S, S0[:2], rtol=1e-5), name


def test_canonical_sign_is_stable_under_flips():
    W = torch.randn(50, 30, generator=torch.Generator().manual_seed(3))
    U, S, V = torch.linalg.svd(W, full_matrices=False)
    a = svd.canonical_sign(U[:, :2], V[:2].T)
    b = svd.canonical_sign(-U[:, :2], -V[:2].T)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert (a[0].gather(0, a[0].abs().argmax(0, keepdim=True)) > 0).all()


def test_top_svds_threads_give_the_sequential_answer():
    """attach() runs the fast path on worker threads, one matrix each: the result must not depend on that."""
    g = torch.Generator().manual_seed(4)
    Ws = [torch.randn(m, n, generator=g) for m, n in ((64, 40), (40, 96), (80, 80), (33, 70))]
    one = [svd.top_svd(W, 2) for W in Ws]
    for workers in (1, 3):
        for a, b in zip(svd.top_svds(Ws, 2, workers=workers), one):
            assert all(torch.equal(x, y) for x, y in zip(a, b))
