"""--device auto|cpu|cuda -> the device to use, with one clear error when CUDA is asked for but absent."""
from __future__ import annotations

from pipeline.errors import UserError


def resolve_device(name: str) -> str:
    import torch
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: choose auto, cpu or cuda.")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible here. Use --device cpu or auto.")
    return name
