"""`mmlm chat`: talk to a language model, one-shot (`prompt`) or interactively, streaming the reply."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, TextIO

import torch


class TextStream:
    """Turns token ids arriving one by one into printable text (a character may span several tokens)."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            self.out.write(text[self.printed :])
            self.out.flush()
            self.printed = len(text)


def reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0,
          top_p: float = 1.0, seed: int | None = None, out: TextIO | None = None) -> str:
    """The assistant's answer to `messages` (rendered with the tokenizer's chat template); streamed to `out`."""
    from .generation import generate

    ids = torch.tensor([tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))])
    eos = set(model.config.eos_token_id or []) | ({tokenizer.eot_id} if tokenizer.eot_id is not None else set())
    max_new = min(max_new_tokens, model.max_seq_len - ids.shape[1])
    if max_new <= 0:
        raise ValueError(f"the conversation ({ids.shape[1]} tokens) fills the model's context of {model.max_seq_len}")
    stream = TextStream(tokenizer, out) if out is not None else None
    new = generate(model, ids, max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=seed,
                   eos_token_id=sorted(eos), stream=stream)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()


def chat(model_path: str | Path, prompt: str | None = None, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, out: TextIO = sys.stdout,
         read: Callable[[str], str] = input) -> list[dict[str, str]]:
    """Answer `prompt` and return, or (prompt None) loop reading user turns until EOF / "exit".

    The model and its tokenizer come from the same path: a .gguf file, or a directory with tokenizer.json.
    Returns the conversation.
    """
    from .checkpoint import load
    from .tokenizer import load_tokenizer

    model, tokenizer = load(model_path), load_tokenizer(model_path)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"{model_path}: the tokenizer has no chat template, so it cannot chat")
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    turns = [prompt] if prompt is not None else None
    while True:
        if turns is not None:
            if not turns:
                return messages
            text = turns.pop()
        else:
            try:
                text = read("> ")
            except EOFError:
                out.write("\n")
                return messages
            if text.strip() in ("exit", "quit"):
                return messages
            if not text.strip():
                continue
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature, top_p, seed, out)
        out.write("\n")
        messages.append({"role": "assistant", "content": answer})
