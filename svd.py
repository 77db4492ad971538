"""
The top-r singular triplets of each frozen weight, computed once when an adapter is attached.

    W ≈ U diag(S) Vᵀ     U (d_out, r), S (r,), V (d_in, r): the r largest singular values and their vectors

tinylora.py needs nothing more than `top_svd(W, r)`; this file says how it is computed.

Choices:
1. `svd="full"`: `torch.linalg.svd` of the whole matrix, truncated: the obvious reference (PEFT's) (*ours*).
2. `svd="fast"` (default): block Lanczos on the smaller Gram matrix, so only ~30 products with W per matrix;
   deterministic (fixed start block), fp64 basis (*ours*). Figures: docs/BENCHMARKS.md §4.
3. `svd="lowrank"`: the official call, `torch.svd_lowrank(Wᵀ, q=r, niter=10)` on CPU after seeding 42, raw signs
   (*official*). With q = r and no oversampling it can miss the top-r subspace of real weights (dev/bench_svd.py).
4. Singular vectors are defined up to sign: `canonical_sign` makes the largest-|.| entry of each column of U
   positive and flips V's column with it, so one v rebuilds one W' on any machine and library (*ours*; not lowrank).

Letters: m × n the shape of W, d = min(m, n), b the Krylov block width, k the basis width.
"""

import contextlib

import torch

SVDS = ("fast", "full", "lowrank")
LOWRANK_SEED = 42  # the official code's random_state, set again before every module's svd_lowrank


def canonical_sign(U, V):
    """Flip each pair (U[:, j], V[:, j]) so the largest-magnitude entry of U[:, j] is positive (choice 4)."""
    i = U.abs().argmax(dim=0)  # (r,)
    s = torch.sign(U[i, torch.arange(U.shape[1], device=U.device)])
    s[s == 0] = 1
    return U * s, V * s


def top_svd(W, r: int, svd: str = "fast", sign: bool = True):
    """U (d_out, r), S (r,), V (d_in, r) in fp32 with W ≈ U diag(S) Vᵀ on the top r singular values.
    `sign`: canonical signs (choice 4) for the exact solvers; "lowrank" keeps the official call's raw signs."""
    W = W.detach().float()
    if svd == "full":  # the reference: tests/test_svd.py checks the fast path against it
        U, S, Vh = torch.linalg.svd(W, full_matrices=False)
        U, S, V = U[:, :r], S[:r], Vh[:r].T
    elif svd == "lowrank":  # choice 3: the official call, its start matrix from the CPU stream; global RNG untouched
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(LOWRANK_SEED)
            V, S, U = torch.svd_lowrank(W.cpu().T, q=r, niter=10)  # of Wᵀ (d_in, d_out): its U is W's V
        U, S, V = U.to(W.device), S.to(W.device), V.to(W.device)
        sign = False  # the official signs: the official ΔW depends on them through P
    elif svd == "fast":
        U, S, V = top_svd_krylov(W, r)
    else:
        raise ValueError(f"unknown svd {svd!r}: use one of {', '.join(SVDS)}")
    if sign:
        U, V = canonical_sign(U, V)
    return U.contiguous(), S.contiguous(), V.contiguous()


def top_svds(weights, r: int, svd: str = "fast", sign: bool = True, workers: int | None = None):
    """top_svd of each weight. On CPU the fast path is a chain of small products and tiny LAPACK calls, for
    which one thread per matrix beats two threads on one matrix (by a lot on a busy machine): so each worker
    thread takes whole matrices with intra-op threading off. dev/bench_svd.py measures the difference."""
    if weights[0].device.type != "cpu" or svd != "fast":
        return [top_svd(W, r, svd, sign) for W in weights]
    workers = workers or torch.get_num_threads()
    with cpu_threads(1):
        if workers == 1:
            return [top_svd(W, r, svd, sign) for W in weights]
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:  # torch releases the GIL inside each op
            return list(pool.map(lambda W: top_svd(W, r, svd, sign), weights))


@contextlib.contextmanager
def cpu_threads(n: int | None):
    """Run a block with n intra-op threads (restored after); None leaves the setting alone."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -----------------------------------------------------------------------------
# the fast path: block Krylov


def _next_block(K, GK, b):
    X = GK[:, -b:]  # next Krylov block, orthogonalised twice against the basis (fp64 Gram-Schmidt)
    X = X - K @ (K.T @ X)
    X = X - K @ (K.T @ X)
    return torch.linalg.qr(X)[0]  # (d, b)


def top_svd_krylov(W, r: int, block: int = 4, tol: float = 1e-6, info: dict | None = None):
    """Top-r singular triplets of W by block Lanczos on the smaller Gram matrix (W Wᵀ or Wᵀ W).

    Only matrix products with W are needed (fp32, the expensive part); the Krylov basis and the small
    Rayleigh-Ritz eigenproblem are fp64. The start block comes from a fixed seed, so the result is a
    deterministic function of W. It stops when the Ritz residual ||G q - θ q|| / θ_1 < tol for the top r.
    """
    m, n = W.shape
    rows = m < n  # work in the smaller dimension d
    d = m if rows else n
    WtX = lambda X: (X.T @ W).T  # Wᵀ X, (n, b): on CPU a product with the transposed view is 5-20x slower
    apply = (lambda X: W @ WtX(X)) if rows else (lambda X: WtX(W @ X))  # Gram product: (d, b) -> (d, b)
    b = min(block, d)
    g = torch.Generator().manual_seed(0)
    X, _ = torch.linalg.qr(torch.randn(d, b, generator=g, dtype=torch.float64).to(W.device))  # (d, b)
    K, GK = X, apply(X.float()).double()  # basis (d, k) and the Gram matrix applied to it
    while True:
        if K.shape[1] < 6 * b and K.shape[1] + b <= d:  # no real matrix converges this early: skip the check
            X = _next_block(K, GK, b)
            K, GK = torch.cat([K, X], 1), torch.cat([GK, apply(X.float()).double()], 1)
            continue
        T = K.T @ GK  # (k, k) Rayleigh quotient
        theta, Z = torch.linalg.eigh(((T + T.T) / 2).cpu())  # tiny (k, k): on CPU, where LAPACK has no launch cost
        theta, Z = theta.to(W.device), Z.to(W.device)
        Q = K @ Z[:, -r:]  # (d, r) Ritz vectors, ascending
        res = (GK @ Z[:, -r:] - Q * theta[-r:]).norm(dim=0).max() / theta[-1].clamp(min=1e-300)
        if res < tol or K.shape[1] + b > d:
            break
        X = _next_block(K, GK, b)
        K, GK = torch.cat([K, X], 1), torch.cat([GK, apply(X.float()).double()], 1)
    if info is not None:  # for dev/bench_svd.py: how many products with W this matrix needed
        info["products"] = info.get("products", 0) + K.shape[1] // b
    if res >= tol:  # the basis spans the whole space: the exact eigendecomposition of the small Gram
        Gd = (W.double() @ W.double().T) if rows else (W.double().T @ W.double())
        Q = torch.linalg.eigh(Gd)[1][:, -r:]
    Q = Q.flip(1).float()  # (d, r), descending
    # the other side from one product with W: W v_j = σ_j u_j
    if rows:
        WtU = WtX(Q)  # (n, r)
        S = WtU.norm(dim=0)
        return Q, S, WtU / S.clamp(min=1e-30)
    WV = W @ Q  # (m, r)
    S = WV.norm(dim=0)
    return WV / S.clamp(min=1e-30), S, Q
