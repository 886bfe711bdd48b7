"""Text generation with a Hugging Face causal LM, many prompts in one `generate` call.

Batched output must equal one-at-a-time output. Two things make that true:
- left padding with an attention mask (position ids follow the mask), so a prompt's continuation
  does not depend on how long its batch-mates are;
- sampling per row with the row's own `torch.Generator` seeded from the request's seed, instead
  of the global RNG that `generate(do_sample=True)` shares across the batch. `generate` runs
  greedy and `RowSampler` picks each sampled row's token, so batch-mates may also differ in
  temperature, top_p and top_k.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessor,
    LogitsProcessorList,
    StoppingCriteria,
    StoppingCriteriaList,
)

from bigmodel.core.errors import INVALID_INPUT, PROMPT_TOO_LONG, PermanentError
from bigmodel.core.runner import Item
from bigmodel.core.settings import Settings
from bigmodel.core.status import Task
from bigmodel.ledger.repo import ModelInfo
from bigmodel.models import Accel
from bigmodel.models.source import resolve_source

_SEED_MIX = 1_000_003


@dataclass
class Row:
    """One sequence to generate: a request expands into `num_return_sequences` rows."""

    prompt_ids: list[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_p: float
    top_k: int | None
    stop: list[str]
    generator: torch.Generator | None


class RowSampler(LogitsProcessor):
    """Samples each sampled row with its own generator; greedy rows are left to argmax."""

    def __init__(self, rows: Sequence[Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        for r, row in enumerate(self.rows):
            if not row.do_sample:
                continue
            logits = scores[r].float() / row.temperature
            if row.top_k is not None and row.top_k < logits.numel():
                kth = torch.topk(logits, row.top_k).values[-1]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if row.top_p < 1.0:
                sorted_logits, order = torch.sort(logits, descending=True)
                cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
                drop = cum - torch.softmax(sorted_logits, dim=-1) >= row.top_p
                logits = logits.masked_fill(
                    torch.zeros_like(drop).scatter(0, order, drop), float("-inf")
                )
            probs = torch.softmax(logits, dim=-1)
            token = torch.multinomial(probs, 1, generator=row.generator)
            scores[r] = torch.full_like(scores[r], float("-inf"))
            scores[r, token] = 0.0
        return scores


class RowStop(StoppingCriteria):
    """Marks a row done at its own max_new_tokens or when a stop string appears."""

    def __init__(self, rows: Sequence[Row], prompt_len: int, tokenizer) -> None:
        self.rows = rows
        self.prompt_len = prompt_len
        self.tokenizer = tokenizer

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        produced = input_ids.shape[1] - self.prompt_len
        for r, row in enumerate(self.rows):
            if produced >= row.max_new_tokens:
                done[r] = True
            elif row.stop:
                text = self.tokenizer.decode(
                    input_ids[r, self.prompt_len :], skip_special_tokens=True
                )
                done[r] = any(s in text for s in row.stop)
        return done


class GenerateRunner:
    task = Task.GENERATE

    def __init__(self, name: str, model, tokenizer, *, device: str) -> None:
        self.name = name
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = device
        tokenizer.padding_side = "left"
        self.eos_id = tokenizer.eos_token_id
        if self.eos_id is None:
            self.eos_id = getattr(model.generation_config, "eos_token_id", None)
        # Models like GPT-2 have no pad token; eos stands in (the attention mask hides it).
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        if self.pad_id is None:
            self.pad_id = 0
        cfg = model.config
        self.context = int(
            getattr(cfg, "max_position_embeddings", 0)
            or getattr(cfg, "n_positions", 0)
            or min(tokenizer.model_max_length, 1 << 20)
        )

    @classmethod
    def load(
        cls, info: ModelInfo, *, device: str, settings: Settings, accel: Accel | None = None
    ) -> GenerateRunner:
        accel = accel or Accel()
        path = resolve_source(info.source, settings)
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=accel.torch_dtype)
        return cls(info.name, model, tokenizer, device=device)

    def decode(self, item: Item) -> list[int]:
        prompt = item.input["prompt"]
        ids = self.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        if not ids:
            raise PermanentError(INVALID_INPUT, "the prompt encodes to no tokens")
        need = len(ids) + item.params.get("max_new_tokens", 32)
        if need > self.context:
            raise PermanentError(
                PROMPT_TOO_LONG,
                f"the prompt is {len(ids)} tokens; with max_new_tokens "
                f"{item.params.get('max_new_tokens', 32)} that is {need}, over the model's "
                f"context window of {self.context} tokens",
            )
        return ids

    def batch_key(self, decoded: list[int], params: dict[str, Any]) -> tuple:
        # Every row samples on its own, so all requests are compatible; sort by length.
        return (0, len(decoded))

    def cost(self, decoded: list[int], params: dict[str, Any]) -> tuple[int, int]:
        """Rows and padded length this request adds to a batch (for the token budget)."""
        return (
            params.get("num_return_sequences", 1),
            len(decoded) + params.get("max_new_tokens", 32),
        )

    def _rows(self, ids: list[int], params: dict[str, Any]) -> list[Row]:
        do_sample = bool(params.get("do_sample", False))
        seed = params.get("seed")
        if do_sample and seed is None:
            seed = random.SystemRandom().randrange(2**63)
        rows = []
        for j in range(params.get("num_return_sequences", 1)):
            gen = None
            if do_sample:
                gen = torch.Generator(device=self.device)
                gen.manual_seed((seed * _SEED_MIX + j) % (2**63))
            rows.append(
                Row(
                    ids,
                    params.get("max_new_tokens", 32),
                    do_sample,
                    params.get("temperature", 1.0),
                    params.get("top_p", 1.0),
                    params.get("top_k"),
                    list(params.get("stop") or []),
                    gen,
                )
            )
        return rows

    def predict(self, decoded: Sequence[list[int]], params: Sequence[dict[str, Any]]) -> list:
        rows: list[Row] = []
        owners: list[int] = []
        for i, (ids, prm) in enumerate(zip(decoded, params, strict=True)):
            for row in self._rows(ids, prm):
                rows.append(row)
                owners.append(i)
        width = max(len(r.prompt_ids) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            n = len(row.prompt_ids)
            input_ids[r, width - n :] = torch.tensor(row.prompt_ids, dtype=torch.long)
            mask[r, width - n :] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=mask,
                max_new_tokens=max(r.max_new_tokens for r in rows),
                do_sample=False,
                num_beams=1,
                temperature=None,
                top_p=None,
                top_k=None,
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_id,
                logits_processor=LogitsProcessorList([RowSampler(rows)]),
                stopping_criteria=StoppingCriteriaList([RowStop(rows, width, self.tokenizer)]),
            )
        generated = out[:, width:].cpu().tolist()
        per_item: list[list[dict[str, Any]]] = [[] for _ in decoded]
        for r, row in enumerate(rows):
            per_item[owners[r]].append(self._finish(generated[r], row))
        return per_item

    def _finish(self, tokens: list[int], row: Row) -> dict[str, Any]:
        tokens = tokens[: row.max_new_tokens]
        reason = "length"
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[: tokens.index(self.eos_id)]
            reason = "eos"
        # NUL cannot be stored in PostgreSQL text or JSONB; a model may still emit it.
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).replace("\x00", "")
        used = len(tokens)
        if row.stop:
            cut = min((text.find(s) for s in row.stop if s in text), default=-1)
            if cut >= 0:
                text = text[:cut]
                reason = "stop"
                # The tokens it took to produce the stop string: the shortest prefix holding it.
                for k in range(1, len(tokens) + 1):
                    piece = self.tokenizer.decode(tokens[:k], skip_special_tokens=True)
                    if any(s in piece for s in row.stop):
                        used = k
                        break
        if reason == "eos":
            used += 1
        return {"text": text, "tokens": used, "finish_reason": reason}

    def encode(self, output: list[dict[str, Any]], params: dict[str, Any]) -> dict[str, Any]:
        return {"sequences": output}
