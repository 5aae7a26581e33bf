"""Visual question answering: exact-match accuracy of greedy answers, overall and per question type.

Every question of a conversation is asked with the turns before it (reference answers as history), so a
multi-turn record yields one scored question per user turn. A record's `qtype` (or `question_types`, one
per question) names its type; records without one count under "all" only.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from ..data.conversation import ROLES, encode_prompt
from ..distributed import map_shards


def _pil(image: Any) -> Image.Image:
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def questions(records: Sequence[dict[str, Any]]) -> list[tuple[dict[str, Any], list[dict[str, str]], str, str]]:
    """(record, prompt turns, reference answer, qtype) for every assistant turn of every record."""
    out = []
    for r in records:
        types = r.get("question_types") or []
        k = 0
        for j, t in enumerate(r["conversations"]):
            if ROLES.get(t.get("from", t.get("role"))) == "assistant":
                qtype = types[k] if k < len(types) else r.get("qtype", "")
                out.append((r, r["conversations"][:j], t.get("value", t.get("content")), qtype))
                k += 1
    return out


@torch.inference_mode()
def evaluate_vqa(model: Any, tokenizer: Any, processor: Any, records: Sequence[dict[str, Any]], template: str,
                 batch_size: int = 32, max_new_tokens: int = 32, all_answers: bool = False) -> dict[str, Any]:
    """records: LLaVA samples ({id, images: [PIL or uint8 array], conversations}). Returns
    {"accuracy", "n", "per_type": {qtype: {"accuracy", "n"}}, "examples": first few (question, answer, reference)},
    and with `all_answers` also "answers": every question's {id, type, question, answer, reference, correct}."""
    from ..generation import generate

    mc = model.config
    items = questions(records)

    def answer(chunk: list) -> list[str]:
        prompts = [encode_prompt(turns, tokenizer, template, mc.image_token_id, mc.image_tokens, name=str(r.get("id")))
                   for r, turns, _, _ in chunk]
        T = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_id] * (T - len(p)) + p for p in prompts], device=next(model.parameters()).device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        # Each prompt carries its record's images, in order (a record with two questions sends them twice).
        images = [_pil(im) for r, turns, _, _ in chunk
                  for im in r["images"][: sum(t.get("value", t.get("content", "")).count("<image>") for t in turns)]]
        pixels = processor(images) if images else None
        out = generate(model, ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=max_new_tokens,
                       eos_token_id=tokenizer.eot_id)
        return [tokenizer.decode([t for t in row if t != tokenizer.eot_id]).strip() for row in out.tolist()]

    # Under torch.distributed each rank answers every W-th chunk; all ranks then score every answer.
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    answers = [a for part in map_shards(answer, chunks) for a in part]
    hits: dict[str, list[int]] = defaultdict(list)
    rows = []
    for (r, turns, ref, qtype), ans in zip(items, answers):
        ok = int(ans == ref.strip())
        hits["all"].append(ok)
        if qtype:
            hits[qtype].append(ok)
        rows.append({"id": r.get("id"), "type": qtype, "question": turns[-1].get("value", turns[-1].get("content")),
                     "answer": ans, "reference": ref, "correct": bool(ok)})
    acc = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    result = {"accuracy": acc(hits["all"]), "n": len(hits["all"]),
              "per_type": {k: {"accuracy": acc(v), "n": len(v)} for k, v in sorted(hits.items()) if k != "all"},
              "examples": [{k: x[k] for k in ("id", "question", "answer", "reference")} for x in rows[:8]]}
    if all_answers:
        result["answers"] = rows
    return result
