"""
The one GPU check: everything the project wants measured on one NVIDIA H200, in one run that fits 12 minutes on a
bare box (PyTorch + Triton only: no transformers, no Hub, no download, pytest optional), random weights at the real
shapes. Writes OUT/gpu_check.json (every figure, the GPU, torch / triton versions, git commit, date) and
OUT/gpu_check.md (the figures beside the project's targets, pass / fail), plus one log per stage.

    python dev/gpu_check.py --out OUT           # on the GPU box (or: bash dev/gpu_checks.sh OUT)
    python dev/gpu_check.py --out OUT --dry-run  # on CPU at tiny sizes, the kernel under TRITON_INTERPRET=1

Stages, in order, each in its own process under its own time limit. Time plan from shapes (H200: ~4.3 TB/s HBM,
~790 TFLOP/s bf16; ../shared/PERF.md), then the cap, in seconds:
1. rehearse (plan 100, cap 150): dev/rehearse.py's CUDA path. Qwen2.5-7B random weights built on the GPU (15.2 GB,
   ~5 s), attach on the 196 matrices (GPU SVDs, ~10 s), one sampling call of 64 x 4 = 256 rows, 512 prompt + 3,584
   new tokens, no stop: a step reads 15 GB of weights + 256 x ~2.3k slots x 57 KB = 34 GB of KV on average, ~12 ms
   at the roofline, so 3,584 steps ~ 45 s (~65 s at 70%); one training micro-batch at 4,096 tokens (~5 s);
   max_memory_allocated of each phase beside memory.py's plan. Before sampling, a probe records the SDPA backend of
   every attention call shape (prefill, live and static decode, training forward): MATH or none fails the stage.
2. kernel_correct (plan 100, cap 180): tests/test_kernel.py's check_kernel compiled on the GPU vs float64 (17 shapes
   x 3 dtypes x 5 configs x 3 s = x A variants; ~100 Triton compiles at ~1 s dominate), and generate with the Triton
   kernel and with CUDA-graph decode vs the torch path on a tiny random model (no transformers needed).
3. kernel_bench (plan 90, cap 140): dev/bench_sample.py --what kernel: 7 projections x M = 1, 8, 64, 256, 4096 x
   (cuBLAS + 3 variants + torch + 4 configs) = 315 do_bench calls at ~0.15 s, plus compiles the cache lacks.
4. sampler (plan 150, cap 210): dev/bench_sample.py --what sampler --steps 16: 1.5B and 7B x B = 1, 64, 256 x ctx
   1k, 4k x live / graph x adapter off / on = 48 cases, each 5 calls of <= 24 decode steps (<= 20 ms each) + a 1-row
   prefill (<= 0.1 s) + a graph capture per call: ~2-3 s a case.
5. grpo_step (plan 80, cap 160): one GRPO step at the paper's GSM8K setup on random 7B weights (build + attach ~15
   s): 64 prompts (90-220 tokens) x 4 rollouts, completion lengths drawn from a GSM8K-like log-normal (median 280)
   with 4 rows at 4,096; one lock-step sampling call of 4,096 steps (compacting to the 4 long rows, whose steps are
   weight-bound at ~3.5 ms: ~20-30 s with graph captures), the training pass (~115k tokens x 7.6e9 x 4 ~ 3.5 PFLOP:
   ~5-10 s, more with checkpointing) and the optimizer step.
Plans sum to 520 s (8.7 min); the caps sum past 12 min, so a total budget (--budget, default 690 s) trims them: a
stage runs only with at least MIN_STAGE_S left (else it is skipped with a note), and the JSON and table are always
written. A stage that fails or times out leaves its log tail in the JSON; the next stage still runs.

Choices (*ours*):
1. Lengths are forced inside the sampler's own loop (forced_lengths): sample.sample_next is wrapped for the one call
   so that row i draws its stop token at step L_i - 1 and never before; compaction, CUDA graphs and the KV cache run
   unchanged, so the timed call is the lock-step call a real step with those lengths makes. A forced token's logp is
   the drawn one's (the TIS weights are then noise; the time and memory of training do not depend on them).
2. Rewards are random 0/1, never equal within a group (the step's cost does not depend on them, and v gets a
   gradient); grading (CPU, ~ms a step) and evaluation are not timed.
3. The 3-epoch projection is 348 x (sampling + training) of the one measured step: GSM8K's 7,473 prompts / 64.
"""

