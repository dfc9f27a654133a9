"""Side by side: the single-device image, stale patches and naive patches, on the default model.

    python examples/compare_modes.py --out docs/images/compare_modes.png

Ranks are simulated in one process (the arithmetic is that of real ranks). Prints PSNR/SSIM of
each configuration against the single-device image.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distrifx.default_model import load_default_pipeline
from distrifx.fidelity import FidelityCase, fidelity_figure, fidelity_table, run_fidelity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="image size in pixels (default 64)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("compare_modes.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [FidelityCase(n, mode) for n in (2, 4) for mode in ("stale", "naive")]
    rows, images = run_fidelity(load_default_pipeline, cases, seeds=args.seeds, size=args.size, steps=args.steps)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fidelity_figure(images, rows, args.out)
    print(fidelity_table(rows))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
