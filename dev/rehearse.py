"""
Full-depth rehearsal of the run this project exists for (Qwen2.5-7B-Instruct, `--u 1 --tie 196`), on random weights
of the real shapes: does it load, attach, sample and train at full size, and how much memory and time does it take
next to what memory.py planned? Run once by hand, not in CI.

    python dev/rehearse.py --device cpu                  # writes a 28-layer sharded bf16 checkpoint (15 GB) under
                                                         # /tmp, runs `train.py --max-steps 1` on it, reports
                                                         # load + attach time, the step time and peak RSS
    python dev/rehearse.py --device cpu --layers 4       # the same with fewer layers (when RAM is short)
    python dev/rehearse.py --device cuda                 # random weights built on the GPU (no disk, no download):
                                                         # attach on 196 matrices, one sampling call of 256 rows at
                                                         # ~4k context, one training micro-batch at the longest
                                                         # length, torch.cuda.max_memory_allocated beside the plan
    python dev/rehearse.py --device cpu --in-memory --tiny   # that CUDA path at a tiny size on CPU (a dry run)

The CPU path goes through train.py's command line, so it rehearses everything a user runs; the CUDA path calls the
library directly, so each phase's peak memory can be read on its own (train.py interleaves them).
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from realsize import CONFIGS, random_tensor, tensor_shapes  # noqa: E402

import memory  # noqa: E402

GiB = 2**30
TINY = {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 384, "rope_theta": 1e6,
        "tie_word_embeddings": False}  # fmt: skip


def now(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.time()


def peak_bytes(dev):
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # the process's peak RSS (never resets)


def reset_peak(dev):
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)


def build_in_memory(cfg_dict, dev, dtype=torch.bfloat16, seed=0):
    """The network on `dev` with random weights of the real shapes (tests/realsize.py's recipe), no checkpoint."""
    from model import Config, Transformer, rope_inv_freq

    cfg = Config.from_dict(cfg_dict)
    with torch.device("meta"):
        net = Transformer(cfg)
    g = torch.Generator(device=dev).manual_seed(seed)
    sd = {k: random_tensor(k, s, dtype, dev, g) for k, s in tensor_shapes(cfg_dict)}
    net.load_state_dict(sd, strict=True, assign=True)
    net.inv_freq = rope_inv_freq(cfg).to(dev)
    return net.eval()


def rehearse_in_memory(args, probe=None):
    """Attach, one sampling call, one training micro-batch: each phase's time and peak beside memory.py's plan.
    probe(net, prompts, G, T) -> dict, if given, runs after attach and before the sampling call (its figures join the
    result): dev/gpu_check.py records the attention backends there."""
    import grpo
    import sample
    import tinylora

    dev = torch.device(args.device)
    cfg_dict = dict(TINY if args.tiny else CONFIGS["qwen2.5-7b"])
    if args.layers:
        cfg_dict["num_hidden_layers"] = args.layers
    L = cfg_dict["num_hidden_layers"]
    P, G, Lp, T = (2, 2, 16, 8) if args.tiny else (args.prompts, args.G, args.prompt_tokens, args.new_tokens)
    tie = 7 * L  # one shared v across every module: --u 1 --tie 196 at full depth
    kw = dict(prompts_per_call=P, G=G, max_prompt_tokens=Lp, max_new_tokens=T, device=args.device, tie=tie)
    free = memory.free_memory(args.device)
    plan, msg = memory.choose(cfg_dict, free=free, packed_cpu_copy=False, **kw)
    print(memory.format_plan(plan, free))
    if msg:
        print(msg)
    out = {"device": str(dev), "layers": L, "rows": P * G, "context": Lp + T}

    reset_peak(dev)
    t = now(dev)
    net = build_in_memory(cfg_dict, dev)
    out |= {"t_build": now(dev) - t, "peak_weights": peak_bytes(dev)}
    t = now(dev)
    adapter = tinylora.attach(net, u=1, tie=tie)
    out |= {"t_attach": now(dev) - t, "modules": len(adapter.modules), "trainable": adapter.num_params()}
    with torch.no_grad():
        adapter.params[0].fill_(0.01)  # a non-zero update, so the adapter's math runs for real
    # 1) one sampling call of P x G rows, prompts of Lp tokens, up to T new ones (no stop token: the longest case)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, min(cfg_dict["vocab_size"], 384), (P, Lp), generator=g).tolist()
    if probe is not None:
        out |= probe(net, prompts, G, T)
    reset_peak(dev)
    t = now(dev)
    ro = sample.generate(net, prompts, G=G, max_new_tokens=T, temperature=1.0, stop_ids=[], pad_id=0,
                         generator=torch.Generator(device=dev).manual_seed(0))  # fmt: skip
    dt = now(dev) - t
    out |= {"t_sample": dt, "tokens_sampled": int(ro.mask.sum()), "peak_sampling": peak_bytes(dev)}
    del ro
    # 2) one training micro-batch at the longest length (the plan's choice of rows), forward + backward
    rows = plan.settings["micro_batch_rows"]
    if plan.settings["grad_checkpointing"]:
        grpo.use_grad_checkpointing(net)
    ids = torch.randint(0, 384, (rows, Lp + T), generator=g).to(dev)
    cmask = torch.zeros(rows, Lp + T, dtype=torch.bool, device=dev)
    cmask[:, Lp:] = True
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    reset_peak(dev)
    t = now(dev)
    logp = grpo.token_logprobs(net, ids, cmask, Lp)
    logp.sum().backward()
    out |= {"t_train_micro_batch": now(dev) - t, "train_rows": rows, "peak_training": peak_bytes(dev)}
    out |= {"grad": float(adapter.params[0].grad.abs().sum())}
    out |= {"plan_sampling": plan.sampling, "plan_training": plan.training, "plan_peak": plan.peak}
    report(out)
    return out


def report(out):
    for k, v in out.items():
        if k.startswith(("peak", "plan")):
            print(f"  {k:<22} {v / GiB:9.2f} GiB")
        elif isinstance(v, float):
            print(f"  {k:<22} {v:9.2f}" + (" s" if k.startswith("t_") else ""))
        else:
            print(f"  {k:<22} {v}")
    print("RESULT " + json.dumps(out))


def rehearse_cpu(args):
    """Write the sharded checkpoint (once), then `train.py --max-steps 1` on it in a child process."""
    from realsize import write_realsize

    L = args.layers or CONFIGS["qwen2.5-7b"]["num_hidden_layers"]
    folder = Path(args.folder or f"/tmp/tinylora-rehearse-qwen2.5-7b-{L}l")
    if not (folder / "model.safetensors.index.json").exists():
        t = time.time()
        write_realsize(folder, "qwen2.5-7b", num_layers=L)
        print(f"wrote {folder} in {time.time() - t:.0f}s")
    data = folder / "data"
    data.mkdir(exist_ok=True)
    fixtures = ROOT / "tests" / "fixtures"
    (data / "train.jsonl").write_text((fixtures / "gsm8k_long.jsonl").read_text().splitlines()[0] + "\n")
    (data / "test.jsonl").write_text((fixtures / "gsm8k_mini.jsonl").read_text().splitlines()[0] + "\n")
    out_dir = folder / f"run-{time.strftime('%H%M%S')}"
    cmd = [sys.executable, str(ROOT / "train.py"), "--device", "cpu", "--dtype", "bfloat16", "--model", str(folder),
           "--data", str(data / "train.jsonl"), "--eval-data", str(data / "test.jsonl"), "--prompts-per-step", "1",
           "--G", "2", "--max-new-tokens", str(args.new_tokens_cpu), "--eval-limit", "1", "--eval-every", "0",
           "--max-steps", "1", "--u", "1", "--tie", str(7 * L), "--mini-batches", "1", "--max-prompt-tokens", "0",
           "--out", str(out_dir)]  # fmt: skip
    cmd += args.train_args.split()
    print(" ".join(cmd))
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
    t_banner = None
    for line in proc.stdout:  # the banner comes right after load + attach
        sys.stdout.write(f"[{time.time() - t0:7.1f}s] {line}")
        if t_banner is None and "TRAINABLE PARAMETERS" in line:
            t_banner = time.time() - t0
    proc.wait()
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    steps = [json.loads(x) for x in open(out_dir / "metrics.jsonl") if '"event": "step"' in x]
    out = {"device": "cpu", "layers": L, "returncode": proc.returncode, "t_total": time.time() - t0,
           "t_load_and_attach": t_banner, "peak_rss": peak}  # fmt: skip
    if steps:
        out |= {k: steps[0][k] for k in ("t_step", "t_sample", "t_train") if k in steps[0]}
    ck = "--grad-checkpointing" in args.train_args
    p = memory.plan(str(folder), dtype="bfloat16", prompts_per_call=1, G=2, max_prompt_tokens=800, tie=7 * L,
                    max_new_tokens=args.new_tokens_cpu, micro_batch=16, device="cpu",
                    grad_checkpointing=ck)  # fmt: skip
    out |= {"plan_sampling": p.sampling, "plan_training": p.training, "plan_peak": p.peak}
    report(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=0, help="0: the real 28")
    ap.add_argument("--in-memory", action="store_true", help="the CUDA path (library calls, no checkpoint) on --device")
    ap.add_argument("--tiny", action="store_true", help="a tiny config: a dry run of the in-memory path")
    ap.add_argument("--folder", default=None, help="CPU path: where the checkpoint is written (default under /tmp)")
    ap.add_argument("--prompts", type=int, default=64, help="in-memory: prompts per sampling call")
    ap.add_argument("--G", type=int, default=4)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=3584, help="in-memory: new tokens (context = prompt + this)")
    ap.add_argument("--new-tokens-cpu", type=int, default=4, help="CPU path: --max-new-tokens of the train.py run")
    ap.add_argument("--json", default=None, help="also write the result to this JSON file")
    ap.add_argument("--train-args", default="", help="CPU path: more train.py flags, e.g. '--grad-checkpointing'")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU here; dry-run that path with --device cpu --in-memory --tiny")
    out = rehearse_in_memory(args) if args.in_memory or args.device.startswith("cuda") else rehearse_cpu(args)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
