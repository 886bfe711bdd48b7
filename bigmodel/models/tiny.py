"""Tiny models with random weights, built locally, for the demo, tests and benchmarks.

No model hub is reachable on our machines, so these are saved in exactly the layouts users
register (a `save_pretrained` folder; a safetensors state dict plus labels.json) and loaded
through the same code paths.
"""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Batch inference keeps the GPU busy while the queue feeds it.",
    "Workers pull requests from Redis and write results to the database.",
    "Le renard brun saute par-dessus le chien paresseux. Ça marche très bien.",
    "敏捷的棕色狐狸跳过了懒狗。批量推理让显卡保持忙碌。",
    "Ein Arbeiter liest Anfragen, ein anderer schreibt Ergebnisse.",
    "Once upon a time, a model generated text for a business system.",
    "1234567890 !?.,;:()[]{}<>@#$%^&*-_=+/\\|'\"`~",
]
EOS = "<|endoftext|>"


def build_tiny_generator(
    folder: str | Path, *, n_positions: int = 128, seed: int = 0, n_layer: int = 2, n_embd: int = 64
) -> Path:
    """A GPT-2 shaped causal LM with a byte-level BPE tokenizer trained on a few lines."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=[EOS], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS,
        bos_token=EOS,
        unk_token=EOS,
        model_max_length=n_positions,
    )
    fast.save_pretrained(folder)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(fast),
        n_positions=n_positions,
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=2,
        bos_token_id=fast.eos_token_id,
        eos_token_id=fast.eos_token_id,
    )
    model = GPT2LMHeadModel(config)
    model.save_pretrained(folder)
    return folder


def build_tiny_classifier(
    folder: str | Path, *, arch: str = "resnet18", num_classes: int = 10, seed: int = 0
) -> Path:
    """A torchvision architecture with random weights as `model.safetensors` + `labels.json`."""
    import torch
    import torchvision
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    labels = [f"class_{i:02d}" for i in range(num_classes)]
    (folder / "labels.json").write_text(json.dumps(labels), encoding="utf-8")
    return folder


def make_images(count: int, *, size: int = 64, seed: int = 0, fmt: str = "JPEG") -> list[bytes]:
    """Synthetic pictures (coloured shapes on a gradient) encoded as JPEG or PNG."""
    import io
    import random

    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    out = []
    for _ in range(count):
        img = Image.new("RGB", (size, size))
        draw = ImageDraw.Draw(img)
        a, b = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(2)]
        for y in range(size):
            t = y / max(size - 1, 1)
            draw.line(
                [(0, y), (size, y)], fill=tuple(int(a[c] * (1 - t) + b[c] * t) for c in range(3))
            )
        x0, y0 = rng.randrange(size // 2), rng.randrange(size // 2)
        shape = rng.choice([draw.ellipse, draw.rectangle])
        shape(
            [x0, y0, x0 + size // 3, y0 + size // 3],
            fill=tuple(rng.randrange(256) for _ in range(3)),
        )
        buf = io.BytesIO()
        img.save(buf, format=fmt, quality=90) if fmt == "JPEG" else img.save(buf, format=fmt)
        out.append(buf.getvalue())
    return out
