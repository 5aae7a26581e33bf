"""Scaling out does not change the maths: 2 processes (gloo, CPU, 1 thread each) against 1 process on the global batch.

Each test spawns its workers once and joins them with a deadline, so a broken collective fails instead of hanging.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from mmlm import distributed

pytestmark = pytest.mark.slow  # every test starts two processes
WORLD = 2
CLIP_CASES = [("clip", "local", 0), ("clip", "global", 0), ("siglip", "local", 0), ("siglip", "global", 0),
              ("clip", "local", 2), ("siglip", "global", 2)]  # (loss, gather mode, feature-caching micro-batch)


# ----------------------------------------------------------------------------- launching

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, name: str, out: str, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    distributed.setup(timeout_s=60)
    try:
        globals()[name](rank, Path(out), *args)
    finally:
        distributed.shutdown()
    os._exit(0)  # done and written: skip the interpreter's teardown, where gloo's threads can abort the process


def launch(name: str, out: Path, *args, world: int = WORLD, timeout: float = 240) -> None:
    """Run `name(rank, out, *args)` in `world` spawned processes that form a gloo group; fail on error or timeout."""
    ctx = mp.start_processes(_worker, args=(world, _free_port(), name, str(out), args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=5):  # raises if a worker failed (and stops the others)
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{name}: distributed workers still running after {timeout} s")


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ----------------------------------------------------------------------------- CLIP: one step, 4 + 2 cases

def _clip_case(kind: str, gather: str, micro: int):
    from mmlm.config import clip_preset
    from mmlm.models.clip import CLIP
    from mmlm.train.clip_task import ClipRunConfig, ClipTask
    from mmlm.train.loop import TrainConfig

    cfg = clip_preset("tiny-vit")
    cfg.logit_bias_init = -5.0 if kind == "siglip" else None
    torch.manual_seed(0)
    model = CLIP(cfg).double()  # float64: what is left of a difference is the maths, not float32 rounding
    run = ClipRunConfig(model=cfg, loss=kind, loss_gather=gather, train=TrainConfig(micro_batch=micro))
    task = ClipTask(run, model, None, None, None)
    g = torch.Generator().manual_seed(1)
    px = torch.randn(8, 3, 32, 32, generator=g, dtype=torch.float64)
    ids = torch.randint(1, 999, (8, 16), generator=g)
    ids[:, 9] = 999
    return task, {"pixel_values": px, "input_ids": ids, "batch_size": 8}


def _step(task, batch) -> tuple[float, dict[str, torch.Tensor]]:
    metrics = task.step(batch, contextlib.nullcontext)
    params = [p for p in task.model.parameters() if p.requires_grad]
    distributed.average_gradients(params)
    grads = {n: p.grad.clone() for n, p in task.model.named_parameters() if p.grad is not None}
    return metrics["loss"], grads


def _clip_steps(rank: int, out: Path) -> None:
    results = {}
    for case in CLIP_CASES:
        task, batch = _clip_case(*case)
        rows = slice(rank * 4, rank * 4 + 4)
        local = {"pixel_values": batch["pixel_values"][rows], "input_ids": batch["input_ids"][rows], "batch_size": 4}
        results["/".join(map(str, case))] = _step(task, local)
    torch.save(results, out / f"clip-rank{rank}.pt")


def _everything(rank: int, out: Path) -> None:
    _clip_steps(rank, out)
    _llava_fsdp_step(rank, out)
    _llava_train_two_steps(rank, out)
    _evaluations(rank, out)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> Path:
    """One launch of 2 processes for every test here (each start costs seconds): their results land in a folder."""
    from mmlm.tokenizer import Tokenizer
    from mmlm.data.sources import ShapesConversations

    out = tmp_path_factory.mktemp("dist")
    data = ShapesConversations("train", 32, seed=0, image_size=32, n_questions=2)
    texts = [t["value"] for i in range(32) for t in data[i]["conversations"]] + [data[i]["caption"] for i in range(32)]
    Tokenizer.train_byte_level(texts + ["USER: ASSISTANT:"], vocab_size=300,
                               special_tokens=["<s>", "</s>", "<image>"]).save(out / "tok")
    launch("_everything", out)
    return out


def test_clip_and_siglip_step_on_two_processes_equals_one_process_on_the_global_batch(two_processes):
    tmp_path = two_processes
    ranks = [torch.load(tmp_path / f"clip-rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for case in CLIP_CASES:
        task, batch = _clip_case(*case)
        loss, grads = _step(task, batch)
        assert len(grads) == len(list(task.model.parameters()))  # every parameter, logit_scale/bias included
        for r in range(WORLD):
            d_loss, d_grads = ranks[r]["/".join(map(str, case))]
            assert abs(d_loss - loss) <= 1e-6 * max(1.0, abs(loss)), (case, r, d_loss, loss)
            assert _max_diff(d_grads, grads) <= 1e-6, (case, r, _max_diff(d_grads, grads))
    # the check can fail: half a batch alone is a different objective
    task, batch = _clip_case("clip", "local", 0)
    full = _step(task, batch)[1]
    task, _ = _clip_case("clip", "local", 0)
    half = {"pixel_values": batch["pixel_values"][:4], "input_ids": batch["input_ids"][:4], "batch_size": 4}
    assert _max_diff(_step(task, half)[1], full) > 1e-4


# ----------------------------------------------------------------------------- LLaVA under FSDP2

def _llava_config(vocab_size: int = 128, image_token_id: int = 3, eos: int = 2):
    from mmlm.config import LlavaConfig, LMConfig, ViTConfig

    return LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4),
                       lm=LMConfig(vocab_size=vocab_size, width=48, layers=2, heads=4, kv_heads=2, mlp_dim=96,
                                   max_seq_len=512, eos_token_id=eos),
                       image_token_id=image_token_id)


def _llava_step_case():
    """A stage-2 task (projector + LM learn) in float64 and a global batch of 4 rows of different lengths."""
    from mmlm.data.transforms import PreprocessConfig
    from mmlm.models.llava import Llava
    from mmlm.train.llava_task import LlavaRunConfig, LlavaTask
    from mmlm.train.loop import TrainConfig

    cfg = _llava_config()
    torch.manual_seed(0)
    model = Llava(cfg).double()
    task = LlavaTask(LlavaRunConfig(model=cfg, stage=2, train=TrainConfig(fsdp=True)), model, None, None,
                     PreprocessConfig(image_size=32))
    g = torch.Generator().manual_seed(2)
    n_img, lengths, answers = cfg.image_tokens, [5, 12, 3, 9], [2, 7, 1, 4]
    T = 1 + n_img + max(lengths)
    ids, labels, mask = torch.zeros(4, T, dtype=torch.long), torch.full((4, T), -100), torch.zeros(4, T, dtype=torch.long)
    for i, (n, a) in enumerate(zip(lengths, answers)):
        row = torch.cat([torch.tensor([1]), torch.full((n_img,), 3), torch.randint(4, 128, (n,), generator=g)])
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
        labels[i, len(row) - a:len(row)] = row[-a:]  # only the answer's tokens count: a different number per row
    px = torch.randn(4, 3, 32, 32, generator=g, dtype=torch.float64)
    return task, {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": px, "batch_size": 4}


def _full_grads(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in model.named_parameters() if p.grad is not None}


def _llava_fsdp_step(rank: int, out: Path) -> None:
    task, batch = _llava_step_case()
    assert distributed.is_sharded(task.model)
    rows = slice(2 * rank, 2 * rank + 2)
    T = int(batch["attention_mask"][rows].sum(dim=1).max())  # each rank pads only to its own longest row
    local = {k: batch[k][rows, :T] for k in ("input_ids", "labels", "attention_mask")}
    local.update(pixel_values=batch["pixel_values"][rows], batch_size=2)
    loss = task.step(local, contextlib.nullcontext)["loss"]
    torch.save({"loss": loss, "grads": _full_grads(task.model)}, out / f"llava-rank{rank}.pt")


def test_llava_step_under_fsdp2_on_two_processes_equals_one_process_on_the_global_batch(two_processes):
    tmp_path = two_processes
    task, batch = _llava_step_case()
    loss = task.step(batch, contextlib.nullcontext)["loss"]
    grads = _full_grads(task.model)
    assert {n.split(".")[0] for n in grads} == {"projector", "lm"}
    for r in range(WORLD):
        got = torch.load(tmp_path / f"llava-rank{r}.pt", weights_only=True)
        assert abs(got["loss"] - loss) <= 1e-6 * max(1.0, loss), (r, got["loss"], loss)
        assert _max_diff(got["grads"], grads) <= 1e-6, (r, _max_diff(got["grads"], grads))
    # can fail: the mean of the two halves' mean losses weights tokens differently from the global mean
    halves = []
    for rows in (slice(0, 2), slice(2, 4)):
        t, _ = _llava_step_case()
        halves.append(t.step({**{k: batch[k][rows] for k in ("input_ids", "labels", "attention_mask", "pixel_values")},
                              "batch_size": 2}, contextlib.nullcontext)["loss"])
    assert abs(sum(halves) / 2 - loss) > 1e-3


def _llava_train_task(tok_dir: Path, steps: int, fmt: str = "consolidated"):
    from mmlm.data.transforms import PreprocessConfig
    from mmlm.models.llava import Llava
    from mmlm.formats import load_tokenizer
    from mmlm.data.sources import ShapesConversations
    from mmlm.train.llava_task import LlavaRunConfig, LlavaTask
    from mmlm.train.loop import TrainConfig

    tok = load_tokenizer(tok_dir)
    cfg = _llava_config(tok.vocab_size, tok.tokenizer.token_to_id("<image>"), tok.eot_id)
    train_cfg = TrainConfig(steps=steps, batch_size=8, lr=1e-3, warmup_steps=1, weight_decay=0.0, log_every=1,
                            ckpt_every=1, keep_last=3, progress=False, fsdp=True, checkpoint_format=fmt)
    run = LlavaRunConfig(model=cfg, stage=2, max_len=512, train=train_cfg)
    torch.manual_seed(0)
    data = ShapesConversations("train", 32, seed=0, image_size=32, n_questions=2)
    return LlavaTask(run, Llava(cfg), tok, data, PreprocessConfig(image_size=32, mode="pad_square"))


def _llava_train_two_steps(rank: int, out: Path) -> None:
    from mmlm.train.loop import train

    for fmt in ("sharded", "consolidated"):
        task = _llava_train_task(out / "tok", steps=2, fmt=fmt)
        assert distributed.is_sharded(task.model)
        train(task, task.cfg.train, out / fmt)


def _losses(run: Path) -> list[float]:
    import json

    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_fsdp2_checkpoints_saved_by_two_processes_resume_in_one(two_processes, tmp_path):
    from mmlm.checkpoint import read_state_dict
    from mmlm.train.loop import load_checkpoint, train
    from mmlm.train.optim import build_optimizer

    for fmt in ("sharded", "consolidated"):  # the runs are resumed here: work on copies
        shutil.copytree(two_processes / fmt, tmp_path / fmt)
    shutil.copytree(two_processes / "tok", tmp_path / "tok")
    ref = _llava_train_task(tmp_path / "tok", steps=3)  # one process, straight through
    train(ref, ref.cfg.train, tmp_path / "ref")
    expected = _losses(tmp_path / "ref")
    for fmt in ("sharded", "consolidated"):
        run = tmp_path / fmt
        step2 = run / "checkpoints" / "step-00000002"
        assert (step2 / "dcp").is_dir() == (fmt == "sharded")
        assert (step2 / "model.safetensors").is_file() == (fmt == "consolidated")
        two_proc_final = read_state_dict(run / "final" / "model.safetensors")  # consolidated at step 2
        fresh = _llava_train_task(tmp_path / "tok", steps=3, fmt=fmt)
        state = load_checkpoint(step2, fresh, build_optimizer(fresh.model, 1e-3, 0.0, (0.9, 0.98), 1e-6))
        assert state.step == 2 and state.samples_seen == 16
        for name, value in fresh.model.state_dict().items():
            assert torch.equal(value, two_proc_final[name]), name
        resumed = _llava_train_task(tmp_path / "tok", steps=3, fmt=fmt)
        train(resumed, resumed.cfg.train, run)  # one process picks up the 2-process run at step 2
        got = _losses(run)
        assert len(got) == 3
        for a, b in zip(got, expected):  # float32: FSDP's reduce-scatter sums in another order
            assert abs(a - b) <= 1e-4 * abs(b), (fmt, got, expected)


# ----------------------------------------------------------------------------- evaluation

class _StubTokenizer:
    """CLIP-style ids from characters: enough to embed class prompts and captions deterministically."""

    def __call__(self, texts, context_length):
        ids = torch.zeros(len(texts), context_length, dtype=torch.long)
        for i, t in enumerate(texts):
            row = [1 + ord(c) % 900 for c in t][:context_length - 1] + [999]
            ids[i, :len(row)] = torch.tensor(row)
        return ids


def _evaluations(rank: int | None, out: Path) -> dict:
    """Zero-shot and retrieval with a CLIP, VQA with an FSDP-sharded LLaVA (each rank generates for its own
    questions: the model is held unsharded meanwhile). rank None: one process."""
    import json

    from mmlm.eval.retrieval import evaluate_retrieval
    from mmlm.eval.vqa import evaluate_vqa
    from mmlm.eval.zeroshot import zeroshot
    from mmlm.data.sources import ShapesConversations

    task, batch = _clip_case("clip", "local", 0)
    model, px, tok = task.model.eval(), batch["pixel_values"], _StubTokenizer()
    with torch.no_grad():
        zs = zeroshot(model, tok, (px[i:i + 3] for i in range(0, 8, 3)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]),
                      ["cat", "dog", "car"], ["a {}.", "the {}!"], with_confusion=True)
        ret = evaluate_retrieval(model, tok, (px[i:i + 3] for i in range(0, 8, 3)), [f"pic {i}" for i in range(8)],
                                 range(8), batch_size=3)
    llava = _llava_train_task(out / "tok", steps=1)
    records = [ShapesConversations("val", 5, seed=0, image_size=32, n_questions=1)[i] for i in range(5)]
    with torch.no_grad(), distributed.unsharded(llava.model):
        vqa = evaluate_vqa(llava.model.eval(), llava.tokenizer, llava.processor, records, "vicuna_v1", batch_size=2,
                           max_new_tokens=6)
    result = {"zeroshot": zs, "retrieval": ret, "vqa": vqa}
    if rank is not None:
        (out / f"eval-rank{rank}.json").write_text(json.dumps(result))
    return result


def test_evaluation_shared_by_two_processes_equals_one_process(two_processes):
    import json

    alone = json.loads(json.dumps(_evaluations(None, two_processes)))
    assert alone["vqa"]["n"] == 5 and alone["retrieval"]["images"] == 8 and alone["zeroshot"]["n"] == 8
    for r in range(WORLD):
        assert json.loads((two_processes / f"eval-rank{r}.json").read_text()) == alone


# ----------------------------------------------------------------------------- failure

def _one_rank_fails(rank: int, out: Path) -> None:
    if rank == 1:
        raise RuntimeError("rank 1 fails on purpose")
    distributed.all_sum(1.0)  # waits for rank 1, which has left: must raise, not hang


def test_a_failing_rank_ends_the_others_without_a_launcher(tmp_path):
    """No torchrun agent to kill the survivors: rank 0 must see the broken group and exit by itself."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, WORLD, port, "_one_rank_fails", str(tmp_path), ())) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=150)  # well beyond the workers' 60 s collective timeout
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung after its peer failed"
    assert all(p.exitcode != 0 for p in procs), [p.exitcode for p in procs]
