"""Capture: ``torch.export`` a model on concrete inputs into a flat ATen-level GraphModule."""

from distrifx.capture.export import CapturedProgram, capture, signature_key

__all__ = ["CapturedProgram", "capture", "signature_key"]
