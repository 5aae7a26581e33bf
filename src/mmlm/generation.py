"""Batched text generation with a preallocated key/value cache.

One prefill pass runs the (left-padded) prompts; then each step feeds one token per sequence and attends
over the cache. A row that hits EOS or a stop string leaves the batch (its cache rows are dropped), so
finished sequences stop costing work. Sampling follows transformers' order: repetition penalty,
temperature, top-k, top-p; greedy when temperature == 0.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .models.lm import position_ids_from_mask


def _check_left_padded(mask: torch.Tensor) -> None:
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise ValueError("generate needs left-padded prompts: each attention_mask row must be 0...0 1...1")
    if not bool(mask[:, -1].all()):
        raise ValueError("every prompt needs at least one real token (an attention_mask row is all zeros)")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty (as transformers): seen tokens' positive logits / penalty, negative ones * penalty."""
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids: argmax when temperature == 0, else a sample from the filtered softmax."""
    if temperature == 0:  # max's indices: argmax's choice (the first maximum; NaN wins) at ~2.7x argmax's speed here
        return logits.max(dim=-1).indices
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # tokens after the nucleus (the first is always kept)
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)


_COMPILED: dict[type, Callable] = {}  # model class -> its torch.compile'd decode_step (None: compiling failed)


def decode_step_fn(model: nn.Module, compile: bool = False) -> Callable:
    """`model.decode_step` as a function of (model, input_ids, position_ids, key_mask, cache, slot); with `compile`,
    torch.compile'd once per model class (dynamo re-specialises per config and batch size). Compiling needs a
    C++ compiler and takes seconds to minutes per batch size (measured here: 4-10 s for a tiny Llama with a warm
    compiler cache, up to 112 s on a busy machine without); when it fails, a warning says why and the eager
    step runs."""
    eager = type(model).decode_step
    if not compile:
        return eager
    cls = type(model)
    if cls not in _COMPILED:
        _COMPILED[cls] = torch.compile(eager, dynamic=False)
    compiled = _COMPILED[cls]
    if compiled is None:
        return eager

    def step(*args):
        try:
            return compiled(*args)
        except Exception as e:  # no compiler, an unsupported op, ...: the same maths, eagerly
            warnings.warn(f"torch.compile of {cls.__name__}.decode_step failed, decoding eagerly: "
                          f"{type(e).__name__}: {str(e)[:300]}", stacklevel=3)
            _COMPILED[cls] = None
            return eager(*args)

    return step


@torch.inference_mode()
def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             pixel_values: torch.Tensor | None = None, max_new_tokens: int = 32, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, stop: Sequence[str] | None = None,
             tokenizer: Any = None, stream: Callable[[int, int], None] | None = None,
             compile: bool = False) -> torch.Tensor:
    """Continue each prompt; returns the new tokens, LongTensor (B, n) with n <= max_new_tokens.

    input_ids (B, T) are left-padded when attention_mask (B, T) has zeros. A row ends at an EOS id
    (`eos_token_id`, default the model config's) or when its decoded text contains one of `stop` (needs
    `tokenizer`); the ending token is kept and the rest of the row is filled with the first EOS id (or 0).
    pixel_values (N_images, C, H, W) are a LLaVA model's images, read once by the prefill pass.
    `stream(row, token_id)` is called for each new token as it is chosen. `seed` makes sampling repeatable.
    `compile` runs the one-token decoding step through torch.compile (see `decode_step_fn`); its shapes then
    never change, so finished rows stay in the batch (their tokens ignored) instead of leaving it.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    if pixel_values is not None and "pixel_values" not in inspect.signature(model.forward).parameters:
        raise ValueError(f"{type(model).__name__} takes no images (pixel_values); a LLaVA model does")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0 or max_new_tokens < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (0 < p <= 1), repetition_penalty={repetition_penalty} (> 0), "
                         f"max_new_tokens={max_new_tokens} (>= 0)")
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer (pass tokenizer=...)")
    device = input_ids.device
    B, T = input_ids.shape
    total = T + max_new_tokens
    if total > model.max_seq_len:
        raise ValueError(f"the prompt ({T} tokens) plus max_new_tokens ({max_new_tokens}) is {total} tokens, more than "
                         f"the model's context of {model.max_seq_len}: shorten the prompt or ask for fewer tokens")
    if eos_token_id is None:
        eos_token_id = getattr(model.config, "eos_token_id", None)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or []),
                       dtype=torch.long, device=device)
    fill = int(eos[0]) if len(eos) else 0
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device=device, dtype=torch.long)
    _check_left_padded(mask)
    generator = torch.Generator(device).manual_seed(seed) if seed is not None else None

    out = torch.full((B, max_new_tokens), fill, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return out
    positions = position_ids_from_mask(mask)
    seen = None
    if repetition_penalty != 1.0:
        vocab = model.config.vocab_size
        # Padding and ids outside the vocabulary (a LLaVA image token such as -200) mark a spare last column,
        # never a real token: writing False for them could clear a real token's mark.
        counted = mask.bool() & (input_ids >= 0) & (input_ids < vocab)
        seen = torch.zeros(B, vocab + 1, dtype=torch.bool, device=device)
        seen.scatter_(1, input_ids.masked_fill(~counted, vocab), True)
        seen = seen[:, :vocab]
    cache = model.new_cache(B, total)
    texts = [""] * B

    images = {} if pixel_values is None else {"pixel_values": pixel_values.to(device)}  # the prefill reads the images
    logits = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                   only_last=True, **images).logits[:, -1]

    # Everything the decoding steps need, allocated once: which cache slots hold real tokens (B, total), the
    # slot the next token goes to, its position. Per step: one token chosen, one mask column set, one step.
    key_mask = torch.zeros(B, total, dtype=torch.bool, device=device)
    key_mask[:, :T] = mask.bool()
    slot = torch.tensor([T], device=device) if compile else T  # a tensor: static shapes for the compiled step
    next_pos = positions[:, -1:] + 1  # (b, 1)
    step_fn = decode_step_fn(model, compile)
    rows = None  # original row of each batch row, once rows have left (None: all still there, in order)
    finished = torch.zeros(B, dtype=torch.bool, device=device)  # with compile: rows done but kept
    ends = len(eos) > 0 or bool(stop)
    steps = 0
    for step in range(max_new_tokens):
        if seen is not None:
            logits = apply_repetition_penalty(logits, seen, repetition_penalty)
        token = sample_next(logits, temperature, top_k, top_p, generator)  # (b,)
        if compile and ends:
            token = token.masked_fill(finished, fill)
        if rows is None:
            out[:, step] = token
        else:
            out[rows, step] = token
        steps = step + 1
        row_ids = range(B) if rows is None else rows.tolist()
        if stream is not None:
            for row, t, gone in zip(row_ids, token.tolist(), finished.tolist()):
                if not gone:
                    stream(row, t)
        if ends:
            done = torch.isin(token, eos) if len(eos) else torch.zeros_like(token, dtype=torch.bool)
            if stop:
                for j, row in enumerate(row_ids):
                    texts[row] = tokenizer.decode(out[row, :steps].tolist())
                    if any(s in texts[row] for s in stop):
                        done[j] = True
            if compile:
                finished |= done
                if bool(finished.all()):
                    break
            elif bool(done.any()):  # finished rows leave the batch and stop costing work
                keep = (~done).nonzero().squeeze(1)
                if len(keep) == 0:
                    break
                rows = keep if rows is None else rows[keep]
                token, next_pos, key_mask, finished = token[keep], next_pos[keep], key_mask[keep], finished[keep]
                cache.keep(keep)
                if seen is not None:
                    seen = seen[keep]
        if step == max_new_tokens - 1:
            break
        if seen is not None:
            seen[torch.arange(len(token), device=device), token] = True
        key_mask[:, T + step] = True
        logits = step_fn(model, token[:, None], next_pos, key_mask, cache, slot)
        slot += 1
        next_pos = next_pos + 1
    cache.pos = T + steps - 1
    return out[:, :steps]
