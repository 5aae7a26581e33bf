"""The model thread: one background thread runs all model work, in batches, off the event loop.

Requests become jobs in one bounded queue (full -> `QueueFull`, which the app answers with 429). The
thread takes the oldest job plus every queued job it can run in the same batch (same batch key), up to
`max_batch` rows, and runs them together: generation jobs as one left-padded `generate` call, embedding
jobs as one `encode_text` and one `encode_image` call. Jobs that arrive while a batch runs wait for the
next one (batching at admission: `generate` takes its rows at the start).

Results travel back to the event loop through each job's asyncio queue (`call_soon_threadsafe`), so the
loop never waits on torch. A job whose client left or whose deadline passed is skipped, and a batch whose
rows are all finished or abandoned stops generating at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import deque
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from ..chat import end_token_ids
from ..generation import generate

log = logging.getLogger("mmlm.serve")


class QueueFull(Exception):
    """The job queue is at its bound; the client should retry later."""


class Job:
    """One request's model work; `events` (on the event loop) receives ("delta", text), ("done", result)
    or ("error", exception)."""

    size = 1  # rows this job adds to a batch

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.events: asyncio.Queue | None = None
        self.deadline = float("inf")
        self.cancelled = threading.Event()
        self.on_leave: Callable[[], None] | None = None  # the app's count of waiting requests (admission.py)

    def bind(self, loop: asyncio.AbstractEventLoop, timeout_s: float) -> None:
        self.loop, self.events = loop, asyncio.Queue()
        self.deadline = time.monotonic() + timeout_s

    def batch_key(self) -> Any:
        raise NotImplementedError

    def fits(self, batch: list[Job]) -> bool:
        """Whether this job can join `batch` (same batch key already checked)."""
        return True

    def emit(self, kind: str, value: Any) -> None:
        if self.loop is not None and not self.cancelled.is_set():
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
            except RuntimeError:  # the loop has closed (server shutting down)
                self.cancelled.set()

    def leave_queue(self) -> None:
        """The job stops counting as waiting: the model thread took it, dropped it, or it was cancelled."""
        leave, self.on_leave = self.on_leave, None
        if leave is not None:
            leave()

    def cancel(self) -> None:
        self.cancelled.set()
        self.leave_queue()  # an abandoned request leaves the count now, not when the model thread reaches it

    def expired(self) -> bool:
        return self.cancelled.is_set() or time.monotonic() > self.deadline


class Worker:
    """A bounded queue of jobs and the one thread that runs them in batches with `run_batch(jobs)`."""

    def __init__(self, run_batch: Callable[[list[Job]], None], max_queue: int = 64, max_batch: int = 8):
        self.run_batch, self.max_queue, self.max_batch = run_batch, max_queue, max_batch
        self._jobs: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0  # batches run so far, and the rows in them (for /health and tests)
        self.rows = 0
        self._thread = threading.Thread(target=self._loop, name="mmlm-model", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Jobs waiting that still want an answer (cancelled and expired ones are not counted)."""
        return sum(not job.expired() for job in list(self._jobs))

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueFull("the server is shutting down")
            for gone in [j for j in self._jobs if j.expired()]:  # abandoned jobs hold no place in the queue
                self._jobs.remove(gone)
                gone.leave_queue()
            if len(self._jobs) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting)")
            self._jobs.append(job)
            self._cond.notify()

    def _take(self) -> list[Job] | None:
        with self._cond:
            while True:
                while self._jobs and self._jobs[0].expired():
                    self._jobs.popleft().leave_queue()
                if self._jobs:
                    break
                if self._closed:
                    return None
                self._cond.wait()
            first = self._jobs.popleft()
            batch, rows, key = [first], first.size, first.batch_key()
            for job in list(self._jobs):
                if rows >= self.max_batch:
                    break
                if (job.batch_key() == key and rows + job.size <= self.max_batch and not job.expired()
                        and job.fits(batch)):
                    self._jobs.remove(job)
                    batch.append(job)
                    rows += job.size
            for job in batch:
                job.leave_queue()
            return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            self.batches += 1
            self.rows += sum(j.size for j in batch)
            try:
                self.run_batch(batch)
            except Exception as e:  # reported to each client as an error; the thread lives on
                log.exception("model batch failed")
                for job in batch:
                    job.emit("error", e)

    def close(self, timeout_s: float = 5.0) -> None:
        with self._cond:
            self._closed = True
            for job in self._jobs:
                job.cancel()
            self._jobs.clear()
            self._cond.notify_all()
        self._thread.join(timeout_s)


# ----------------------------------------------------------------------------- generation

_unique = itertools.count()


class GenerationJob(Job):
    def __init__(self, ids: list[int], pixel_values: torch.Tensor | None, max_tokens: int, temperature: float,
                 top_p: float, seed: int | None, stop: Sequence[str], context: int):
        super().__init__()
        self.ids, self.pixel_values, self.max_tokens, self.context = ids, pixel_values, max_tokens, context
        self.temperature, self.top_p, self.seed, self.stop = temperature, top_p, seed, tuple(stop)

    def batch_key(self) -> Any:
        # Rows share one sampler: same settings. A seeded request runs alone, so its seed alone decides it.
        seed = None if self.seed is None else ("alone", id(self))
        return ("generate", self.temperature, self.top_p if self.temperature > 0 else 1.0, self.stop, seed)

    def fits(self, batch: list[Job]) -> bool:
        # Left padding to the longest prompt must leave room for the most new tokens any row asks for.
        rows = [*batch, self]
        return max(len(j.ids) for j in rows) + max(j.max_tokens for j in rows) <= self.context


