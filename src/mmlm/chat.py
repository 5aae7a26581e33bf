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


def prompt_ids(model, tokenizer, messages: list[dict[str, str]], template: str = "chat",
               n_images: int | None = None, n_media: dict[str, int] | None = None) -> list[int]:
    """The ids generation continues from: a LLaVA's messages in its conversation `template` (images expanded to
    image tokens, exactly as in training), an LM's through the tokenizer's chat template."""
    if hasattr(model.config, "image_token_id"):
        from .data.conversation import encode_prompt

        mc = model.config
        return encode_prompt(messages, tokenizer, template, mc.image_token_id, mc.image_tokens, n_images=n_images,
                             name="messages", media=mc.placeholders(), n_media=n_media)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("this model's tokenizer has no chat template, so it cannot chat")
    return tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))


def end_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a reply: the model config's EOS ids and the tokenizer's end token."""
    eos = model.config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    return sorted(eos | ({tokenizer.eot_id} if tokenizer.eot_id is not None else set()))


def reply(model, tokenizer, messages: list[dict[str, str]], max_new_tokens: int = 256, temperature: float = 0.0,
          top_p: float = 1.0, seed: int | None = None, out: TextIO | None = None,
          pixel_values: torch.Tensor | None = None, template: str = "chat", compile: bool = False,
          videos: torch.Tensor | None = None, audios: torch.Tensor | None = None) -> str:
    """The assistant's answer to `messages` (rendered with the tokenizer's chat template); streamed to `out`.

    A LLaVA model takes `pixel_values` (one image per `<image>` in the messages; `videos` and `audios` likewise
    per `<video>` and `<audio>`, for a model that reads them) and encodes the messages
    with its conversation `template` ("plain", "vicuna_v1" or "chat"), exactly as it was trained. `compile` runs
    the decoding step torch.compile'd (`generation.generate`).
    """
    from .generation import generate

    ids = torch.tensor([prompt_ids(model, tokenizer, messages, template)], device=next(model.parameters()).device)
    max_new = min(max_new_tokens, model.max_seq_len - ids.shape[1])
    if max_new <= 0:
        raise ValueError(f"the conversation ({ids.shape[1]} tokens) fills the model's context of {model.max_seq_len}")
    stream = TextStream(tokenizer, out) if out is not None else None
    new = generate(model, ids, max_new_tokens=max_new, temperature=temperature, top_p=top_p, seed=seed,
                   eos_token_id=end_token_ids(model, tokenizer), stream=stream, pixel_values=pixel_values,
                   compile=compile, videos=videos, audios=audios)
    return tokenizer.decode(new[0].tolist(), skip_special_tokens=True).strip()


def chat(model_path: str | Path, prompt: str | None = None, system: str | None = None, max_new_tokens: int = 256,
         temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, out: TextIO | None = None,
         read: Callable[[str], str] = input, image: str | Path | None = None,
         template: str | None = None, weights: str | None = "auto", dtype: str | torch.dtype | None = None,
         device: str | torch.device | None = None, compile: bool = False, video: str | Path | None = None,
         audio: str | Path | None = None) -> list[dict[str, str]]:
    """Answer `prompt` and return, or (prompt None) loop reading user turns until EOF / "exit".

    The model and its tokenizer come from the same path: a .gguf file, or a directory with tokenizer.json.
    With a LLaVA model, `image` (and `video`, `audio` files, for a model that reads them) is placed before the
    first user turn and `template` (default "vicuna_v1")
    is the conversation template it was trained with. `weights` "int8" / "int4" quantizes the LM for faster
    decoding (mmlm.quantize); "auto" (the default) runs a 4-bit or 8-bit GGUF at its own precision on the CPU
    (`formats.stored_weights`) and everything else as loaded; None or "none" keeps the loaded weights. `dtype` ("bf16", torch.float16, ...; default float32) and `device` ("cuda", "auto";
    default cpu) are where the weights are loaded (`mmlm.load`). Returns the conversation.
    """
    from .formats import load_for_generation, load_preprocess, load_tokenizer

    out = out if out is not None else sys.stdout  # looked up per call: a default bound at import goes stale

    model, tokenizer = load_for_generation(model_path, weights, dtype, device), load_tokenizer(model_path)
    llava = hasattr(model.config, "image_token_id")
    media: dict[str, torch.Tensor] = {}
    head = ""  # the placeholders the first user turn starts with, as in LLaVA's training conversations
    if image is not None or video is not None or audio is not None:
        if not llava:
            raise ValueError(f"{model_path}: a {type(model).__name__} takes no images, videos or sounds; chat about "
                             "them with a LLaVA model")
        from .data.media import MediaProcessor, read_audio, read_video
        from .data.transforms import PreprocessConfig

        mc = model.config
        preprocess = load_preprocess(model_path) or PreprocessConfig(image_size=mc.vision.image_size, mode="pad_square")
        processor = MediaProcessor.for_model(mc, preprocess)
        for path, kind, tower in ((video, "video", mc.video), (audio, "audio", mc.audio)):
            if path is not None and tower is None:
                raise ValueError(f"{model_path}: this LLaVA reads no {kind} (it has no {kind} tower)")
        media = processor(images=[processor.images.load(image)] if image is not None else [],
                          videos=[read_video(video, frames=mc.video_frames)] if video is not None else [],
                          audios=[read_audio(audio, processor.features.sampling_rate)] if audio is not None else [])
        head = "".join(p + "\n" for p, f in (("<image>", image), ("<video>", video), ("<audio>", audio)) if f is not None)
    template = template or (getattr(model.config, "template", "vicuna_v1") if llava else "chat")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
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
        if head and not any(m["role"] == "user" for m in messages):
            text = head + text  # the media come first, as in LLaVA's training conversations
        messages.append({"role": "user", "content": text})
        answer = reply(model, tokenizer, messages, max_new_tokens, temperature, top_p, seed, out, template=template,
                       compile=compile, **media)
        out.write("\n")
        messages.append({"role": "assistant", "content": answer})
