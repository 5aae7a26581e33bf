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

from ..data.conversation import MEDIA_FIELDS, ROLES, encode_prompt
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
    """records: LLaVA samples ({id, images: [PIL or uint8 array], conversations}, and `videos` / `audios` for a model
    that reads them; `processor` an ImageProcessor or a data.media.MediaProcessor). Returns {"accuracy", "n",
    "per_type": {qtype: {"accuracy", "n"}}, "per_modality" (records with a `modality`), "examples": first few},
    and with `all_answers` also "answers": every question's {id, type, question, answer, reference, correct}."""
    from ..generation import generate

    from ..data.media import MediaProcessor

    mc = model.config
    items = questions(records)
    if not isinstance(processor, MediaProcessor):  # an ImageProcessor: the model's other media as it reads them
        processor = MediaProcessor.for_model(mc, processor)
    media = mc.placeholders()

    def answer(chunk: list) -> list[str]:
        prompts = [encode_prompt(turns, tokenizer, template, mc.image_token_id, mc.image_tokens, name=str(r.get("id")),
                                 media=media) for r, turns, _, _ in chunk]
        T = max(map(len, prompts))
        ids = torch.tensor([[tokenizer.pad_id] * (T - len(p)) + p for p in prompts], device=next(model.parameters()).device)
        mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        # Each prompt carries its record's media, in order (a record with two questions sends them twice).
        lists: dict[str, list] = {"images": [], "videos": [], "audios": []}
        for r, turns, _, _ in chunk:
            text = "".join(t.get("value", t.get("content", "")) for t in turns)
            for placeholder, key in MEDIA_FIELDS.items():
                lists[key] += [_pil(m) if key == "images" else m for m in (r.get(key) or [])[: text.count(placeholder)]]
        out = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eot_id,
                       **processor(**lists))
        return [tokenizer.decode([t for t in row if t != tokenizer.eot_id]).strip() for row in out.tolist()]

    # Under torch.distributed each rank answers every W-th chunk; all ranks then score every answer.
    chunks = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
    answers = [a for part in map_shards(answer, chunks) for a in part]
    hits: dict[str, list[int]] = defaultdict(list)
    by_modality: dict[str, list[int]] = defaultdict(list)
    rows = []
    for (r, turns, ref, qtype), ans in zip(items, answers):
        ok = int(ans == ref.strip())
        hits["all"].append(ok)
        if qtype:
            hits[qtype].append(ok)
        if r.get("modality"):
            by_modality[r["modality"]].append(ok)
        rows.append({"id": r.get("id"), "type": qtype, "question": turns[-1].get("value", turns[-1].get("content")),
                     "answer": ans, "reference": ref, "correct": bool(ok)})
    acc = lambda v: sum(v) / len(v) if v else 0.0  # noqa: E731
    result = {"accuracy": acc(hits["all"]), "n": len(hits["all"]),
              "per_type": {k: {"accuracy": acc(v), "n": len(v)} for k, v in sorted(hits.items()) if k != "all"},
              "per_modality": {k: {"accuracy": acc(v), "n": len(v)} for k, v in sorted(by_modality.items())},
              "examples": [{k: x[k] for k in ("id", "question", "answer", "reference")} for x in rows[:8]]}
    if all_answers:
        result["answers"] = rows
    return result