class _AllRowsDone(Exception):
    pass


class _Row:
    """One job's answer as it is generated: text deltas (holding back what may begin a stop string),
    the finish reason, token counts."""

    def __init__(self, job: GenerationJob, tokenizer: Any, eos: set[int]):
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.ids: list[int] = []
        self.tokens = 0
        self.emitted = 0
        self.text = ""
        self.finished = job.expired()
        self.holdback = max((len(s) for s in job.stop), default=1) - 1

    def push(self, token: int) -> None:
        if self.finished:
            return
        if self.job.expired():
            self.finished = True
            return
        self.tokens += 1
        if token in self.eos:
            return self.finish("stop")
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd") and self.tokens < self.job.max_tokens:
            return  # the rest of a multi-byte character is still to come
        self.text = text
        hits = [i for i in (text.find(s) for s in self.job.stop) if i >= 0]
        if hits:
            self.text = text[: min(hits)]
            return self.finish("stop")
        if self.tokens >= self.job.max_tokens:
            return self.finish("length")
        self._send(len(text) - self.holdback)

    def _send(self, upto: int) -> None:
        if upto > self.emitted:
            self.job.emit("delta", self.text[self.emitted:upto])
            self.emitted = upto

    def finish(self, reason: str) -> None:
        self._send(len(self.text))
        self.finished = True
        self.job.emit("done", {"finish_reason": reason, "text": self.text, "prompt_tokens": len(self.job.ids),
                               "completion_tokens": self.tokens})


def run_generation(model: Any, tokenizer: Any, jobs: list[GenerationJob]) -> None:
    """One `generate` call for the batch: prompts left-padded, each row's images in row order."""
    jobs = [j for j in jobs if not j.expired()]
    if not jobs:
        return
    eos = end_token_ids(model, tokenizer)
    T = max(len(j.ids) for j in jobs)
    ids = torch.full((len(jobs), T), tokenizer.pad_id or 0, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, j in enumerate(jobs):
        ids[r, T - len(j.ids):] = torch.tensor(j.ids)
        mask[r, T - len(j.ids):] = 1
    images = [j.pixel_values for j in jobs if j.pixel_values is not None]
    pixel_values = torch.cat(images) if images else None
    rows = [_Row(j, tokenizer, set(eos)) for j in jobs]

    def stream(row: int, token: int) -> None:
        rows[row].push(token)
        if all(r.finished for r in rows):
            raise _AllRowsDone  # every answer is complete or abandoned: stop generating now

    first = jobs[0]
    max_new = min(max(j.max_tokens for j in jobs), model.max_seq_len - T)
    try:
        generate(model, ids, mask, pixel_values=pixel_values, max_new_tokens=max_new, temperature=first.temperature,
                 top_p=first.top_p, seed=first.seed, eos_token_id=eos, stop=list(first.stop) or None,
                 tokenizer=tokenizer if first.stop else None, stream=stream)
    except _AllRowsDone:
        pass
    for r in rows:
        if not r.finished:
            r.finish("length")


# ----------------------------------------------------------------------------- embeddings

class EmbeddingJob(Job):
    """Texts and images to embed; `finish(text_embeds, image_embeds)` (normalised) makes the result,
    on the model thread."""

    def __init__(self, texts: list[str], pixel_values: torch.Tensor | None,
                 finish: Callable[[torch.Tensor, torch.Tensor], Any] | None = None):
        super().__init__()
        self.texts, self.pixel_values = texts, pixel_values
        self.finish = finish or (lambda t, i: (t, i))
        self.size = len(texts) + (0 if pixel_values is None else len(pixel_values))

    def batch_key(self) -> Any:
        return "embed"


@torch.inference_mode()
def run_embeddings(model: Any, tokenizer: Any, jobs: list[EmbeddingJob]) -> None:
    """All texts of the batch in one `encode_text`, all images in one `encode_image`; L2-normalised."""
    jobs = [j for j in jobs if not j.expired()]
    texts = [t for j in jobs for t in j.texts]
    images = [j.pixel_values for j in jobs if j.pixel_values is not None]
    dim = model.config.embed_dim
    text_embeds = torch.empty(0, dim)
    if texts:
        ids = tokenizer(texts, context_length=model.config.text.context_length, truncate=False)
        text_embeds = F.normalize(model.encode_text(ids).float(), dim=-1)
    image_embeds = F.normalize(model.encode_image(torch.cat(images)).float(), dim=-1) if images else torch.empty(0, dim)
    t = i = 0
    for j in jobs:
        n_img = 0 if j.pixel_values is None else len(j.pixel_values)
        j.emit("done", j.finish(text_embeds[t:t + len(j.texts)], image_embeds[i:i + n_img]))
        t, i = t + len(j.texts), i + n_img
