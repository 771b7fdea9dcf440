"""Train the embedded class-conditional digits diffusion model (steerdiff.testbeds.digits) on the CPU.

What it trains
    A diffusers ``UNet2DModel`` at the digits' native 8x8 (1 channel) with ``num_class_embeds=11``: the
    classes 0-9 plus the null class 10.  Each training label is replaced by the null id with probability
    ``--label-dropout`` so that one network gives both the conditional and the unconditional prediction
    needed by classifier-free guidance (Ho & Salimans 2022).

Objective (``--objective``)
    epsilon (the shipped VP model; DDPM, Ho et al. 2020):
        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,   t ~ U{0, ..., 999},   eps ~ N(0, I)
        L = E || eps_theta(x_t, t, y) - eps ||^2
        with the ``DDPMScheduler`` schedule: 1000 steps, linear betas 1e-4..0.02.
    flow (rectified flow, Liu et al. 2023; the velocity target of SD3 / Flux, Esser et al. 2024):
        x_s = (1 - s) x_0 + s eps,   s ~ U(0, 1),   the network sees t = 1000 s
        L = E || v_theta(x_s, t, y) - (eps - x_0) ||^2
        saved with a ``FlowMatchEulerDiscreteScheduler`` config (shift 1), ``prediction_type`` flow_prediction.

Optimisation
    AdamW, linear warmup then cosine decay to ``--lr-min``, gradient clipping at 1.0, and an exponential
    moving average of the weights, theta_ema <- d theta_ema + (1 - d) theta with
    d = min(--ema-decay, (1 + step) / (10 + step)); the EMA weights are the ones saved.

Budget and determinism
    The run ends at ``--steps`` optimisation steps or after ``--minutes`` of wall time, whichever comes
    first; the cosine schedule follows progress = max(step / steps, elapsed / budget), so a run cut short by
    the wall-clock budget (a busy machine) still anneals its learning rate to ``--lr-min``.  Data order,
    labels dropped, timesteps and noise are drawn from generators seeded by ``--seed``; a run that ends on
    ``--steps`` (give a generous ``--minutes``) is reproducible with the same torch build and thread count.
    A time-capped run's learning rates depend on the machine's speed, so ``training_log.json`` records the
    learning rate of every step; ``--replay-lr <training_log.json>`` replays exactly those steps and rates
    (the shipped model: ``--replay-lr steerdiff/testbeds/assets/digits/training_log.json --out DIR``).

Output
    A diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``) at ``--out`` (default: the
    shipped ``steerdiff/testbeds/assets/digits``, or ``digits_flow`` for ``--objective flow``), weights in
    safetensors, plus ``training_log.json`` with the command, wall time, throughput and losses.

    python -m scripts.train_digits --steps 8000 --minutes 28
    python -m scripts.train_digits --objective flow --steps 8000 --minutes 28

Weak models for AutoGuidance (Karras et al. 2024: the same network trained for a fraction of the budget), shipped as
``digits_weak`` and ``digits_flow_weak``: 1/8 of the steps the shipped models took (1,377 and 6,046), warm-up scaled
alike; each ends on ``--steps`` with one thread, so it is reproducible (rerunning them gave identical weights):

    python -m scripts.train_digits --steps 172 --warmup 25 --minutes 60 --threads 1 --out steerdiff/testbeds/assets/digits_weak
    python -m scripts.train_digits --objective flow --steps 756 --warmup 25 --minutes 60 --threads 1 \
        --out steerdiff/testbeds/assets/digits_flow_weak
"""

from __future__ import annotations

import time

_T_PROCESS = time.perf_counter()  # the wall-clock budget counts from here, imports included

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# Sleep rather than spin in OpenMP barriers: on a shared 2-core machine spinning threads slow training by
# up to 10x when another process holds a core.  Must be set before torch loads its OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from steerdiff.testbeds.digits import (  # noqa: E402
    DIGITS_FLOW_MODEL_PATH,
    DIGITS_MODEL_PATH,
    IMAGE_SIZE,
    NULL_CLASS,
    NUM_CLASSES,
    load_digits_data,
)

