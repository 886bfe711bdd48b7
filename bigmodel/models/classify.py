"""Image classification with a torchvision architecture.

Sources: a folder with `model.safetensors` (a state dict for `--arch`) and `labels.json` (the class
names), or `torchvision:<arch>` for the published weights through the normal torch cache. Images
are preprocessed with the architecture's own transforms.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image, UnidentifiedImageError
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms._presets import ImageClassification

from bigmodel.core.errors import (
    IMAGE_DECODE_FAILED,
    IMAGE_TOO_LARGE,
    ConfigError,
    PermanentError,
)
from bigmodel.core.runner import Item
from bigmodel.core.settings import Settings
from bigmodel.core.status import Task
from bigmodel.ledger.repo import ModelInfo
from bigmodel.models import Accel
from bigmodel.models.registry import TORCHVISION_PREFIX
from bigmodel.models.source import resolve_source
from bigmodel.storage.fetch import Fetcher

# torchvision 0.29 marks its decoders deprecated in favour of TorchCodec; they remain the decoders
# that run on the GPU too (decode_jpeg(device="cuda")), so we keep them and silence the notice.
warnings.filterwarnings("ignore", category=DeprecationWarning, module="torchvision.io.image")


@dataclass(frozen=True)
class Jpeg:
    """JPEG bytes waiting for the GPU decoder."""

    data: torch.Tensor


def default_transform(arch: str):
    """The architecture's own preprocessing (from its default weights' metadata, no download)."""
    try:
        return torchvision.models.get_model_weights(arch).DEFAULT.transforms()
    except (ValueError, AttributeError, KeyError):
        return ImageClassification(crop_size=224)


def build(arch: str, *, num_classes: int) -> torch.nn.Module:
    if arch not in torchvision.models.list_models():
        raise ConfigError(
            f"unknown torchvision architecture {arch!r}; e.g. resnet18, resnet50, "
            "mobilenet_v3_small, efficientnet_b0, vit_b_16"
        )
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def load_labels(path: Path) -> list[str]:
    try:
        labels = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the class names: {exc}") from None
    if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
        raise ConfigError(f"{path}: expected a non-empty JSON list of class names")
    return labels


class ClassifyRunner:
    task = Task.CLASSIFY

    def __init__(
        self,
        name: str,
        model: torch.nn.Module,
        labels: list[str],
        transform,
        *,
        device: str,
        fetcher: Fetcher,
        max_image_pixels: int,
        accel: Accel | None = None,
    ) -> None:
        self.name = name
        self.accel = accel or Accel()
        self.dtype = self.accel.torch_dtype
        model = model.eval().to(device=device, dtype=self.dtype)
        if self.accel.channels_last:
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.labels = labels
        self.transform = transform
        self.device = device
        self.fetcher = fetcher
        self.max_image_pixels = max_image_pixels

    @classmethod
    def load(
        cls, info: ModelInfo, *, device: str, settings: Settings, accel: Accel | None = None
    ) -> ClassifyRunner:
        if info.source.startswith(TORCHVISION_PREFIX):
            arch = info.source[len(TORCHVISION_PREFIX) :]
            if info.arch and info.arch != arch:
                raise ConfigError(
                    f"model {info.name!r}: --arch {info.arch} does not match source {info.source}"
                )
            weights = torchvision.models.get_model_weights(arch).DEFAULT
            model = torchvision.models.get_model(arch, weights=weights)
            labels = list(weights.meta["categories"])
            transform = weights.transforms()
        else:
            if not info.arch:
                raise ConfigError(
                    f"model {info.name!r}: a classify model from a folder needs "
                    "--arch (e.g. resnet50)"
                )
            folder = Path(resolve_source(info.source, settings))
            labels = load_labels(folder / "labels.json")
            model = build(info.arch, num_classes=len(labels))
            weights_file = folder / "model.safetensors"
            if not weights_file.is_file():
                raise ConfigError(f"model {info.name!r}: {weights_file} not found")
            from safetensors.torch import load_file

            try:
                model.load_state_dict(load_file(str(weights_file)))
            except RuntimeError as exc:
                raise ConfigError(
                    f"model {info.name!r}: {weights_file} does not fit "
                    f"{info.arch} with {len(labels)} classes: {exc}"
                ) from None
            transform = default_transform(info.arch)
        fetcher = Fetcher(
            endpoint_url=settings.s3_endpoint_url,
            timeout_s=settings.fetch_timeout_s,
            max_bytes=settings.max_image_bytes,
        )
        return cls(
            info.name,
            model,
            labels,
            transform,
            device=device,
            fetcher=fetcher,
            max_image_pixels=settings.max_image_pixels,
            accel=accel,
        )

    def decode(self, item: Item) -> torch.Tensor:
        data = self.fetcher.fetch(item.input["image"])
        if not data:
            raise PermanentError(IMAGE_DECODE_FAILED, "the image is empty (0 bytes)")
        # Read only the header first: a small file can claim a huge canvas (a decompression bomb).
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                width, height = Image.open(io.BytesIO(data)).size
        except Image.DecompressionBombError as exc:
            raise PermanentError(IMAGE_TOO_LARGE, f"decompression bomb refused: {exc}") from None
        except UnidentifiedImageError:
            raise PermanentError(
                IMAGE_DECODE_FAILED, "not an image in a known format (JPEG, PNG, GIF, WebP, ...)"
            ) from None
        except Exception as exc:
            raise PermanentError(
                IMAGE_DECODE_FAILED, f"not a readable image ({type(exc).__name__}: {exc})"
            ) from None
        if width * height > self.max_image_pixels:
            raise PermanentError(
                IMAGE_TOO_LARGE,
                f"the image is {width}x{height} pixels, over the limit of {self.max_image_pixels}",
            )
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if self.accel.gpu_decode and data[:2] == b"\xff\xd8":
            return Jpeg(raw)  # decoded on the GPU with its batch-mates, in predict
        try:
            img = decode_image(raw, mode=ImageReadMode.RGB)
        except Exception as exc:
            raise PermanentError(
                IMAGE_DECODE_FAILED, f"the image cannot be decoded: {exc}"
            ) from None
        return self.transform(img)

    def batch_key(self, decoded: torch.Tensor | Jpeg, params: dict[str, Any]) -> tuple:
        # Transforms crop to one size, so every item fits one batch; shape guards the rest.
        return (0,) if isinstance(decoded, Jpeg) else (tuple(decoded.shape),)

    def _gpu_decode(self, decoded: Sequence[torch.Tensor | Jpeg]) -> list[torch.Tensor]:
        jpegs = [i for i, d in enumerate(decoded) if isinstance(d, Jpeg)]
        out = list(decoded)
        if jpegs:
            try:
                images = decode_jpeg(
                    [decoded[i].data for i in jpegs], mode=ImageReadMode.RGB, device=self.device
                )
            except RuntimeError as exc:
                if len(decoded) == 1:
                    raise PermanentError(
                        IMAGE_DECODE_FAILED, f"the image cannot be decoded: {exc}"
                    ) from None
                raise  # the run loop re-runs items alone to find the bad one
            for i, img in zip(jpegs, images, strict=True):
                out[i] = self.transform(img)
        return [t.to(self.device, non_blocking=True) for t in out]

    def predict(
        self, decoded: Sequence[torch.Tensor | Jpeg], params: Sequence[dict[str, Any]]
    ) -> list:
        k = min(max(p.get("top_k", 5) for p in params), len(self.labels))
        if self.accel.gpu_decode:
            x = torch.stack(self._gpu_decode(decoded))
        else:
            x = torch.stack(list(decoded))
            if self.accel.pin_memory:
                x = x.pin_memory()
            x = x.to(self.device, non_blocking=True)
        x = x.to(self.dtype)
        if self.accel.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            probs = torch.softmax(self.model(x).float(), dim=1)
            scores, indices = probs.topk(k, dim=1)
        return list(zip(scores.cpu().tolist(), indices.cpu().tolist(), strict=True))

    def encode(self, output: tuple[list[float], list[int]], params: dict[str, Any]) -> dict:
        scores, indices = output
        k = params.get("top_k", 5)
        return {
            "labels": [
                {"index": i, "label": self.labels[i], "score": round(s, 6)}
                for s, i in zip(scores[:k], indices[:k], strict=True)
            ]
        }