import argparse
import contextlib
import io
import json
import math
import os
import platform
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "dev"), str(ROOT / "tests")]

STAGES = {  # name: (planned seconds on an H200, cap) -- the header says where the plan comes from
    "rehearse": (100, 150),
    "kernel_correct": (100, 180),
    "kernel_bench": (90, 140),
    "sampler": (150, 210),
    "grpo_step": (80, 160),
}
BUDGET_S = 690  # 11.5 minutes for all stages together (the machine's start not counted)
MIN_STAGE_S = 30  # a stage with less than this left is skipped, not started
DRY_SLOWER = 3  # a dry run's caps are this many times longer (the interpreter on 2 busy CPU cores); same budget logic
RESERVE_S = 10  # kept back for writing the JSON and the table
EPOCH_STEPS = 348  # 3 epochs of GSM8K at 64 prompts a step
GB = 1e9


def ensure_pytest():
    """tests/test_kernel.py and tests/realsize.py import pytest at the top; on a bare box give them a stand-in that
    has the few names they use at import time (the check functions themselves never touch it)."""
    try:
        import pytest  # noqa: F401

        return True
    except ImportError:
        pass
    mark = types.SimpleNamespace(skipif=lambda *a, **k: lambda f: f, parametrize=lambda *a, **k: lambda f: f)
    stub = types.ModuleType("pytest")
    stub.importorskip = lambda name, **k: __import__(name)
    stub.fixture = lambda *a, **k: a[0] if a and callable(a[0]) else (lambda f: f)
    stub.mark, stub.skip = mark, lambda reason="": None
    sys.modules["pytest"] = stub
    return False


# -----------------------------------------------------------------------------
# the stages (each runs in its own process: `--run-stage NAME`)


def stage_rehearse(dry):
    import rehearse
    import torch

    import attention
    import grpo
    import sample

    def probe(net, prompts, G, T):
        """Every SDPA call shape of sampling (prefill, live and static decode) and of a training forward."""
        dev = net.model.embed_tokens.weight.device
        with attention.record_attention() as calls:
            for decode in ("live", "static"):
                sample.generate(
                    net,
                    prompts,
                    G=G,
                    max_new_tokens=2,
                    stop_ids=[],
                    decode=decode,
                    generator=torch.Generator(dev).manual_seed(0),
                )
            Lp = len(prompts[0])
            ids = torch.randint(0, 384, (1, Lp + min(T, 512)), device=dev)  # the layout, not the length, picks
            cmask = torch.zeros_like(ids, dtype=torch.bool)
            cmask[:, Lp:] = True
            grpo.token_logprobs(net, ids, cmask, Lp)  # with grad on: the training layout
        seen = {}
        for desc, backend in calls:
            seen.setdefault(desc, backend)
        for desc, backend in seen.items():
            print(f"  SDPA {backend:<20} {desc}")
        bad = {d: b for d, b in seen.items() if b in ("MATH", "none")}
        if bad:  # the stage still measures, then fails (run_stage)
            print(f"FAIL: attention fell back to the math kernel (or none) for: {bad}", flush=True)
        fail = f"attention fell back to the math kernel for {len(bad)} call shapes" if bad else None
        return {"attention": [{"call": d, "backend": b} for d, b in seen.items()], "fail": fail}

    args = argparse.Namespace(
        device="cpu" if dry else "cuda", layers=0, tiny=dry, prompts=64, G=4, prompt_tokens=512, new_tokens=3584
    )
    out = rehearse.rehearse_in_memory(args, probe=probe)
    out["peak_measured"] = max(out["peak_sampling"], out["peak_training"])
    return out


