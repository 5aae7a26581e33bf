"""The model thread: one background thread runs all model work, in batches, off the event loop.

Requests become jobs in one bounded queue (full -> `QueueFull`, which the app answers with 429). The
thread takes the oldest job plus every queued job it can run in the same batch (same batch key), up to
`max_batch` rows, and runs them together: generation jobs as one left-padded `generate` call, embedding
jobs as one `encode_text` call and one call per medium (`encode_image`, `encode_video`, `encode_audio`). Jobs
that arrive while a batch runs wait for the next one (batching at admission: `generate` takes its rows at the
start).

That is static batching (`--batching static`). Generation runs by default with continuous batching instead
(`ContinuousWorker`): the thread keeps one running `DecodeBatch` and, before each decoding step, prefills the
queued requests that fit into it, so requests join and leave the running batch at every step (vLLM's
iteration-level scheduling).

Results travel back to the event loop through each job's asyncio queue (`call_soon_threadsafe`), so the
loop never waits on torch. A job whose client left or whose deadline passed is skipped, and a batch whose
rows are all finished or abandoned stops generating at once (continuous: the row leaves at the next step).
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
from ..generation import DecodeBatch, DecodeRow, concat_media, generate

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
                 top_p: float, seed: int | None, stop: Sequence[str], context: int, videos: torch.Tensor | None = None,
                 audios: torch.Tensor | None = None):
        super().__init__()
        self.ids, self.pixel_values, self.max_tokens, self.context = ids, pixel_values, max_tokens, context
        self.videos, self.audios = videos, audios  # a LLaVA's clips and sounds, as pixel_values its images
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

    def __init__(self, job: GenerationJob, tokenizer: Any, eos: set[int],
                 emit: Callable[[str, Any], None] | None = None):
        self.job, self.tokenizer, self.eos = job, tokenizer, eos
        self.emit = emit or job.emit  # (kind, value) to the client
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
            self.emit("delta", self.text[self.emitted:upto])
            self.emitted = upto

    def finish(self, reason: str) -> None:
        self._send(len(self.text))
        self.finished = True
        self.emit("done", {"finish_reason": reason, "text": self.text, "prompt_tokens": len(self.job.ids),
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
    rows = [_Row(j, tokenizer, set(eos)) for j in jobs]

    def stream(row: int, token: int) -> None:
        rows[row].push(token)
        if all(r.finished for r in rows):
            raise _AllRowsDone  # every answer is complete or abandoned: stop generating now

    first = jobs[0]
    max_new = min(max(j.max_tokens for j in jobs), model.max_seq_len - T)
    try:
        generate(model, ids, mask, **concat_media(jobs), max_new_tokens=max_new, temperature=first.temperature,
                 top_p=first.top_p, seed=first.seed, eos_token_id=eos, stop=list(first.stop) or None,
                 tokenizer=tokenizer if first.stop else None, stream=stream)
    except _AllRowsDone:
        pass
    for r in rows:
        if not r.finished:
            r.finish("length")


def send(events: list[tuple[Job, str, Any]]) -> None:
    """Many jobs' events in one wake-up of their event loop (`Job.emit` wakes it once per event: at every step of
    a running batch, once per row, and each wake-up takes the event loop a turn and the GIL)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str, Any]]] = {}
    for job, kind, value in events:
        if job.loop is not None and not job.cancelled.is_set():
            by_loop.setdefault(job.loop, []).append((job, kind, value))

    def deliver(events: list[tuple[Job, str, Any]]) -> None:
        for job, kind, value in events:
            job.events.put_nowait((kind, value))

    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(deliver, batch)
        except RuntimeError:  # the loop has closed (server shutting down)
            for job, _, _ in batch:
                job.cancelled.set()


