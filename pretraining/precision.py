"""The step's numeric precision (autocast, GradScaler), memory format and compilation."""
from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from models.aclus import ACLUS
from pretraining.config import AmpConfig, ConfigError

log = logging.getLogger("pretrain")


@dataclass(frozen=True)
class Precision:
    """The step's autocast: ``dtype`` None = fp32. fp16 needs a GradScaler, bf16 does not
    (fp32's exponent range)."""
    device_type: str = "cpu"
    dtype: torch.dtype | None = None

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype) if self.enabled else nullcontext()

    def __str__(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16 + GradScaler"}[self.dtype]


def resolve_precision(amp: AmpConfig, device: torch.device) -> Precision:
    """``amp.opt_level`` / ``amp.dtype`` on ``device``: O0 is fp32. Otherwise, on CUDA, bf16
    where the GPU computes it natively (``auto``) or when asked, fp16 + GradScaler on older
    GPUs or when asked; on the CPU bf16 only when asked (``amp.dtype: bf16``), else fp32."""
    if amp.opt_level == "O0":
        return Precision(device.type)
    if device.type == "cuda":
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if amp.dtype == "bf16" and not native_bf16:
            raise ConfigError(f"'amp.dtype' is bf16 but {torch.cuda.get_device_name(device)} has no native "
                              "bf16; use auto or fp16")
        use_bf16 = amp.dtype == "bf16" or (amp.dtype == "auto" and native_bf16)
        return Precision("cuda", torch.bfloat16 if use_bf16 else torch.float16)
    if amp.dtype == "bf16":
        return Precision(device.type, torch.bfloat16)
    if amp.dtype == "fp16":
        log.warning("amp.dtype fp16 is for CUDA (with a GradScaler); the %s runs fp32", device.type)
    return Precision(device.type)


def compile_encoders(core: ACLUS) -> bool:
    """``torch.compile`` the online and target encoders in place (``nn.Module.compile``: the
    state dict keeps its keys). A failure to compile, now or at the first step, leaves
    them eager (``suppress_errors``) with a warning; returns whether compiling was set up."""
    try:
        import torch._dynamo
        torch._dynamo.config.suppress_errors = True  # a graph that fails to compile runs eagerly
        for enc in (core.encoder, core.target_encoder):
            enc.compile()
    except Exception as e:  # any failure here means: run eagerly
        for enc in (core.encoder, core.target_encoder):
            enc._compiled_call_impl = None
        log.warning("amp.compile: torch.compile is not available here (%s: %s); the encoders run eagerly",
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


def prepare_model(core: ACLUS, amp: AmpConfig, device: torch.device) -> dict[str, bool]:
    """Channels-last (CUDA) and compilation of the encoders, as the config asks; returns what is on."""
    channels_last = amp.channels_last and device.type == "cuda"
    core.set_channels_last(channels_last)
    compiled = compile_encoders(core) if amp.compile else False
    return {"channels_last": channels_last, "compile": compiled}
