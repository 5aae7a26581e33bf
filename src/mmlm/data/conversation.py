"""LLaVA conversations -> (input_ids, labels), with the label mask built by construction.

A template turns a conversation into a list of pieces, each either text or token ids, each marked as
learned (an assistant reply and the token that ends it) or not (everything else). Every piece is
encoded on its own and the pieces are concatenated: a token is learned exactly when it came from a
learned piece, so no offsets into a rendered string or a token list are ever computed. Each `<image>`
becomes `image_tokens` copies of `image_token_id` (transformers' Llava convention); a model that also reads
video and sound passes `media` ({"<video>": (token id, tokens), "<audio>": ...}) and `<video>` / `<audio>`
expand the same way.

Templates:
- "plain" (LLaVA stage 1): [BOS] <image> caption EOS; the human text but its placeholders is dropped, as in
  LLaVA's `plain`.
- "vicuna_v1" (LLaVA-1.5): [BOS] system " USER: " question " ASSISTANT: " reply EOS "USER: " ...
- "chat": the tokenizer's own Jinja chat template. It is rendered with each reply replaced by a sentinel
  and the text is cut at the sentinels; the special token the template writes right after a reply (e.g.
  ChatML's `<|im_end|>`) is learned with it.

A sample that cannot be encoded (unknown role, turns out of order, too long for the context, an
`<image>`, `<video>` or `<audio>` count that does not match its media, a template that does not close a reply with a special
token) raises `ConversationError` naming the sample.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

IMAGE = "<image>"
MEDIA_KINDS = {"<image>": "image", "<video>": "video", "<audio>": "audio"}  # placeholder -> what it stands for
MEDIA_FIELDS = {"<image>": "images", "<video>": "videos", "<audio>": "audios"}  # placeholder -> a sample's list
IGNORE = -100  # label of a token that is not learned (PyTorch cross_entropy's ignore_index)
TEMPLATES = ("plain", "vicuna_v1", "chat")
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
_SENTINEL = "\x00mmlm-reply-{}\x00"


class ConversationError(ValueError):
    """A conversation that cannot be encoded; the message names the sample."""


@dataclass
class Piece:
    value: str | list[int]  # text (encoded alone) or token ids
    learn: bool = False


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where not learned, else the token id (unshifted, as transformers takes labels)
    n_images: int
    n_media: dict[str, int] | None = None  # placeholder -> how many the conversation holds (every kind read)


def _messages(turns: Sequence[dict[str, Any]], name: str, generation: bool) -> list[dict[str, str]]:
    """LLaVA turns ({from, value}) or chat messages ({role, content}) -> checked [{role, content}]."""
    out = []
    for k, t in enumerate(turns):
        role = t.get("from", t.get("role"))
        content = t.get("value", t.get("content"))
        if role not in ROLES:
            raise ConversationError(f"{name}: turn {k} has unknown role {role!r}; known: {sorted(ROLES)}")
        if not isinstance(content, str):
            raise ConversationError(f"{name}: turn {k} has no text (value/content)")
        out.append({"role": ROLES[role], "content": content})
    body = out[1:] if out and out[0]["role"] == "system" else out
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if [m["role"] for m in body] != expected[: len(body)] or any(m["role"] == "system" for m in body):
        raise ConversationError(f"{name}: turns must alternate user, assistant (after an optional system turn); "
                                f"got {[m['role'] for m in out]}")
    last = body[-1]["role"] if body else None
    if generation and last != "user":
        raise ConversationError(f"{name}: a prompt must end with a user turn")
    if not generation and last != "assistant":
        raise ConversationError(f"{name}: a training conversation must end with an assistant reply")
    for k, m in enumerate(out):
        if m["role"] == "assistant" and IMAGE in m["content"]:
            raise ConversationError(f"{name}: turn {k}: an assistant reply cannot hold {IMAGE}")
    return out


def _end_id(tokenizer: Any, name: str) -> int:
    if tokenizer.eot_id is None:
        raise ConversationError(f"{name}: the tokenizer has no end token (eot_id) to close replies with")
    return tokenizer.eot_id


def _bos(tokenizer: Any) -> list[Piece]:
    return [Piece([tokenizer.sot_id])] if tokenizer.sot_id is not None else []


def plain_pieces(msgs: list[dict[str, str]], tokenizer: Any, name: str, generation: bool) -> list[Piece]:
    if msgs[0]["role"] == "system" or len(msgs) > 2:
        raise ConversationError(f"{name}: the plain template takes one user turn (its image) and one caption")
    placeholders = re.findall("|".join(map(re.escape, MEDIA_KINDS)), msgs[0]["content"])  # the media, in order
    pieces = _bos(tokenizer) + [Piece("".join(placeholders))]
    if not generation:
        pieces += [Piece(msgs[1]["content"], learn=True), Piece([_end_id(tokenizer, name)], learn=True)]
    return pieces


def vicuna_pieces(msgs: list[dict[str, str]], tokenizer: Any, name: str, generation: bool) -> list[Piece]:
    system = VICUNA_SYSTEM
    if msgs[0]["role"] == "system":
        system, msgs = msgs[0]["content"], msgs[1:]
    pieces, text = _bos(tokenizer), system + " "
    for m in msgs:
        if m["role"] == "user":
            text += "USER: " + m["content"] + " ASSISTANT: "
        else:
            pieces += [Piece(text), Piece(m["content"], learn=True), Piece([_end_id(tokenizer, name)], learn=True)]
            text = ""
    return pieces + [Piece(text)] if text else pieces


def chat_pieces(msgs: list[dict[str, str]], tokenizer: Any, name: str, generation: bool) -> list[Piece]:
    if not getattr(tokenizer, "chat_template", None):
        raise ConversationError(f"{name}: template 'chat' needs a tokenizer with a chat template")
    replies = [m["content"] for m in msgs if m["role"] == "assistant"]
    marked = [dict(m, content=_SENTINEL.format(k)) if m["role"] == "assistant" else m
              for k, m in enumerate(msgs)]
    text = tokenizer.apply_chat_template(marked, add_generation_prompt=generation)
    parts = re.split("\x00mmlm-reply-\\d+\x00", text)
    if len(parts) != len(replies) + 1:
        raise ConversationError(f"{name}: the chat template dropped or repeated an assistant reply")
    specials = sorted((t.content for t in tokenizer.tokenizer.get_added_tokens_decoder().values() if t.special),
                      key=len, reverse=True)
    pieces = [Piece(parts[0])]
    for reply, after in zip(replies, parts[1:]):
        end = next((s for s in specials if after.startswith(s)), None)
        if end is None:
            raise ConversationError(f"{name}: the chat template does not close an assistant reply with a special "
                                    f"token (text after the reply: {after[:20]!r})")
        pieces += [Piece(reply, learn=True), Piece(end, learn=True), Piece(after.removeprefix(end))]
    return pieces


_BUILDERS = {"plain": plain_pieces, "vicuna_v1": vicuna_pieces, "chat": chat_pieces}


def _encode(turns: Sequence[dict[str, Any]], tokenizer: Any, template: str, image_token_id: int, image_tokens: int,
            max_len: int | None, n_images: int | None, name: str, generation: bool,
            media: dict[str, tuple[int, int]] | None = None, n_media: dict[str, int] | None = None) -> Encoded:
    if template not in _BUILDERS:
        raise ValueError(f"unknown conversation template {template!r}; known: {TEMPLATES}")
    expand = {IMAGE: (image_token_id, image_tokens), **(media or {})}  # placeholder -> (token id, count)
    wanted = dict(n_media or {})
    if n_images is not None:
        wanted[IMAGE] = n_images
    msgs = _messages(turns, name, generation)
    pieces = _BUILDERS[template](msgs, tokenizer, name, generation)
    # Text pieces split at each placeholder; all text encoded in one batch call, in order.
    split = re.compile("(" + "|".join(re.escape(p) for p in expand) + ")")
    parts = [split.split(p.value) if isinstance(p.value, str) else None for p in pieces]  # text, placeholder, text..
    texts = [seg for segs in parts if segs is not None for seg in segs[::2]]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    ids: list[int] = []
    labels: list[int] = []
    counts = dict.fromkeys(expand, 0)
    for p, segs in zip(pieces, parts):
        if segs is not None:
            chunk: list[int] = []
            for j, seg in enumerate(segs):
                if j % 2:  # a placeholder
                    token_id, n = expand[seg]
                    chunk += [token_id] * n
                    counts[seg] += 1
                else:
                    chunk += next(encoded)
        else:
            chunk = list(p.value)
        ids += chunk
        labels += chunk if p.learn else [IGNORE] * len(chunk)
    for placeholder, n in wanted.items():
        kind = MEDIA_KINDS.get(placeholder, placeholder)
        if placeholder not in expand:
            if n:
                raise ConversationError(f"{name}: the sample has {n} {kind}(s) but the model reads no {kind}")
        elif counts[placeholder] != n:
            raise ConversationError(f"{name}: the text holds {counts[placeholder]} {placeholder} placeholder(s) but "
                                    f"the sample has {n} {kind}(s)")
    if max_len is not None and len(ids) > max_len:
        raise ConversationError(f"{name}: {len(ids)} tokens, more than the context of {max_len}")
    if not generation and all(label == IGNORE for label in labels):
        raise ConversationError(f"{name}: no assistant token to learn")
    return Encoded(ids, labels, counts[IMAGE], counts)


def encode_conversation(turns: Sequence[dict[str, Any]], tokenizer: Any, template: str, image_token_id: int,
                        image_tokens: int, max_len: int | None = None, n_images: int | None = None,
                        name: str = "sample", media: dict[str, tuple[int, int]] | None = None,
                        n_media: dict[str, int] | None = None) -> Encoded:
    """A whole conversation (ending with a reply) -> input_ids and labels for training.

    `media`: the other placeholders the model reads -> (token id, tokens each); `n_media`: how many of each the
    sample holds (checked, like `n_images`)."""
    return _encode(turns, tokenizer, template, image_token_id, image_tokens, max_len, n_images, name, False,
                   media, n_media)


def encode_prompt(turns: Sequence[dict[str, Any]], tokenizer: Any, template: str, image_token_id: int,
                  image_tokens: int, max_len: int | None = None, n_images: int | None = None,
                  name: str = "prompt", media: dict[str, tuple[int, int]] | None = None,
                  n_media: dict[str, int] | None = None) -> list[int]:
    """A conversation ending with a user turn -> the ids generation continues (up to the reply's first token).

    The same pieces as training, so a prompt is tokenized exactly as the model saw it while learning.
    """
    return _encode(turns, tokenizer, template, image_token_id, image_tokens, max_len, n_images, name, True,
                   media, n_media).input_ids