class ContinuousWorker(Worker):
    """The model thread with continuous batching: one running `DecodeBatch` that requests join and leave at every
    decoding step.

    Each turn of the loop: rows whose request was cancelled or timed out leave; the queued jobs that fit join, in
    arrival order (free rows, room in the key/value pool, at most `prefill_tokens` padded prompt tokens a turn so a
    burst of long prompts does not stall the running rows for long), prefilled together and given their first
    token; then one decoding step gives every running row its next token. Any sampling settings share the batch
    (a seeded row samples from its own generator). `batches` counts decoding steps and `rows` the rows they ran.

    The thread shares the GIL with the event loop and the pre-processing threads, which feed it requests: it offers
    the GIL at the end of each turn (a thread that never blocks otherwise keeps it for the interpreter's whole
    switch interval, 5 ms, while requests wait to be parsed; measured with benchmarks/bench_serve.py at 32 rows on
    2 cores: 76-94 -> 120 requests/s, p99 of short requests 2.3-2.8 s -> 0.33 s). Tokens reach the clients every
    `send_every_s` (and at once when the batch empties), all rows' events in one wake-up of the event loop rather
    than one per row and step.
    """

    def __init__(self, model: Any, tokenizer: Any, max_queue: int = 64, max_batch: int = 8,
                 prefill_tokens: int = 4096, send_every_s: float = 0.02):
        self.tokenizer, self.eos = tokenizer, set(end_token_ids(model, tokenizer))
        self.batch = DecodeBatch(model, max_batch, sorted(self.eos))
        self.prefill_tokens = prefill_tokens
        self.answers: dict[DecodeRow, _Row] = {}  # each running row's answer (its job, text so far)
        self.outbox: list[tuple[Job, str, Any]] = []  # events not sent yet
        self.send_every_s, self.sent = send_every_s, 0.0
        super().__init__(None, max_queue, max_batch)

    def _admit(self) -> list[tuple[GenerationJob, DecodeRow]] | None:
        """The queued jobs that join now, each with its row (waits while there is nothing to do); None once closed
        and idle."""
        with self._cond:
            while not self._jobs and not self.batch.rows:
                if self._closed:
                    return None
                self._cond.wait()
            jobs, rows = [], []
            while self._jobs:
                job = self._jobs[0]
                if job.expired():
                    self._jobs.popleft().leave_queue()
                    continue
                row = DecodeRow(job.ids, job.max_tokens, job.pixel_values, job.temperature, top_p=job.top_p,
                                seed=job.seed, videos=job.videos, audios=job.audios)
                prefill = max(len(r.input_ids) for r in [*rows, row]) * (len(rows) + 1)
                if (rows and prefill > self.prefill_tokens) or not self.batch.can_join([*rows, row]):
                    break  # first come, first served: a job that does not fit yet is not overtaken
                self._jobs.popleft().leave_queue()
                jobs.append(job)
                rows.append(row)
            return list(zip(jobs, rows))

    def _loop(self) -> None:
        while (newcomers := self._admit()) is not None:
            try:
                gone = [r for r in self.batch.rows if self.answers[r].job.expired()]
                self._finish(gone)
                if newcomers:
                    self._join(newcomers)
                if self.batch.rows:
                    self._step()
            except Exception as e:  # reported to each running client as an error; the thread lives on
                log.exception("model step failed")
                for answer in self.answers.values():
                    self.outbox.append((answer.job, "error", e))
                self._finish(list(self.answers))
            time.sleep(0)  # offer the GIL each turn: the event loop and the pre-processing threads feed this batch
            now = time.monotonic()
            if self.outbox and (not self.batch.rows or now - self.sent >= self.send_every_s):
                send(self.outbox)
                self.outbox, self.sent = [], now

    def _join(self, newcomers: list[tuple[GenerationJob, DecodeRow]]) -> None:
        jobs, rows = [j for j, _ in newcomers], [r for _, r in newcomers]
        try:
            self.batch.join(rows)
        except Exception as e:  # these requests fail (a bad image, say); the running ones go on
            log.exception("prefill failed")
            for job in jobs:
                job.emit("error", e)
            return
        for job, row in zip(jobs, rows):
            self.answers[row] = _Row(job, self.tokenizer, self.eos,
                                     lambda kind, value, job=job: self.outbox.append((job, kind, value)))
        self._push(rows)

    def _step(self) -> None:
        rows = self.batch.step()
        self.batches += 1
        self.rows += len(rows)
        self._push(rows)

    def _push(self, rows: list[DecodeRow]) -> None:
        """Each row's new token to its answer (deltas, stop strings); finished and abandoned rows leave."""
        done = []
        for row in rows:
            answer = self.answers[row]
            answer.push(row.tokens[-1])
            if row.finish and not answer.finished:
                answer.finish("length")
            if answer.finished:
                done.append(row)
        self._finish(done)

    def _finish(self, rows: list[DecodeRow]) -> None:
        self.batch.leave(rows)
        for row in rows:
            del self.answers[row]