MODEL_INDEX = {
    "_class_name": "ClassConditionalPipeline",
    "_diffusers_version": "0.42.1",
    "unet": ["diffusers", "UNet2DModel"],
    "scheduler": ["diffusers", "DDPMScheduler"],
}


def build_unet(width: int = 32, layers_per_block: int = 2):
    """The digits UNet: 8x8 -> 4x4 -> 2x2, self-attention at 4x4 and in the 2x2 middle block.

    Channels (width, 2 width, 2 width); ``norm_num_groups`` = width / 2 so that every GroupNorm has
    groups of at least 2 channels.
    """
    from diffusers import UNet2DModel

    if width % 16 != 0:
        raise ValueError(f"width must be a multiple of 16, got {width}")
    return UNet2DModel(
        sample_size=IMAGE_SIZE,
        in_channels=1,
        out_channels=1,
        block_out_channels=(width, 2 * width, 2 * width),
        layers_per_block=layers_per_block,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=32,
        norm_num_groups=width // 2,
        num_class_embeds=NUM_CLASSES + 1,
    )


def build_flow_scheduler():
    """The flow model's scheduler config: rectified flow, 1000 training timesteps (t = 1000 s), shift 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def build_scheduler():
    """The training noise schedule: DDPM, 1000 steps, linear betas 1e-4..0.02, epsilon, no clipping.

    ``timestep_spacing="trailing"``: samplers built from this config with N steps start at t = 999 rather
    than at 1000 - 1000 / N ("leading"), i.e. from the noise level of the prior (Lin et al. 2024).
    """
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        prediction_type="epsilon",
        clip_sample=False,
        timestep_spacing="trailing",
    )


def save_pipeline_folder(out: Path, unet, scheduler) -> None:
    """Write ``out`` in diffusers' pipeline-folder format with safetensors weights."""
    out.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(out / "unet", safe_serialization=True)
    scheduler.save_pretrained(out / "scheduler")
    index = {**MODEL_INDEX, "scheduler": ["diffusers", type(scheduler).__name__]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def lr_at(step: int, progress: float, warmup: int, lr: float, lr_min: float) -> float:
    """Linear warmup over the first ``warmup`` steps, then cosine decay from ``lr`` (progress 0) to ``lr_min`` (1)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--objective", choices=("epsilon", "flow"), default="epsilon",
                   help="epsilon: DDPM noise prediction (the shipped VP model); flow: rectified-flow velocity")
    p.add_argument("--out", type=Path, default=None, help="output pipeline folder (default: the shipped one of the objective)")
    p.add_argument("--steps", type=int, default=8000, help="maximum optimisation steps (the run ends at --steps or --minutes)")
    p.add_argument("--minutes", type=float, default=28.0, help="wall-clock budget in minutes, imports included")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-min", type=float, default=1e-5)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.15, help="probability of replacing a label by the null class")
    p.add_argument("--width", type=int, default=32, help="channels of the first UNet level (then 2x, 2x)")
    p.add_argument("--layers-per-block", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--replay-lr", type=Path, default=None, help="training_log.json of an earlier run: replay its steps and learning rates")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = DIGITS_MODEL_PATH if args.objective == "epsilon" else DIGITS_FLOW_MODEL_PATH
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.minutes <= 0:
        p.error(f"--minutes must be > 0, got {args.minutes}")
    if not 0.0 <= args.label_dropout < 1.0:
        p.error(f"--label-dropout must be in [0, 1), got {args.label_dropout}")
    if not 0.0 <= args.ema_decay < 1.0:
        p.error(f"--ema-decay must be in [0, 1), got {args.ema_decay}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = _T_PROCESS if argv is None else time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    images, labels = load_digits_data("all")
    n = images.shape[0]
    unet = build_unet(args.width, args.layers_per_block)
    flow = args.objective == "flow"
    scheduler = build_flow_scheduler() if flow else build_scheduler()
    ema = build_unet(args.width, args.layers_per_block)
    ema.load_state_dict(unet.state_dict())
    ema.requires_grad_(False)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet2DModel: {n_params:,} parameters; {n} training images; {args.steps} steps of batch {args.batch_size}", flush=True)

    num_t = scheduler.config.num_train_timesteps
    alphas_cumprod = None if flow else scheduler.alphas_cumprod.to(torch.float32)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999))
    ema_params = list(ema.parameters())
    params = list(unet.parameters())

    perm = torch.randperm(n, generator=gen)
    cursor = 0
    losses: list[float] = []
    window: list[float] = []
    log: list[dict] = []
    stopped_early = False
    steps_done = 0
    budget_s = args.minutes * 60
    replay = None
    if args.replay_lr is not None:
        replay = json.loads(Path(args.replay_lr).read_text())["lr_per_step"]
        args.steps = len(replay)
        budget_s = float("inf")
        print(f"replaying {len(replay)} steps and their learning rates from {args.replay_lr}", flush=True)
    lr_per_step: list[float] = []
    t_train = time.perf_counter()
    unet.train()
    for step in range(args.steps):
        if cursor + args.batch_size > n:
            perm = torch.randperm(n, generator=gen)
            cursor = 0
        idx = perm[cursor : cursor + args.batch_size]
        cursor += args.batch_size
        x0 = images[idx]
        y = labels[idx].clone()
        drop = torch.rand(y.shape, generator=gen) < args.label_dropout
        y[drop] = NULL_CLASS
        if flow:
            s = torch.rand(x0.shape[0], generator=gen)
            t = s * num_t
            eps = torch.randn(x0.shape, generator=gen)
            xt = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
            target = eps - x0
        else:
            t = torch.randint(0, num_t, (x0.shape[0],), generator=gen)
            eps = torch.randn(x0.shape, generator=gen)
            ab = alphas_cumprod[t].view(-1, 1, 1, 1)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            target = eps

        elapsed = time.perf_counter() - t_start
        progress = max(step / args.steps, elapsed / budget_s)
        if progress >= 1.0:
            stopped_early = step < args.steps
            print(f"wall-clock budget of {args.minutes} min reached after {step} of {args.steps} steps; stopping", flush=True)
            break
        lr = replay[step] if replay is not None else lr_at(step, progress, args.warmup, args.lr, args.lr_min)
        lr_per_step.append(lr)
        for group in opt.param_groups:
            group["lr"] = lr
        pred = unet(xt, t, class_labels=y).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

        d = min(args.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_mul_(ema_params, d)
            torch._foreach_add_(ema_params, params, alpha=1 - d)

        losses.append(loss.item())
        window.append(losses[-1])
        steps_done = step + 1
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            rate = (step + 1) / (time.perf_counter() - t_train)
            elapsed = time.perf_counter() - t_start
            entry = {
                "step": step + 1,
                "loss": sum(window) / len(window),
                "lr": opt.param_groups[0]["lr"],
                "elapsed_s": round(elapsed, 1),
                "steps_per_s": round(rate, 3),
            }
            log.append(entry)
            print(
                f"step {step + 1:6d}  loss {entry['loss']:.4f}  lr {entry['lr']:.2e}  {elapsed / 60:6.2f} min  {rate:.2f} it/s",
                flush=True,
            )
            window = []

    ema.eval()
    save_pipeline_folder(Path(args.out), ema, scheduler)
    wall = time.perf_counter() - t_start
    tail = losses[-min(500, len(losses)) :]
    summary = {
        "command": "python -m scripts.train_digits " + " ".join(sys.argv[1:] if argv is None else argv),
        "torch": torch.__version__,
        "threads": args.threads,
        "parameters": n_params,
        "steps_done": steps_done,
        "stopped_early": stopped_early,
        "wall_time_s": round(wall, 1),
        "wall_time_min": round(wall / 60, 2),
        "train_steps_per_s": round(steps_done / (time.perf_counter() - t_train), 3),
        "final_loss_mean_last_500": sum(tail) / len(tail),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "log": log,
        "lr_per_step": lr_per_step,
    }
    (Path(args.out) / "training_log.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(
        f"saved EMA weights to {args.out}; {steps_done} steps, final loss (mean of last {len(tail)}) "
        f"{summary['final_loss_mean_last_500']:.4f}; wall time {wall:.1f} s ({wall / 60:.2f} min)",
        flush=True,
    )
    return summary


if __name__ == "__main__":
    main()
