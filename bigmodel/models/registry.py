"""Checks made when a model is registered (no torch needed; the worker checks the weights)."""

from __future__ import annotations

from pathlib import Path

from bigmodel.core.errors import ConfigError
from bigmodel.core.status import Task
from bigmodel.models.null import NULL_PREFIX, null_delay_ms

TORCHVISION_PREFIX = "torchvision:"


def check_registration(
    name: str, source: str, *, task: str, arch: str | None, batch_size: int | None
) -> tuple[Task, str, str | None, int]:
    """Validate a registration; return (task, source, arch, batch_size) normalised."""
    from bigmodel.models import DEFAULT_BATCH_SIZE

    try:
        task_ = Task(task)
    except ValueError:
        raise ConfigError(f"--task {task!r}: use classify or generate") from None
    size = batch_size or DEFAULT_BATCH_SIZE[task_]
    if source.startswith(NULL_PREFIX):  # the no-op model for benchmarks and fault tests
        null_delay_ms(source)
        return task_, source, arch, size
    local = Path(source).expanduser()
    is_local = local.exists()
    if is_local:
        source = str(local.resolve())
    if task_ is Task.CLASSIFY:
        if source.startswith(TORCHVISION_PREFIX):
            tv_arch = source[len(TORCHVISION_PREFIX) :]
            if arch and arch != tv_arch:
                raise ConfigError(f"--arch {arch} does not match source {source}")
            arch = tv_arch
        elif not arch:
            raise ConfigError(
                f"model {name!r}: a classify model needs --arch (e.g. resnet50) "
                "unless its source is torchvision:<arch>"
            )
        if is_local:
            missing = [f for f in ("model.safetensors", "labels.json") if not (local / f).is_file()]
            if missing:
                raise ConfigError(
                    f"{source}: missing {', '.join(missing)} (a classify folder "
                    "holds model.safetensors and labels.json)"
                )
        elif not source.startswith(("s3://", TORCHVISION_PREFIX)):
            raise ConfigError(
                f"{source!r}: a classify source is a folder, an s3:// prefix or torchvision:<arch>"
            )
    else:
        if arch:
            raise ConfigError(
                "--arch is for classify models; a generate model's folder or hub "
                "id names its own architecture"
            )
        if is_local and not (local / "config.json").is_file():
            raise ConfigError(
                f"{source}: no config.json; save the model with "
                "save_pretrained (model and tokenizer)"
            )
    if not is_local and source.startswith(("/", "./", "../", "~")):
        raise ConfigError(f"model source {source!r} does not exist")
    return task_, source, arch, size
