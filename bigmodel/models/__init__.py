"""Model runners, one file per task, and their loading. torch is imported only in here.

Adding a task (say embeddings) is one new file with a runner class and one line in `RUNNERS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bigmodel.core.status import Task

if TYPE_CHECKING:
    from bigmodel.core.runner import ModelRunner
    from bigmodel.core.settings import Settings
    from bigmodel.ledger.repo import ModelInfo

RUNNERS: dict[Task, str] = {
    Task.CLASSIFY: "bigmodel.models.classify:ClassifyRunner",
    Task.GENERATE: "bigmodel.models.generate:GenerateRunner",
}

DEFAULT_BATCH_SIZE: dict[Task, int] = {Task.CLASSIFY: 32, Task.GENERATE: 16}


@dataclass(frozen=True)
class Accel:
    """How a runner uses its device. All off on CPU; `for_device` picks CUDA defaults."""

    dtype: str = "float32"  # float32 | float16 | bfloat16
    channels_last: bool = False  # convolutional models: NHWC kernels on tensor cores
    pin_memory: bool = False  # page-locked host batches for asynchronous host->device copies
    gpu_decode: bool = False  # JPEGs decoded by nvjpeg on the GPU, a batch at a time

    @classmethod
    def for_device(cls, device: str, *, dtype: str = "auto", channels_last: str = "auto") -> Accel:
        cuda = device.startswith("cuda")
        if dtype == "auto":
            dtype = "float32"
            if cuda:
                import torch

                dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: use auto, {', '.join(DTYPES)}")
        if channels_last not in ("auto", "on", "off"):
            raise ValueError(f"channels_last {channels_last!r}: use auto, on or off")
        last = cuda if channels_last == "auto" else channels_last == "on"
        return cls(dtype=dtype, channels_last=last, pin_memory=cuda, gpu_decode=cuda)

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)


DTYPES = ("float32", "float16", "bfloat16")


def load_runner(
    info: ModelInfo, *, device: str, settings: Settings, accel: Accel | None = None
) -> ModelRunner:
    """Build the runner for a registered model: weights loaded, on `device`, ready to predict."""
    accel = accel or Accel()
    from bigmodel.models.null import NULL_PREFIX, NullRunner

    if info.source.startswith(NULL_PREFIX):
        return NullRunner.load(info, device=device, settings=settings)
    module, _, cls = RUNNERS[info.task].partition(":")
    runner_cls = getattr(importlib.import_module(module), cls)
    return runner_cls.load(info, device=device, settings=settings, accel=accel)


def pick_device(spec: str) -> str:
    """`auto` -> `cuda` when a GPU is visible, else `cpu`; anything else is checked and kept."""
    import torch

    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            from bigmodel.core.errors import ConfigError

            raise ConfigError(f"--device {spec}: CUDA is not available on this machine")
        return spec
    if spec != "cpu":
        from bigmodel.core.errors import ConfigError

        raise ConfigError(f"--device {spec!r}: use auto, cpu or cuda:N")
    return spec
