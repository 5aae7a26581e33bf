"""Batched text generation with a preallocated key/value cache.

One prefill pass runs the (left-padded) prompts; then each step feeds one token per sequence and attends
over the cache. A row that hits EOS or a stop string leaves the batch (its cache rows are dropped), so
finished sequences stop costing work. Sampling follows transformers' order: repetition penalty,
temperature, top-k, top-p; greedy when temperature == 0.

`DecodeBatch` decodes step by step for a server: requests join and leave a running batch between steps
(continuous batching), each answering as `generate` would for it alone.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass, field
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
             compile: bool = False, videos: torch.Tensor | None = None,
             audios: torch.Tensor | None = None) -> torch.Tensor:
    """Continue each prompt; returns the new tokens, LongTensor (B, n) with n <= max_new_tokens.

    input_ids (B, T) are left-padded when attention_mask (B, T) has zeros. A row ends at an EOS id
    (`eos_token_id`, default the model config's) or when its decoded text contains one of `stop` (needs
    `tokenizer`); the ending token is kept and the rest of the row is filled with the first EOS id (or 0).
    pixel_values (N_images, C, H, W) are a LLaVA model's images, read once by the prefill pass; videos
    (N, frames, C, H, W) and audios (N, T, F) its clips and sounds, the same way.
    Inputs may be on any device: they are moved to the model's, and the result is there too.
    `stream(row, token_id)` is called for each new token as it is chosen. `seed` makes sampling repeatable.
    `compile` runs the one-token decoding step through torch.compile (see `decode_step_fn`); its shapes then
    never change, so finished rows stay in the batch (their tokens ignored) instead of leaving it.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {tuple(input_ids.shape)}")
    media = {k: v for k, v in (("pixel_values", pixel_values), ("videos", videos), ("audios", audios)) if v is not None}
    for name in media:
        if name not in inspect.signature(model.forward).parameters:
            raise ValueError(f"{type(model).__name__} takes no images or other media ({name}); a LLaVA model does")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0 or repetition_penalty <= 0 or max_new_tokens < 0:
        raise ValueError(f"bad sampling settings: temperature={temperature} (>= 0), top_k={top_k} (>= 0), "
                         f"top_p={top_p} (0 < p <= 1), repetition_penalty={repetition_penalty} (> 0), "
                         f"max_new_tokens={max_new_tokens} (>= 0)")
    if stop and tokenizer is None:
        raise ValueError("stop strings need the tokenizer (pass tokenizer=...)")
    device = next(model.parameters()).device  # the inputs go where the weights are (cpu or cuda)
    input_ids = input_ids.to(device)
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

    media = {k: v.to(device) for k, v in media.items()}  # the prefill reads the media
    logits = model(input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                   only_last=True, **media).logits[:, -1]

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


# ----------------------------------------------------------------------------- continuous batching

def concat_media(rows: Sequence[Any]) -> dict[str, torch.Tensor]:
    """The media of several prompts (objects with pixel_values / videos / audios, None where absent), in order,
    as one forward's keyword arguments: a LLaVA splices the k-th item of a kind at that kind's k-th tokens."""
    out = {}
    for key in ("pixel_values", "videos", "audios"):
        parts = [getattr(r, key) for r in rows if getattr(r, key, None) is not None]
        if parts:
            out[key] = torch.cat(parts)
    return out


