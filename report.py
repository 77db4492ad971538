"""
Run logging to the tools the field already uses: `--report-to wandb`, `tensorboard`, or both (`wandb,tensorboard`).

    rep = open_reporter("wandb,tensorboard", run_dir, config=vars(args), run_name="tinylora-u1-tie16")
    rep.log(step, metrics)                  # the scalars of a metrics.jsonl line; lists, text and samples stay there
    rep.log(step, eval_result, prefix="eval/")
    rep.close()

metrics.jsonl stays the record of a run; these are views of it. Choices (*ours*):
1. Only numbers are sent (int, float, bool as 0/1, NaN included): v (a list), sample texts and strings stay in
   metrics.jsonl. The step is the x axis everywhere, never a metric.
2. wandb and tensorboard are imported only when asked for; a missing one is a SystemExit naming its pip command.
3. The run's config goes with it: wandb.init(config=...); TensorBoard gets the args JSON as text ("config").
4. Files: TensorBoard events in RUN_DIR/tensorboard; wandb's folder in WANDB_DIR if set, else RUN_DIR (WANDB_MODE,
   WANDB_PROJECT (default "tinylora") and WANDB_ENTITY are wandb's own variables and apply).
5. Resuming from a checkpoint at step S (start_step=S) continues the same wandb run (its id is kept in
   RUN_DIR/wandb-id), where steps after S that were logged before the restart keep their first values (wandb only
   moves forward); TensorBoard drops its events after S, so the rerun steps replace them.
"""

import json
import os

KINDS = ("wandb", "tensorboard")


def scalars(metrics: dict, prefix: str = "") -> dict:
    """The numbers of a metrics dict (choice 1), keys prefixed; a 0-dim tensor or numpy number counts."""
    out = {}
    for k, v in metrics.items():
        if k in ("step", "event"):
            continue
        if isinstance(v, (bool, int, float)):
            out[prefix + k] = float(v)
        elif getattr(v, "ndim", None) == 0 and hasattr(v, "item"):
            out[prefix + k] = float(v.item())
    return out


def need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise SystemExit(f"--report-to {package} needs the {package} package: pip install {package}") from None


class WandbSink:
    def __init__(self, run_dir: str, config: dict, run_name: str, start_step: int):
        wandb = need("wandb", "wandb")
        id_path = os.path.join(run_dir, "wandb-id")
        run_id = open(id_path).read().strip() if start_step and os.path.exists(id_path) else None
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "tinylora"),
            name=run_name,
            config=config,
            dir=os.environ.get("WANDB_DIR") or run_dir,
            id=run_id,
            resume="allow" if run_id else None,
        )
        with open(id_path, "w") as f:
            f.write(self.run.id)

    def log(self, step: int, values: dict):
        self.run.log(values, step=step)

    def close(self):
        self.run.finish()


class TensorBoardSink:
    def __init__(self, run_dir: str, config: dict, run_name: str, start_step: int):
        need("tensorboard", "tensorboard")  # torch's writer needs it installed
        from torch.utils.tensorboard import SummaryWriter

        purge = start_step + 1 if start_step else None  # choice 5: events after the checkpoint are dropped
        self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"), purge_step=purge)
        text = json.dumps({"run_name": run_name, **config}, indent=1, default=str)
        self.writer.add_text("config", "```\n" + text + "\n```", global_step=start_step)  # markdown: keep the layout

    def log(self, step: int, values: dict):
        for k, v in values.items():
            self.writer.add_scalar(k, v, global_step=step)

    def close(self):
        self.writer.close()


class Reporter:
    """Sends each step's numbers to every sink asked for; with none it does nothing."""

    def __init__(self, sinks: list):
        self.sinks = sinks

    def log(self, step: int, metrics: dict, prefix: str = ""):
        values = scalars(metrics, prefix)
        if values:
            for s in self.sinks:
                s.log(step, values)

    def close(self):
        for s in self.sinks:
            s.close()
        self.sinks = []


def open_reporter(kind: str | None, run_dir: str, config: dict, run_name: str, start_step: int = 0) -> Reporter:
    """A Reporter for "wandb", "tensorboard", a comma list of them, or None / "" / "none" (nothing)."""
    kinds = [k.strip().lower() for k in (kind or "").split(",") if k.strip() and k.strip().lower() != "none"]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"--report-to {kind!r}: unknown {', '.join(unknown)}; use wandb, tensorboard or both")
    if kinds:
        os.makedirs(run_dir, exist_ok=True)
    sink = {"wandb": WandbSink, "tensorboard": TensorBoardSink}
    return Reporter([sink[k](run_dir, config, run_name, start_step) for k in dict.fromkeys(kinds)])
