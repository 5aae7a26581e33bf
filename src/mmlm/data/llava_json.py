"""LLaVA's conversation JSON: a list of {id, image, conversations: [{from: human|gpt, value}, ...]}.

`image` is a path (or a list of paths) relative to `image_root`, or to the JSON file's directory when no
root is given; a record without `image` is text-only. `video` and `audio` (a path or a list, under the same root)
are clips and sounds for a model that reads them (`<video>` / `<audio>` in the text): a video is read as `frames`
frames spread over it, a sound at 16 kHz mono. A record without a conversation list is an error
naming it when the file is opened; an image that cannot be read (missing, corrupt, too large) makes the
item `{"bad": (source, reason)}`, which the collate drops and the training loop counts and reports, as
for image-text pairs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from .media import read_audio, read_video
from .transforms import load_image


class LlavaJson(Dataset):
    def __init__(self, path: str | Path, image_root: str | Path = "", max_pixels: int | None = None, frames: int = 8):
        self.path = Path(path)
        try:
            records = json.loads(self.path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{self.path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
        if not isinstance(records, list):
            raise ValueError(f"{self.path}: expected a JSON list of LLaVA records")
        for k, r in enumerate(records):
            name = r.get("id", f"#{k}") if isinstance(r, dict) else f"#{k}"
            if not isinstance(r, dict) or not isinstance(r.get("conversations"), list) or not r["conversations"]:
                raise ValueError(f"{self.path}: record {name} has no 'conversations' list")
        self.records = records
        self.root = Path(image_root) if image_root else self.path.parent
        self.max_pixels, self.frames = max_pixels, frames

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.records[i]
        name = str(r.get("id", f"{self.path.name}#{i}"))
        readers = {"image": lambda path: load_image(path, max_pixels=self.max_pixels),
                   "video": lambda path: read_video(path, self.frames),
                   "audio": lambda path: read_audio(path, 16_000)}
        media: dict[str, list] = {}
        for key, read in readers.items():
            paths = r.get(key) or []
            paths = [paths] if isinstance(paths, str) else list(paths)
            media[key] = []
            for p in paths:
                try:
                    media[key].append(read(self.root / p))
                except (OSError, ValueError) as e:  # BadMediaError and BadImageError are ValueErrors
                    return {"bad": (f"{name} ({self.root / p})", str(e))}
        replies = [t.get("value", "") for t in r["conversations"] if t.get("from") in ("gpt", "assistant")]
        item = {"id": name, "images": media["image"], "videos": media["video"], "audios": media["audio"],
                "conversations": r["conversations"], "caption": replies[0] if replies else ""}
        for key in ("qtype", "question_types"):  # per-question-type VQA scores
            if key in r:
                item[key] = r[key]
        return item
