"""Which device a rank trains on, and in which precision: `auto` resolved once, here."""

from __future__ import annotations

import contextlib

import torch

from gptlib.config import DEVICES, ConfigError, TrainConfig


def pick_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA (this rank's GPU) where there is one, else the CPU."""
    if requested not in DEVICES:
        raise ConfigError(f"device {requested!r}: not allowed; allowed: {', '.join(DEVICES)}")
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError("train.device=cuda but no CUDA device is available; allowed: auto, cpu")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_has_bf16() -> bool:
    """Native bf16 matmul support (AVX512-BF16 or AMX); elsewhere bf16 is emulated and slow."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, device: torch.device) -> str:
    """Turn `auto` into bf16 or fp32 for this device; refuse bf16 where the GPU cannot do it."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported()
    else:
        bf16_ok = cpu_has_bf16()
    if precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if precision == "bf16" and device.type == "cuda" and not bf16_ok:
        raise ConfigError(
            f"train.precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; "
            "allowed here: fp16, fp32"
        )
    return precision


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast for fp16/bf16 (TF32 allowed), nothing for fp32 (TF32 off)."""
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def use_compile(cfg: TrainConfig, device: torch.device) -> bool:
    """`train.compile` unset means on for CUDA, off for the CPU (slower there; see the README)."""
    return cfg.compile if cfg.compile is not None else device.type == "cuda"