def stage_kernel_correct(dry):
    import test_kernel
    import torch
    from bench_sample import random_model

    import kernels
    import sample
    import tinylora

    dev = "cpu" if dry else "cuda"
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        test_kernel.check_kernel(dev)
    print(buf.getvalue())
    n_ok, n_want = buf.getvalue().count("ok"), len(test_kernel.SHAPES) * 3
    n_want += 0 if dry else len(test_kernel.REAL_SHAPES) * 3
    assert n_ok == n_want, f"check_kernel: {n_ok} of {n_want} cases ok"
    # generate: the Triton path and the static / CUDA-graph decode vs the torch path, rows stopping early
    model = random_model("tiny", dev=dev, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.1)  # wide enough that logits differ across tokens
    adapter = tinylora.attach(model, u=4, tie=1)
    with torch.no_grad():
        for v in adapter.params:
            v.normal_(0, 0.5)
    kernels.BUCKET = 8  # several length buckets, so several graphs, within 16 tokens
    prompts = [[1, 5, 9, 2], [7, 3], [11, 12, 13, 14, 15, 16]]
    gen = lambda mode, decode: sample.generate(  # noqa: E731
        model,
        prompts,
        G=2,
        max_new_tokens=16,
        stop_ids=list(range(40, 90)),
        mode=mode,
        decode=decode,
        generator=torch.Generator(dev).manual_seed(0),
    )
    ref = gen("torch", "live")
    assert ref.mask.sum(1).min() < ref.mask.sum(1).max(), "rows should stop at different steps"
    cases = []
    for decode in ("live", "static" if dry else "graph"):
        for mode in ("torch", "triton"):
            out = gen(mode, decode)
            err = float((ref.logp - out.logp).abs().max())
            same = bool(torch.equal(ref.tokens, out.tokens))
            cases.append({"mode": mode, "decode": decode, "tokens_equal": same, "max_logp_diff": err})
            assert same and err < 1e-4, cases[-1]
    kernels.BUCKET = 256
    return {"check_kernel_cases": n_ok, "generate_cases": cases, "ok": True}


def stage_kernel_bench(dry):
    import bench_sample

    import kernels

    args = argparse.Namespace(device="cpu" if dry else "cuda", M=[1, 300] if dry else [1, 8, 64, 256, 4096], records=[])
    args.shapes = {"q_proj": (40, 72), "down_proj": (24, 1000)} if dry else bench_sample.SHAPES_7B
    bench_sample.bench_kernel(args)
    for r in args.records:  # what the sampler runs: lowrank_linear_triton's own pick of the s = x A variant by M
        r["default_xa"] = "fused" if r["M"] <= kernels.XA_FUSED_MAX_M else "split"
        r["default_ratio"] = r["xa_us"][r["default_xa"]] / r["cublas_us"]
    return {"rows": args.records}


def stage_sampler(dry):
    import bench_sample

    if dry:
        kw = dict(sizes=["tiny"], contexts=[40], batch_sizes=[1, 8], decodes=["live", "static"], steps=4)
    else:
        kw = dict(sizes=["1.5B", "7B"], contexts=[1024, 4096], batch_sizes=[1, 64, 256], decodes=["live", "graph"])
        kw["steps"] = 16
    args = argparse.Namespace(device="cpu" if dry else "cuda", records=[], **kw)
    bench_sample.bench_sampler(args)
    return {"rows": args.records}


@contextlib.contextmanager
def forced_lengths(lengths, stop_id):
    """Within the block, the sampler's draws end row i (original order) at step lengths[i] - 1 with stop_id, and
    never draw stop_id before (choice 1). Follows generate's compaction: it keeps the unfinished rows in order."""
    import torch

    import sample

    plain, st = sample.sample_next, {"t": 0, "rows": list(range(len(lengths))), "len": None}

    def forced(logits, u, *a, **kw):
        tok, lp = plain(logits, u, *a, **kw)
        t = st["t"]
        if logits.shape[0] < len(st["rows"]):  # generate dropped the rows finished by step t - 1
            st["rows"] = [i for i in st["rows"] if lengths[i] > t]
            st["len"] = None
        assert len(st["rows"]) == logits.shape[0], (len(st["rows"]), logits.shape)
        if st["len"] is None:
            st["len"] = torch.tensor([lengths[i] for i in st["rows"]], device=tok.device)
        tok = torch.where(tok == stop_id, stop_id - 1, tok)  # (n,)
        tok = torch.where(st["len"] == t + 1, stop_id, tok)
        st["t"] = t + 1
        return tok, lp

    sample.sample_next = forced
    try:
        yield
    finally:
        sample.sample_next = plain


