"""Device and precision policy: which device a run uses, which compute dtype, and why (the reasons
are what `altclip info` prints). The model code knows nothing of this."""
from __future__ import annotations

import torch

from ..errors import DeviceError
from ..nn.layers import cpu_attention_is_flash

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 matrices natively (x86 avx512_bf16 or AMX)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_device(request: str = "auto") -> tuple[torch.device, str]:
    """`auto`: cuda, then mps, then cpu. An explicit device that is absent is an error."""
    request = (request or "auto").strip().lower()
    if request == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    try:
        device = torch.device(request)
    except RuntimeError:
        raise DeviceError(f"unknown device {request!r}", hint="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda was asked for, but CUDA is not available on this machine",
                              hint="use --device cpu (or auto), or install a CUDA build of torch")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{request} was asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("--device mps was asked for, but Apple MPS is not available")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device {request!r}", hint="use auto, cpu, cuda, cuda:N or mps")
    return device, "asked for"


def choose_precision(device: torch.device, request: str = "auto") -> tuple[str, str]:
    """`auto` is real mixed precision where the hardware has fast low-precision matmuls."""
    request = (request or "auto").strip().lower()
    if request != "auto":
        if request not in PRECISIONS:
            raise DeviceError(f"unknown precision {request!r}", hint="use auto, fp32, fp16 or bf16")
        if device.type == "cuda" and request == "bf16" and not torch.cuda.is_bf16_supported():
            raise DeviceError("bf16 was asked for, but this GPU does not support it", hint="use fp16")
        return request, "asked for"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: the GPU supports bf16"
        return "fp16", "auto: the GPU has no bf16, fp16 instead"
    if device.type == "mps":
        return "fp16", "auto: fp16 on Apple MPS"
    if cpu_has_native_bf16():
        return "bf16", "auto: the CPU has native bf16 matrix instructions (avx512_bf16/AMX)"
    return "fp32", "auto: the CPU has no native bf16 matrix instructions"


def images_per_pass(device: torch.device, precision: str) -> int | None:
    """The most images the image tower takes at once (None: a whole batch). On the CPU glibc maps
    large blocks fresh and returns freed memory to the system, so past some size the tower's big
    temporaries are faulted in again page by page in every layer (2 GB of page faults per 16
    images in one pass). Where attention holds its (B, 16, 257, 257) scores whole (matmul
    attention), 4 images keep every temporary at 8 MB or less and freed memory is reused: no page
    faults after the first pass, and the matrix products (1,028 rows) run as fast. Where it takes
    the flash kernel (bf16 on a CPU with AMX) 8 images fault no more, and their 2,056-row products
    run faster on AMX: 1.3x the tower's rate with 4 (9 rather than 7 images/s on 2 cores)."""
    if device.type != "cpu":
        return None
    return 8 if cpu_attention_is_flash(PRECISIONS[precision]) else 4


def default_batch_size(device: torch.device, kind: str) -> int:
    if device.type == "cpu":
        return 16 if kind == "image" else 64
    return 128 if kind == "image" else 256
