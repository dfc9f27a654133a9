"""Image fidelity against the single-device output: PSNR and SSIM (torchmetrics)."""

from __future__ import annotations

import torch

__all__ = ["psnr", "ssim"]


def _check(image: torch.Tensor, reference: torch.Tensor) -> None:
    if image.shape != reference.shape or image.dim() != 4:
        raise ValueError(f"expected two (B, C, H, W) images of one shape, got {tuple(image.shape)} and "
                         f"{tuple(reference.shape)}")


def psnr(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB of ``image`` against ``reference`` (values in [0, data_range]).

    >>> round(psnr(torch.full((1, 3, 4, 4), 0.5), torch.full((1, 3, 4, 4), 0.6)), 3)
    20.0
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    _check(image, reference)
    return float(peak_signal_noise_ratio(image.float(), reference.float(), data_range=data_range))


def ssim(image: torch.Tensor, reference: torch.Tensor, data_range: float = 1.0) -> float:
    """Structural similarity of ``image`` against ``reference`` (1.0: identical)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    _check(image, reference)
    return float(structural_similarity_index_measure(image.float(), reference.float(), data_range=data_range))
