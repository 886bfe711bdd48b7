"""The models and inputs every section measures: built locally, deterministic, reused if present."""

from __future__ import annotations

import base64
import json
import os
import random
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLASSIFY_ARCH = "resnet18"
CLASSIFY_CLASSES = 1000
IMAGE_SIZE = 224
GPT2_CONTEXT = 1024
NULL_MODEL = "noop"
NULL_BATCH = 256
_DONE = "bench-complete.json"


@contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence file descriptor 2: the tokenizer trainer draws a progress bar from Rust."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _complete(folder: Path, spec: dict[str, Any]) -> bool:
    marker = folder / _DONE
    try:
        return json.loads(marker.read_text(encoding="utf-8")) == spec
    except (OSError, ValueError):
        return False


def _mark(folder: Path, spec: dict[str, Any]) -> None:
    (folder / _DONE).write_text(json.dumps(spec), encoding="utf-8")


def build_classifier(folder: Path) -> Path:
    """resnet18 with random weights and 1,000 classes (model.safetensors + labels.json)."""
    from bigmodel.models.tiny import build_tiny_classifier

    spec = {"arch": CLASSIFY_ARCH, "num_classes": CLASSIFY_CLASSES, "seed": 0}
    if not _complete(folder, spec):
        build_tiny_classifier(folder, arch=CLASSIFY_ARCH, num_classes=CLASSIFY_CLASSES, seed=0)
        _mark(folder, spec)
    return folder


def build_gpt2_small(folder: Path) -> Path:
    """GPT-2 small's shape (GPT2Config defaults: 12 layers, 768 dims, 12 heads), random weights.

    The tokenizer is the tiny byte-level BPE of `build_tiny_generator` (its vocabulary is a few
    hundred tokens, so the LM head is smaller than GPT-2's 50,257); the model is written over the
    tiny one in the same folder.
    """
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from bigmodel.models.tiny import build_tiny_generator

    spec = {"config": "GPT2Config()", "n_positions": GPT2_CONTEXT, "seed": 0}
    if _complete(folder, spec):
        return folder
    hf_logging.disable_progress_bar()
    with _quiet_stderr():
        build_tiny_generator(folder, n_positions=GPT2_CONTEXT)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=GPT2_CONTEXT,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    _mark(folder, spec)
    return folder


def image_refs(storage, count: int, *, mode: str) -> list[str]:
    """`count` JPEGs at 224 px (make_images), as s3:// objects in the bench bucket or data: URIs."""
    from bigmodel.models.tiny import make_images

    images = make_images(count, size=IMAGE_SIZE, seed=0)
    if mode == "data":
        return ["data:image/jpeg;base64," + base64.b64encode(b).decode("ascii") for b in images]

    def put(pair: tuple[int, bytes]) -> str:
        i, data = pair
        return storage.put(f"inputs/images/{i:05d}.jpg", data, content_type="image/jpeg")

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(put, enumerate(images)))


def make_prompts(count: int, *, seed: int = 0) -> list[str]:
    """Prompts of varied length (10 to 300 characters) cut from the tiny tokenizer's corpus."""
    from bigmodel.models.tiny import CORPUS

    rng = random.Random(seed)
    text = " ".join(CORPUS * 8)
    prompts = []
    for _ in range(count):
        length = rng.randint(10, 300)
        start = rng.randrange(len(text) - length)
        prompts.append(text[start : start + length].strip() or "Hello")
    return prompts


def classify_requests(model: str, refs: list[str], *, prefix: str = "img") -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}-{i:05d}",
            "model": model,
            "input": {"image": ref},
            "params": {"top_k": 5},
        }
        for i, ref in enumerate(refs)
    ]


def generate_requests(
    model: str, prompts: list[str], *, new_tokens: int, prefix: str = "txt"
) -> list[dict]:
    return [
        {
            "custom_id": f"{prefix}-{i:05d}",
            "model": model,
            "input": {"prompt": p},
            "params": {"max_new_tokens": new_tokens},
        }
        for i, p in enumerate(prompts)
    ]


def null_requests(count: int, *, prefix: str, model: str = NULL_MODEL) -> list[dict]:
    return [
        {"custom_id": f"{prefix}-{i:06d}", "model": model, "input": {"prompt": "ping"}}
        for i in range(count)
    ]


def write_jsonl(path: Path, requests: list[dict]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for req in requests:
            f.write(json.dumps(req, separators=(",", ":")) + "\n")
    return path