@dataclass(eq=False)
class DecodeRow:
    """One sequence of a `DecodeBatch`: its prompt, limits and sampling settings, and the tokens chosen so far.

    `tokens` ends with the EOS id when the row stopped at one (as `generate`'s rows do); `finish` is "stop" (EOS)
    or "length" (`max_new_tokens`) once the batch ended the row, None while it runs or when the caller made it
    leave. `start` (the first cache column of its block) and `position` (of its next token) belong to the batch,
    and so do a Flamingo connector's `media_kv` / `media_mask`: the row's media keys and values for each
    cross-attention block (1, H, S, hd) and which of them its generated tokens see (1, 1, S), left by its prefill.
    """

    input_ids: list[int]
    max_new_tokens: int
    pixel_values: torch.Tensor | None = None  # (N_images, C, H, W): a LLaVA's images for this prompt
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    videos: torch.Tensor | None = None  # (N_videos, frames, C, H, W) and
    audios: torch.Tensor | None = None  # (N_sounds, T, F): a LLaVA's other media for this prompt
    tokens: list[int] = field(default_factory=list)
    finish: str | None = None
    start: int = 0
    position: int = 0
    generator: torch.Generator | None = None
    media_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    media_mask: torch.Tensor | None = None


class DecodeBatch:
    """Continuous batching (iteration-level scheduling, as vLLM's): rows join and leave between decoding steps.

    One key/value pool holds every running row: per layer (max_rows, Hkv, L, hd), running rows in pool rows
    0..n-1. All rows write their next token's keys/values to one shared column `col`, each row's earlier tokens
    lying in the columns just before it, and `key_mask` (max_rows, L) marks each row's real tokens, so a decoding
    step is `decode_step` over the window of columns the running rows use, whatever their lengths:

        pool row 0   . . [p p p p t t t]              row 0: prompt p, generated t; . never attended
        pool row 1   . . . . . [p p p t]              row 1 joined 3 steps later
        pool row 2   . . . . [0 p p p p]  <- col      row 2 joins now: its left-padded prefill lands before col

    `join` prefills newcomers together (left-padded, their images read once) straight into free pool rows,
    right-aligned to `col`, and gives each its first token; `step` gives every running row its next token. A row
    ends at an EOS id or `max_new_tokens`, or when the caller makes it `leave` (a stop string, a client gone);
    its pool row is refilled by the last running row. The pool grows (and shifts the window back to column 0)
    only when a newcomer needs more columns, up to `max_len` (default twice the model's context: the longest
    window, one row's whole context behind `col` and another's ahead). Greedy rows choose exactly what
    `generate` chooses for them alone (tests/test_continuous_batching.py); a seeded row samples from its own
    generator, as `generate(seed=)` alone does. Not compiled: shapes change at every step.

    A Flamingo connector's media stay beside the pool, per row: each row keeps the keys and values its prefill
    computed, and a step reads the running rows' media stacked (padded to the most latents any row has, the
    padding never seen), restacked only when rows join or leave.
    """

    def __init__(self, model: nn.Module, max_rows: int = 8, eos_token_id: int | Sequence[int] | None = None,
                 max_len: int | None = None):
        if eos_token_id is None:
            eos_token_id = getattr(model.config, "eos_token_id", None)
        self.model, self.max_rows = model, max_rows
        self.eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or [])
        self.max_len = max_len or 2 * model.max_seq_len
        self.device = next(model.parameters()).device
        self.rows: list[DecodeRow] = []  # running rows, pool row i = rows[i]
        self.col = 0  # the column every running row writes its next token's keys/values to
        self.cache = model.new_cache(max_rows, 0)  # the pool, grown on demand
        self.key_mask = torch.zeros(max_rows, 0, dtype=torch.bool, device=self.device)
        self.step_fn = decode_step_fn(model)
        self.flamingo = getattr(model, "flamingo", None) is not None
        self._media: tuple[list | None, torch.Tensor | None] | None = None  # the running rows' stacked media

    def _plan(self, newcomers: Sequence[DecodeRow]) -> tuple[int, int] | None:
        """(col, pool length) that lets `newcomers` join now, or None when they cannot (rows or columns)."""
        if len(self.rows) + len(newcomers) > self.max_rows:
            return None
        T = max(len(r.input_ids) for r in newcomers)
        # columns still to be written: a running row one per token it may still choose, a newcomer one fewer
        ahead = max([r.max_new_tokens - len(r.tokens) for r in self.rows] + [r.max_new_tokens - 1 for r in newcomers])
        length = self.key_mask.shape[1]
        if self.col >= T and self.col + ahead <= length:
            return self.col, length  # it fits where things are
        behind = self.col - min((r.start for r in self.rows), default=self.col)  # columns the running rows use
        col = max(behind, T)  # shift the window back to column 0, or forward to make room for the prompts
        if col + ahead > self.max_len:
            return None
        return col, max(col + ahead, min(2 * length, self.max_len))

    def can_join(self, newcomers: Sequence[DecodeRow]) -> bool:
        """Whether `newcomers` can join together now (free pool rows, and columns within `max_len`)."""
        return self._plan(newcomers) is not None

    def _arrange(self, col: int, length: int) -> None:
        """Move the running rows' columns so that `col` becomes the write column, in a pool `length` columns long."""
        n, shift = len(self.rows), col - self.col
        lo = min((r.start for r in self.rows), default=self.col)
        old_k, old_v, old_mask = self.cache.k, self.cache.v, self.key_mask
        self.cache = self.model.new_cache(self.max_rows, length)  # zeros: masked slots stay finite
        self.key_mask = torch.zeros(self.max_rows, length, dtype=torch.bool, device=self.device)
        if n:
            for new, old in zip(self.cache.k + self.cache.v, old_k + old_v):
                new[:n, :, lo + shift:col] = old[:n, :, lo:self.col]
            self.key_mask[:n, lo + shift:col] = old_mask[:n, lo:self.col]
        for r in self.rows:
            r.start += shift
        self.col = col

    @torch.inference_mode()
    def join(self, newcomers: Sequence[DecodeRow]) -> list[DecodeRow]:
        """Prefill `newcomers` together and give each its first token; returns them (some may have ended already).

        Raises ValueError when they cannot join now (see `can_join`); nothing changes if the prefill fails."""
        newcomers = list(newcomers)
        plan = self._plan(newcomers) if newcomers else None
        if plan is None:
            raise ValueError(f"{len(newcomers)} rows cannot join a batch of {len(self.rows)}/{self.max_rows} rows "
                             f"(pool columns: {self.key_mask.shape[1]} of at most {self.max_len})")
        if plan != (self.col, self.key_mask.shape[1]):
            self._arrange(*plan)
        n, k, col = len(self.rows), len(newcomers), self.col
        T = max(len(r.input_ids) for r in newcomers)
        ids = torch.zeros(k, T, dtype=torch.long)
        mask = torch.zeros(k, T, dtype=torch.long)
        for j, r in enumerate(newcomers):
            ids[j, T - len(r.input_ids):] = torch.tensor(r.input_ids)
            mask[j, T - len(r.input_ids):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        extra = {k: v.to(self.device) for k, v in concat_media(newcomers).items()}
        # the prefill writes straight into the newcomers' pool rows, columns col - T .. col - 1
        block = type(self.cache)([t[n:n + k, :, col - T:col] for t in self.cache.k],
                                 [t[n:n + k, :, col - T:col] for t in self.cache.v])
        logits = self.model(ids, attention_mask=mask, position_ids=position_ids_from_mask(mask), cache=block,
                            only_last=True, **extra).logits[:, -1]  # (k, V)
        self.key_mask[n:n + k] = False
        self.key_mask[n:n + k, col - T:col] = mask.bool()
        for j, r in enumerate(newcomers):
            r.start, r.position, r.tokens, r.finish = col - T, len(r.input_ids), [], None
            if block.media_kv is not None:  # Flamingo: the row's own media keys/values, (1, H, S, hd) per block
                r.media_kv = [(kb[j:j + 1], vb[j:j + 1]) for kb, vb in block.media_kv]
                r.media_mask = block.media_mask[j:j + 1]  # (1, 1, S)
            r.generator = torch.Generator(self.device).manual_seed(r.seed) if r.seed is not None else None
        self.rows += newcomers
        self._media = None
        self._choose(logits, newcomers)
        return newcomers

    @torch.inference_mode()
    def step(self) -> list[DecodeRow]:
        """One decoding step: every running row gets its next token (rows that end leave); returns those rows."""
        rows, n = list(self.rows), len(self.rows)
        if not n:
            return []
        lo = min(r.start for r in rows)  # attention reads the window lo..col only
        token = torch.tensor([[r.tokens[-1]] for r in rows], device=self.device)  # (n, 1)
        position = torch.tensor([[r.position] for r in rows], device=self.device)  # (n, 1)
        self.key_mask[:n, self.col] = True
        window = type(self.cache)([t[:n, :, lo:] for t in self.cache.k], [t[:n, :, lo:] for t in self.cache.v])
        if self.flamingo:
            window.media_kv, window.media_mask = self._stacked_media(rows)
        logits = self.step_fn(self.model, token, position, self.key_mask[:n, lo:], window, self.col - lo)  # (n, V)
        self.col += 1
        for r in rows:
            r.position += 1
        self._choose(logits, rows)
        return rows

    def _stacked_media(self, rows: list[DecodeRow]) -> tuple[list | None, torch.Tensor | None]:
        """Flamingo: the running rows' media keys/values per cross-attention block (n, H, S, hd) and their mask
        (n, 1, S), S the most any row has (the rest zeros, masked); (None, None) when no row has media."""
        if self._media is None:  # rows joined or left since the last step
            with_media = [(i, r) for i, r in enumerate(rows) if r.media_kv is not None]
            if not with_media:
                self._media = (None, None)
            else:
                S = max(r.media_mask.shape[-1] for _, r in with_media)
                _, H, _, hd = with_media[0][1].media_kv[0][0].shape
                blocks = [(kv[0].new_zeros(len(rows), H, S, hd), kv[1].new_zeros(len(rows), H, S, hd))
                          for kv in with_media[0][1].media_kv]
                mask = torch.zeros(len(rows), 1, S, dtype=torch.bool, device=self.device)
                for i, r in with_media:
                    s = r.media_mask.shape[-1]
                    mask[i, :, :s] = r.media_mask[0]
                    for (k, v), (rk, rv) in zip(blocks, r.media_kv):
                        k[i, :, :s], v[i, :, :s] = rk[0], rv[0]
                self._media = (blocks, mask)
        return self._media

    def _choose(self, logits: torch.Tensor, rows: list[DecodeRow]) -> None:
        """Each row's next token from its logits (greedy rows in one go, sampled rows each with its settings);
        rows that reach an EOS id or their token limit leave."""
        greedy = [j for j, r in enumerate(rows) if r.temperature == 0]
        chosen: list[int] = [0] * len(rows)
        if greedy:
            picks = sample_next(logits if len(greedy) == len(rows) else logits[greedy])
            for j, t in zip(greedy, picks.tolist()):
                chosen[j] = t
        for j, r in enumerate(rows):
            if r.temperature != 0:
                chosen[j] = int(sample_next(logits[j:j + 1], r.temperature, r.top_k, r.top_p, r.generator))
        ended = []
        for r, t in zip(rows, chosen):
            r.tokens.append(t)
            if t in self.eos:
                r.finish = "stop"
            elif len(r.tokens) >= r.max_new_tokens:
                r.finish = "length"
            if r.finish:
                ended.append(r)
        self.leave(ended)

    @torch.inference_mode()
    def leave(self, rows: Sequence[DecodeRow]) -> None:
        """Rows leave the batch now (the caller's reasons: a stop string, a cancelled request); each freed pool row
        is refilled by the last running row."""
        gone = {id(r) for r in rows}
        self._media = None
        for i in sorted((i for i, r in enumerate(self.rows) if id(r) in gone), reverse=True):
            last = len(self.rows) - 1
            if i != last:
                for t in self.cache.k + self.cache.v:
                    t[i] = t[last]
                self.key_mask[i] = self.key_mask[last]
                self.rows[i] = self.rows[last]
            self.rows.pop()
        if not self.rows:
            self.col = 0
