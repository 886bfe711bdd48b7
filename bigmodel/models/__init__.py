"""Model runners, one file per task, and their loading. torch is imported only in here.

Adding a task (say embeddings) is one new file with a runner class and one line in `RUNNERS`.
"""

from __future__ import annotations

import importlib
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


def load_runner(info: ModelInfo, *, device: str, settings: Settings) -> ModelRunner:
    """Build the runner for a registered model: weights loaded, on `device`, ready to predict."""
    if info.source.startswith("null:"):
        from bigmodel.models.null import NullRunner

        return NullRunner.load(info, device=device, settings=settings)
    module, _, cls = RUNNERS[info.task].partition(":")
    runner_cls = getattr(importlib.import_module(module), cls)
    return runner_cls.load(info, device=device, settings=settings)


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
