"""Trains the default model of distrifx from scratch on procedurally drawn shapes.

Epsilon prediction on the noise schedule of the shipped DDIMScheduler config, AdamW, random
dropout of the prompt words so that classifier-free guidance works, and an exponential moving
average of the weights, which is what gets saved. Runs on one CPU thread and stops by itself
after ``--minutes``; given ``--seed`` the run is deterministic up to the step where it stops, and
``--steps`` fixes that step to reproduce a model exactly.

    python scripts/train_default_model.py --minutes 13
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from distrifx.default_model import DEFAULT_MODEL_DIR, DefaultPipeline, make_shapes

_SAVE_RESERVE_S = 15.0  # stop this long before the deadline, to leave time to write the model


@dataclass
class Options:
    minutes: float
    size: int
    batch_size: int
    seed: int
    out: Path
    steps: int | None
    lr: float
    warmup: int
    ema: float
    drop: float
    log_every: int


def parse_args(argv: list[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--minutes", type=float, default=13.0, help="wall-clock budget, saving included")
    p.add_argument("--size", type=int, default=32, help="training image size in pixels")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_MODEL_DIR)
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (if sooner)")
    p.add_argument("--lr", type=float, default=1.5e-3)
    p.add_argument("--warmup", type=int, default=100, help="steps of linear learning-rate warmup")
    p.add_argument("--ema", type=float, default=0.995, help="decay of the weight average")
    p.add_argument("--drop", type=float, default=0.1, help="probability of dropping the whole prompt")
    p.add_argument("--log-every", type=int, default=25)
    a = p.parse_args(argv)
    return Options(
        a.minutes, a.size, a.batch_size, a.seed, a.out, a.steps, a.lr, a.warmup, a.ema, a.drop, a.log_every
    )


def drop_words(ids: torch.Tensor, null_ids: tuple[int, int], p: float, g: torch.Generator) -> torch.Tensor:
    """Replaces the whole prompt by nulls with probability ``p`` (the unconditional input of guidance),
    and otherwise each word with probability ``p`` (so that one-word prompts work too)."""
    n = ids.shape[0]
    whole = torch.rand(n, 1, generator=g) < p
    word = torch.rand(n, 2, generator=g) < p
    nulls = torch.tensor(null_ids).expand(n, 2)
    return torch.where(whole | word, nulls, ids)


@torch.no_grad()
def ema_update(average: list[torch.Tensor], params: list[torch.Tensor], decay: float) -> None:
    torch._foreach_lerp_(average, params, 1 - decay)


def train(opts: Options) -> tuple[DefaultPipeline, int, float, float]:
    """Returns the averaged pipeline, the number of steps, the last smoothed loss and the wall time."""
    start = time.monotonic()
    deadline = start + opts.minutes * 60 - _SAVE_RESERVE_S
    pipe = DefaultPipeline.untrained(opts.seed)
    average = copy.deepcopy(pipe)
    modules = [pipe.unet, pipe.prompt_encoder]
    params = [p for m in modules for p in m.parameters()]
    avg_params = [p for m in (average.unet, average.prompt_encoder) for p in m.parameters()]
    for m in modules:
        m.train()
    opt = torch.optim.AdamW(params, lr=opts.lr, weight_decay=1e-2)
    alphas = pipe.scheduler.alphas_cumprod
    steps_total = pipe.scheduler.config.num_train_timesteps
    g = torch.Generator().manual_seed(opts.seed)

    step, smooth = 0, float("nan")
    while time.monotonic() < deadline and (opts.steps is None or step < opts.steps):
        images, labels = make_shapes(opts.batch_size, opts.size, g)
        noise = torch.randn(images.shape, generator=g)
        t = torch.randint(steps_total, (opts.batch_size,), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * images + (1 - a).sqrt() * noise
        ctx = pipe.prompt_encoder(drop_words(labels, pipe.prompt_encoder.null_ids, opts.drop, g))
        loss = F.mse_loss(pipe.unet(noisy, t, encoder_hidden_states=ctx).sample, noise)

        for group in opt.param_groups:
            group["lr"] = opts.lr * min(1.0, (step + 1) / opts.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # The usual warm-started decay: early on the average follows the fast-moving weights.
        ema_update(avg_params, params, min(opts.ema, (1 + step) / (10 + step)))

        step += 1
        smooth = loss.item() if step == 1 else 0.95 * smooth + 0.05 * loss.item()
        if step % opts.log_every == 0:
            elapsed = time.monotonic() - start
            print(f"step {step:5d}  loss {smooth:.4f}  {elapsed:6.0f}s  {step / elapsed:.2f} step/s", flush=True)
    return average, step, smooth, time.monotonic() - start


def write_readme(opts: Options, argv: list[str], steps: int, loss: float, seconds: float) -> None:
    command = shlex.join(["python", "scripts/train_default_model.py", *argv])
    (opts.out / "README.md").write_text(
        "# distrifx default model\n\n"
        "A pixel-space `UNet2DConditionModel` (+ `DDIMScheduler`, + learned colour/shape word\n"
        "embeddings in `prompt_embeddings.safetensors`) that draws one coloured shape from a prompt\n"
        "such as \"red circle\". Load it with `distrifx.default_model.load_default_pipeline()`.\n\n"
        "Trained from scratch on procedurally drawn images (`distrifx.default_model.make_shapes`),\n"
        "nothing downloaded: epsilon prediction, AdamW, 10% prompt dropout for classifier-free\n"
        "guidance; the saved weights are the exponential moving average.\n\n"
        f"- command: `{command}`\n"
        f"- torch {torch.__version__}, 1 CPU thread, {seconds / 60:.1f} minutes wall clock\n"
        f"- {steps} steps of batch {opts.batch_size} at {opts.size}x{opts.size}, seed {opts.seed}, "
        f"lr {opts.lr}, EMA {opts.ema}\n"
        f"- final training loss (smoothed): {loss:.4f}\n\n"
        f"To reproduce these exact weights, add `--steps {steps}` and a `--minutes` large enough.\n"
    )


def main(argv: list[str] | None = None) -> None:
    torch.set_num_threads(1)
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_args(argv)
    pipe, steps, loss, seconds = train(opts)
    pipe.save_pretrained(opts.out)
    write_readme(opts, argv, steps, loss, seconds)
    print(f"saved {opts.out} after {steps} steps, {seconds / 60:.1f} min, loss {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
