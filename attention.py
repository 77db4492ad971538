"""
Attention for model.py in the layouts PyTorch's fused CUDA kernels accept, a guard that makes a fall back to the
math kernel an error, and probes for checking layouts on a GPU. The layouts (model.py choice 2):
- no padding before any real token (training rows [prompt | completion | right padding], an unpadded prefill):
  `is_causal` and no mask, so flash attention runs, GQA included, and no T x T scores are stored;
- one new token per row (decode): the GQA group folded into the query axis, q (B, Hkv, H/Hkv, D) against the
  cache's (B, Hkv, S, D), so the (B, 1, 1, S) key mask broadcasts over it with no K/V copy;
- anything else (left-padded prompts): K/V repeated to the H query heads once, with the explicit mask. A query
  with no visible key (a left pad) may see itself, so no row is all -inf (its output is ignored anyway).
On CUDA every call may use only the flash / memory-efficient / cuDNN kernels: a layout that would fall back to the
math kernel (fp32 upcast, K/V repeated, scores kept for backward) raises, naming its shapes.

    y = attend(q, k, v, mask)        # q (B, H, T, D), k/v (B, Hkv, S, D); mask None = causal, else (B, 1, T, S)
    with record_attention() as calls: model(idx)     # [(shapes, backend)] of every SDPA call in the block
"""

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

FUSED = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def fused_only(device: torch.device):
    """On CUDA, SDPA may pick a fused kernel only, never the math fallback (model.py choice 2); off elsewhere (the CPU
    kernels take every layout). Entered once per forward, not per layer: the context costs tens of microseconds.
    A block recomputed in backward (checkpointing) runs outside it, on the shapes that already passed."""
    return sdpa_kernel(FUSED) if device.type == "cuda" else contextlib.nullcontext()


def describe(q, k, v, mask, causal, gqa) -> str:
    m = "None" if mask is None else f"{tuple(mask.shape)} {mask.dtype}"
    return f"q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)} {q.dtype}, mask {m}, causal={causal}, gqa={gqa}"


def sdpa(q, k, v, mask, causal: bool, gqa: bool):
    """F.scaled_dot_product_attention; under `fused_only`, "no kernel" is re-raised naming the call."""
    try:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
    except RuntimeError as e:
        if "No available kernel" not in str(e) and "No viable backend" not in str(e):  # CUDA's words, CPU's
            raise
        raise RuntimeError(
            f"no fused attention kernel (flash / memory-efficient / cuDNN) takes {describe(q, k, v, mask, causal, gqa)}"
            " -- it would run the slow math kernel. Flash and cuDNN need fp16/bf16: load the model in bf16."
        ) from e


def attend(q, k, v, mask):
    """Attention of q (B, H, T, D) over k, v (B, Hkv, S, D) in a layout the fused kernels accept (model.py choice 2).
    mask None means causal with T == S; else a bool (B, 1, T, S), True where a query may see a key."""
    B, H, T, D = q.shape
    g = H // k.shape[1]  # queries per kv head
    if mask is None:  # nothing padded before a real token: flash, GQA native, no scores stored
        if g > 1 and q.is_cuda and q.dtype == torch.float32:  # flash / cuDNN need 16 bits: memory-efficient, H heads
            k, v, g = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), 1
        return sdpa(q, k, v, None, True, g > 1)
    if T == 1 and g > 1:  # decode: the group is the query axis, the (B, 1, 1, S) mask broadcasts over it
        return sdpa(q.view(B, k.shape[1], g, D), k, v, mask, False, False).view(B, H, 1, D)
    if g > 1:  # padded prefill: the memory-efficient kernel takes a mask with equal head counts only
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)  # (B, H, S, D)
    return sdpa(q, k, v, mask, False, False)


def sdpa_backend(q, k, v, mask=None, causal: bool = False, gqa: bool = False) -> str:
    """Which backend runs this call: the first, in torch's current priority order, that does not refuse it.
    For checking layouts on a GPU (`record_attention`), not for the forward pass: it runs the call up to 5 times."""
    for b in torch._C._get_sdp_priority_order():
        b = SDPBackend(b)
        if b in (SDPBackend.ERROR, SDPBackend.OVERRIDEABLE):
            continue
        try:
            with sdpa_kernel([b]):
                F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
            return b.name
        except RuntimeError:
            continue
    return "none"


@contextlib.contextmanager
def record_attention():
    """Record every SDPA call made inside the block: its description and, on CUDA, the backend that runs it.
        with record_attention() as calls: model(idx)
    Swaps this module's `sdpa` for a recording one, so the forward pass pays nothing outside the block."""
    global sdpa
    plain, calls = sdpa, []

    def recording(q, k, v, mask, causal, gqa):
        y = plain(q, k, v, mask, causal, gqa)  # first: torch settles its CUDA priority order on the first call
        with torch.no_grad():
            used = sdpa_backend(q, k, v, mask, causal, gqa) if q.is_cuda else "cpu"
        calls.append((describe(q, k, v, mask, causal, gqa), used))
        return y

    sdpa = recording
    try:
        yield calls
    finally:
        sdpa = plain