def gsm8k_lengths(n, T, n_long, seed=0):
    """Completion lengths like Qwen2.5-7B-Instruct's on GSM8K: log-normal, median 280 tokens, with n_long at T."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.exp(math.log(280) + 0.45 * torch.randn(n, generator=g)).round().clamp(32, T).long()
    x[torch.randperm(n, generator=g)[:n_long]] = T
    return x.tolist()


def stage_grpo_step(dry):
    import rehearse
    import torch
    from realsize import CONFIGS

    import grpo
    import memory
    import sample
    import tinylora

    dev = torch.device("cpu" if dry else "cuda")
    cfg = dict(rehearse.TINY if dry else CONFIGS["qwen2.5-7b"])
    P, G, T, n_long = (4, 2, 24, 1) if dry else (64, 4, 4096, 4)
    vocab, L = cfg["vocab_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(0)
    plens = torch.randint(6 if dry else 90, 12 if dry else 221, (P,), generator=g).tolist()
    prompts = [torch.randint(0, vocab - 2, (n,), generator=g).tolist() for n in plens]
    lengths = gsm8k_lengths(P * G, T, n_long) if not dry else torch.randint(1, T + 1, (P * G,), generator=g).tolist()
    if dry:
        lengths[0] = T
    stop_id = vocab - 1
    plan, msg = memory.choose(
        cfg,
        prompts_per_call=P,
        G=G,
        max_prompt_tokens=max(plens),
        max_new_tokens=T,
        device=dev.type,
        tie=7 * L,
        free=memory.free_memory(dev.type),
        packed_cpu_copy=False,
    )
    print(memory.format_plan(plan))
    if msg:
        print(msg)
    s = plan.settings
    net = rehearse.build_in_memory(cfg, dev)
    adapter = tinylora.attach(net, u=1, tie=7 * L)
    with torch.no_grad():
        adapter.params[0].fill_(0.01)
    if s["grad_checkpointing"]:
        grpo.use_grad_checkpointing(net)
    out = {"prompts": P, "G": G, "max_new_tokens": T, "lengths_mean": sum(lengths) / len(lengths)}
    out |= {"lengths_max": max(lengths), "lengths_at_max": sum(x == T for x in lengths), "plan_settings": s}
    # 1) sampling: one lock-step call at the drawn lengths
    rehearse.reset_peak(dev)
    t = rehearse.now(dev)
    with forced_lengths(lengths, stop_id):
        ro = sample.generate(
            net,
            prompts,
            G=G,
            max_new_tokens=T,
            temperature=1.0,
            stop_ids=[stop_id],
            pad_id=0,
            generator=torch.Generator(dev).manual_seed(0),
        )
    out |= {"t_sample": rehearse.now(dev) - t, "peak_sampling": rehearse.peak_bytes(dev)}
    got = ro.mask.sum(1).tolist()
    assert got == lengths, f"forced lengths not honoured: {got[:8]} vs {lengths[:8]}"
    out["tokens_sampled"] = int(sum(got))
    # 2) training: the GRPO pass over the 256 rollouts (memory.py's micro-batches) and the optimizer step
    rewards = (torch.rand(P, G, generator=g) < 0.5).float()
    rewards[:, 0] = 1 - rewards[:, 1]  # every group has a signal, so the gradient of v is not zero
    rewards = rewards.flatten()  # (P * G,) prompt-major
    adv = grpo.group_advantages(rewards, G).to(dev)
    opt = torch.optim.AdamW(adapter.params, lr=1e-5, weight_decay=0.0)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    rehearse.reset_peak(dev)
    t = rehearse.now(dev)
    st = grpo.grpo_backward(
        net,
        adapter,
        ro.prompts,
        ro.tokens,
        ro.mask,
        adv,
        ro.logp,
        pad_id=0,
        micro_batch=s["micro_batch_rows"],
        micro_batch_tokens=s["micro_batch_tokens"] or 0,
        norm=T,
    )
    opt.step()
    out |= {"t_train": rehearse.now(dev) - t, "peak_training": rehearse.peak_bytes(dev), "loss": st["loss"]}
    out["grad"] = float(adapter.params[0].grad.abs().sum())
    out |= {"plan_sampling": plan.sampling, "plan_training": plan.training, "plan_peak": plan.peak}
    out["t_step"] = out["t_sample"] + out["t_train"]
    out["peak"] = max(out["peak_sampling"], out["peak_training"])
    out["projected_3_epochs_h"] = EPOCH_STEPS * out["t_step"] / 3600
    for k, v in out.items():
        big = k.startswith("peak") or k in ("plan_sampling", "plan_training", "plan_peak")
        print(f"  {k:<22} {v / GB:.2f} GB" if big else f"  {k:<22} {v}")
    return out


STAGE_FNS = {
    "rehearse": stage_rehearse,
    "kernel_correct": stage_kernel_correct,
    "kernel_bench": stage_kernel_bench,
    "sampler": stage_sampler,
    "grpo_step": stage_grpo_step,
}


def run_stage(name, out_dir, dry):
    has_pytest = ensure_pytest()
    print(f"stage {name} ({'dry run, CPU' if dry else 'CUDA'}; pytest {'present' if has_pytest else 'absent: stub'})")
    res = STAGE_FNS[name](dry)
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(res, indent=1, default=str))
    if res.get("fail"):  # figures written, the stage still fails
        raise SystemExit(f"stage {name} failed: {res['fail']}")


# -----------------------------------------------------------------------------
# the orchestrator: stages under their limits, then the targets


def environment():
    import torch

    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = None
    commit, dirty = os.environ.get("TINYLORA_COMMIT"), ""  # for a copy of the tree without .git or git
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        git = lambda *a: subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=30).stdout
        commit, dirty = git("rev-parse", "HEAD").strip() or commit, git("status", "--porcelain").strip()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = torch.cuda.get_device_properties(0).total_memory if gpu else None
    return {
        "gpu": gpu,
        "gpu_memory": mem,
        "torch": torch.__version__,
        "triton": tv,
        "python": platform.python_version(),
        "commit": commit or None,
        "dirty": bool(dirty),
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "host": platform.node(),
    }


def run_all(out_dir, dry, stages, budget, skip=()):
    out_dir.mkdir(parents=True, exist_ok=True)
    t0, results = time.time(), {}
    for name in stages:
        plan_s, cap = STAGES[name]
        cap *= DRY_SLOWER if dry else 1
        left = budget - (time.time() - t0) - RESERVE_S
        limit = int(min(cap, left))
        if name in skip:
            results[name] = {"status": "skipped", "note": "--skip"}
            print(f"== {name}: skipped (--skip)", flush=True)
            continue
        if limit < MIN_STAGE_S:
            results[name] = {
                "status": "skipped",
                "note": f"{left:.0f} s of the {budget} s budget left (< {MIN_STAGE_S})",
            }
            print(f"== {name}: skipped ({results[name]['note']})", flush=True)
            continue
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), TRITON_DEFAULT_FP_FUSION="1")
        env.pop("TRITON_INTERPRET", None)
        if dry and name.startswith("kernel"):
            env["TRITON_INTERPRET"] = "1"
        cmd = [sys.executable, __file__, "--run-stage", name, "--out", str(out_dir)] + ["--dry-run"] * dry
        print(f"== {name}: limit {limit} s (plan {plan_s} s)", flush=True)
        (out_dir / f"{name}.json").unlink(missing_ok=True)
        t = time.time()
        with open(out_dir / f"{name}.log", "w") as log:
            proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True
            )
            try:
                rc = proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the stage's own process group
                proc.wait()
                rc = None
        dt = time.time() - t
        tail = (out_dir / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
        r = {"status": "ok" if rc == 0 else ("timeout" if rc is None else "failed"), "seconds": round(dt, 1)}
        if rc != 0:
            r["rc"], r["log_tail"] = rc, tail
        if (out_dir / f"{name}.json").exists():  # a stage that failed after measuring keeps its figures
            r["result"] = json.loads((out_dir / f"{name}.json").read_text())
        elif rc == 0:
            r["status"] = "failed"
        results[name] = r
        print(f"   {r['status']} in {dt:.0f} s", flush=True)
        if rc != 0:
            print("   " + "\n   ".join(tail), flush=True)
    report = {"env": environment(), "dry_run": dry, "budget_s": budget, "seconds": round(time.time() - t0, 1)}
    report |= {"stages": results, "targets": targets(results, dry)}
    (out_dir / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    (out_dir / "gpu_check.md").write_text(markdown(report))
    print((out_dir / "gpu_check.md").read_text())
    return report


def result(results, name):
    return (results.get(name) or {}).get("result")


def targets(results, dry):
    """Every target of the project, each a row: figure, target, pass / fail (None: its stage gave no figure)."""
    big, small = ("tiny", "tiny") if dry else ("7B", "1.5B")
    graph, ctx1k = ("static", 40) if dry else ("graph", 1024)
    rows = []

    def row(what, value, target, ok, fmt="{:.3g}"):
        rows.append(
            {
                "what": what,
                "value": None if value is None else fmt.format(value),
                "target": target,
                "pass": None if value is None else bool(ok),
            }
        )

    # 1) rehearsal
    rh = result(results, "rehearse")
    row(
        "rehearsal: SDPA backends (none MATH)",
        len(rh["attention"]) if rh else None,
        "no MATH call",
        rh and all(a["backend"] not in ("MATH", "none") for a in rh["attention"]),
        "{} call shapes",
    )
    row(
        "rehearsal: peak allocated / memory.py plan",
        rh and rh["peak_measured"] / rh["plan_peak"],
        "<= 1",
        rh and rh["peak_measured"] <= rh["plan_peak"],
        "{:.2f}",
    )
    # 2) kernel correctness
    kc = result(results, "kernel_correct")
    row(
        "kernel vs float64, generate vs torch path",
        kc and kc["check_kernel_cases"],
        "all ok",
        kc and kc["ok"],
        "{} cases ok",
    )
    # 3) fused adapter-matmul vs cuBLAS
    kb = (result(results, "kernel_bench") or {}).get("rows")
    dec = [r["default_ratio"] for r in kb or [] if r["M"] <= 256]  # the variant the sampler runs, not the best
    big_m = [r["default_ratio"] for r in kb or [] if r["M"] > 256]
    row("fused / cuBLAS, worst at M <= 256", max(dec) if dec else None, "<= 1.10", dec and max(dec) <= 1.10, "{:.2f}x")
    row(
        "fused / cuBLAS, worst at M = 4096",
        max(big_m) if big_m else None,
        "<= 1.15",
        big_m and max(big_m) <= 1.15,
        "{:.2f}x",
    )
    # 4) sampler
    sp = (result(results, "sampler") or {}).get("rows") or []
    pick = lambda **k: next((r for r in sp if all(r[a] == b for a, b in k.items())), None)  # noqa: E731
    for B, want in ((max([r["batch"] for r in sp] or [256]), 0.60), (1, 0.70)):
        r = pick(size=big, ctx=ctx1k, batch=B, decode=graph, adapter="on")
        row(
            f"decode {big} B={B} ctx {ctx1k}, {graph}, adapter on: HBM roofline",
            r and r["roofline"],
            f">= {want:.0%}",
            r and r["roofline"] >= want,
            "{:.1%}",
        )
    slow = []
    for r in sp:
        if r["adapter"] == "on" and r["decode"] == graph:
            off = pick(size=r["size"], ctx=r["ctx"], batch=r["batch"], decode=graph, adapter="off")
            slow.append((r["ms_step"] / off["ms_step"] - 1, f"{r['size']} B={r['batch']} ctx {r['ctx']}"))
    w = max(slow) if slow else None
    row(
        f"adapter on vs off, worst {graph} case" + (f" ({w[1]})" if w else ""),
        w and w[0],
        "<= 5% slower",
        w and w[0] <= 0.05,
        "{:+.1%}",
    )
    # 5) the GRPO step
    gs = result(results, "grpo_step")
    row("GRPO step peak allocated", gs and gs["peak"] / GB, "<= 100 GB", gs and gs["peak"] <= 100 * GB, "{:.1f} GB")
    row(
        "GRPO step time (sampling + training)",
        gs and gs["t_step"],
        "~20 s (2 h / 348)",
        gs and gs["t_step"] <= 7200 / 348,
        "{:.1f} s",
    )
    row(
        f"projected 3 epochs ({EPOCH_STEPS} steps)",
        gs and gs["projected_3_epochs_h"],
        "<= 2 h",
        gs and gs["projected_3_epochs_h"] <= 2,
        "{:.2f} h",
    )
    return rows


def markdown(rep):
    e = rep["env"]
    mark = {True: "pass", False: "FAIL", None: "—"}
    lines = [
        f"# GPU check{' (DRY RUN on CPU: figures meaningless)' if rep['dry_run'] else ''}",
        "",
        f"{e['gpu'] or 'no GPU'}; torch {e['torch']}, triton {e['triton']}; commit {e['commit']}"
        f"{' (dirty)' if e['dirty'] else ''}; {e['date']}; {rep['seconds']:.0f} s of a {rep['budget_s']} s budget",
        "",
        "| stage | status | seconds |",
        "|---|---|---|",
    ]
    for name, r in rep["stages"].items():
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', r.get('note', ''))} |")
    lines += ["", "| target | measured | target | |", "|---|---|---|---|"]
    for t in rep["targets"]:
        lines.append(f"| {t['what']} | {t['value'] or '—'} | {t['target']} | {mark[t['pass']]} |")
    rh = result(rep["stages"], "rehearse")
    if rh:
        head = f"Rehearsal ({rh['layers']} layers, {rh['modules']} matrices)"
        lines += ["", f"{head}: SDPA backend of each attention call shape:", ""]
        lines += [f"- {a['backend']}: {a['call']}" for a in rh["attention"]]
        lines += ["", f"Peaks: sampling {rh['peak_sampling'] / GB:.1f} GB (plan {rh['plan_sampling'] / GB:.1f}), "
                  f"training {rh['peak_training'] / GB:.1f} GB (plan {rh['plan_training'] / GB:.1f}; "
                  f"{rh['train_rows']} rows x {rh['context']} tokens); sampling {rh['t_sample']:.1f} s for "
                  f"{rh['tokens_sampled']} tokens, attach {rh['t_attach']:.1f} s."]  # fmt: skip
    kb = (result(rep["stages"], "kernel_bench") or {}).get("rows")
    if kb:
        xas = list(kb[0]["xa_us"])
        lines += [
            "",
            "Fused adapter-matmul vs cuBLAS F.linear on merged weights (us):",
            "",
            "| proj | M | cuBLAS | " + " | ".join(xas) + " | best / cuBLAS | GB/s | best config (us) |",
            "|---|---|---|" + "---|" * len(xas) + "---|---|---|",
        ]
        for r in kb:
            lines.append(
                f"| {r['proj']} | {r['M']} | {r['cublas_us']:.1f} | "
                + " | ".join(f"{r['xa_us'][x]:.1f}" for x in xas)
                + f" | {r['ratio']:.2f} | {r['gb_s']:.0f} | {r['best_config']} ({r['best_config_us']:.1f}) |"
            )
    sp = (result(rep["stages"], "sampler") or {}).get("rows")
    if sp:
        lines += [
            "",
            f"Sampler decode (HBM copy bandwidth {sp[0]['bandwidth_tb_s']:.2f} TB/s):",
            "",
            "| model | ctx | batch | decode | adapter | ms/step | tokens/s | GB/step | % roofline |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sp:
            lines.append(
                f"| {r['size']} | {r['ctx']} | {r['batch']} | {r['decode']} | {r['adapter']} | "
                f"{r['ms_step']:.2f} | {r['tokens_s']:.0f} | {r['gb_step']:.2f} | {r['roofline']:.1%} |"
            )
    gs = result(rep["stages"], "grpo_step")
    if gs:
        lines += [
            "",
            f"GRPO step: sampling {gs['t_sample']:.1f} s (peak {gs['peak_sampling'] / GB:.1f} GB, plan "
            f"{gs['plan_sampling'] / GB:.1f}), training {gs['t_train']:.1f} s (peak {gs['peak_training'] / GB:.1f} GB, "
            f"plan {gs['plan_training'] / GB:.1f}); {gs['tokens_sampled']} tokens, "
            f"mean length {gs['lengths_mean']:.0f}, "
            f"{gs['lengths_at_max']} rows at {gs['max_new_tokens']}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="gpu_check", help="output folder (JSON, markdown table, one log per stage)")
    ap.add_argument("--dry-run", action="store_true", help="every stage on CPU at tiny sizes (figures meaningless)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES), help="a subset, in order")
    ap.add_argument("--budget", type=int, default=BUDGET_S, help="seconds for all stages together")
    ap.add_argument("--skip", nargs="*", default=[], choices=list(STAGES), help="stages recorded as skipped, not run")
    ap.add_argument("--run-stage", default=None, choices=list(STAGES), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if os.environ.get("DRY") == "1":
        args.dry_run = True
    if args.dry_run and args.budget == BUDGET_S:
        args.budget *= DRY_SLOWER
    if args.run_stage:
        return run_stage(args.run_stage, args.out, args.dry_run)
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU visible to torch: run the CPU dry run with --dry-run (or DRY=1)")
    rep = run_all(Path(args.out), args.dry_run, args.stages, args.budget, args.skip)
    bad = [n for n, r in rep["stages"].items() if r["status"] not in ("ok", "skipped")]
    fails = [t["what"] for t in rep["targets"] if t["pass"] is False]
    if bad or fails:
        print(f"stages not ok: {bad}; targets failed: {fails}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