# ----------------------------------------------------------------------------- embeddings

ENCODERS = {"image": "encode_image", "video": "encode_video", "audio": "encode_audio"}  # medium -> the model's call


class EmbeddingJob(Job):
    """Texts and media to embed. `media` maps a medium to its encoder's input: "image" pixel_values (N, C, H, W),
    "video" video_values (N, T, C, H, W), "audio" audio_values (N, T, F). `finish(text_embeds, media_embeds)`
    (normalised; media_embeds by medium) makes the result, on the model thread."""

    def __init__(self, texts: list[str], media: dict[str, torch.Tensor] | None = None,
                 finish: Callable[[torch.Tensor, dict[str, torch.Tensor]], Any] | None = None):
        super().__init__()
        self.texts, self.media = texts, dict(media or {})
        self.finish = finish or (lambda t, m: (t, m))
        # rows of work in a batch: a text, an image or an audio clip is one, a video is one per frame
        self.size = len(texts) + sum(x.shape[:2].numel() if m == "video" else len(x) for m, x in self.media.items())

    def batch_key(self) -> Any:
        return "embed"


@torch.inference_mode()
def run_embeddings(model: Any, tokenizer: Any, jobs: list[EmbeddingJob]) -> None:
    """All texts of the batch in one `encode_text`, and each medium in one call of its encoder
    (`encode_image`, `encode_video`, `encode_audio`); L2-normalised."""
    jobs = [j for j in jobs if not j.expired()]
    texts = [t for j in jobs for t in j.texts]
    dim, device = model.config.embed_dim, next(model.parameters()).device  # inputs go where the weights are
    text_embeds = torch.empty(0, dim, device=device)
    if texts:
        ids = tokenizer(texts, context_length=model.config.text.context_length, truncate=False).to(device)
        text_embeds = F.normalize(model.encode_text(ids).float(), dim=-1)
    media_embeds = {}
    for medium, encode in ENCODERS.items():
        inputs = [j.media[medium] for j in jobs if medium in j.media]
        if inputs:
            media_embeds[medium] = F.normalize(getattr(model, encode)(torch.cat(inputs).to(device)).float(), dim=-1)
    t, start = 0, dict.fromkeys(media_embeds, 0)
    for j in jobs:
        own = {}
        for medium, x in j.media.items():
            own[medium] = media_embeds[medium][start[medium]:start[medium] + len(x)]
            start[medium] += len(x)
        j.emit("done", j.finish(text_embeds[t:t + len(j.texts)], own))
        t += len(j.texts)


# ----------------------------------------------------------------------------- images

class _Abandoned(Exception):
    """Raised between sampling steps when the request was cancelled or timed out."""


class ImageJob(Job):
    """A text-to-image request: `generate_image`'s arguments; `finish(images)` makes the result (PNGs) on the
    model thread. Each job runs alone, so its seed alone decides its images."""

    def __init__(self, settings: dict[str, Any], finish: Callable[[torch.Tensor], Any]):
        super().__init__()
        self.settings, self.finish = settings, finish
        self.size = len(settings["prompts"])

    def batch_key(self) -> Any:
        return ("image", id(self))


def run_images(pipe: Any, jobs: list[ImageJob]) -> None:
    """Each job's `generate_image` call; one whose client left stops at the next sampling step."""
    from ..image_generation import generate_image

    for job in jobs:
        if job.expired():
            continue

        def on_step(i: int, job: ImageJob = job) -> None:
            if job.expired():
                raise _Abandoned

        try:
            images = generate_image(pipe, on_step=on_step, **job.settings)
        except _Abandoned:
            continue
        job.emit("done", job.finish(images))
