"""LLaVA training through the one loop: stage 1 trains the projector only, stage 2 the LM too; loss falls."""

from __future__ import annotations

import pytest
import torch

from mmlm.config import LlavaConfig, LMConfig, ViTConfig
from mmlm.data.transforms import PreprocessConfig
from mmlm.models.llava import Llava
from mmlm.tokenizer import Tokenizer
from mmlm.data.sources import ShapesConversations
from mmlm.train.llava_task import LlavaRunConfig, LlavaTask
from mmlm.train.loop import TrainConfig, train


def _setup(stage: int, steps: int, lora_rank: int = 0):
    data = ShapesConversations("train", 64, seed=0, image_size=32, n_questions=2)
    texts = [t["value"] for i in range(64) for t in data[i]["conversations"]] + [data[i]["caption"] for i in range(64)]
    texts.append("A chat between a curious user and an artificial intelligence assistant. USER: ASSISTANT:")
    tok = Tokenizer.train_byte_level(texts, vocab_size=320, special_tokens=["<s>", "</s>", "<image>"])
    cfg = LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4),
                      lm=LMConfig(vocab_size=tok.vocab_size, width=48, layers=2, heads=4, kv_heads=2, mlp_dim=96,
                                  max_seq_len=512, eos_token_id=tok.eot_id),
                      image_token_id=tok.tokenizer.token_to_id("<image>"), lora_rank=lora_rank)
    run = LlavaRunConfig(model=cfg, stage=stage, max_len=512, train=TrainConfig(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2,
                                                                   weight_decay=0.0, log_every=1, progress=False))
    torch.manual_seed(0)
    model = Llava(cfg)
    task = LlavaTask(run, model, tok, data, PreprocessConfig(image_size=32, mode="pad_square"))
    return task


def _losses(run_dir):
    import json

    return [r["loss"] for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_stage1_trains_projector_only_and_loss_falls(tmp_path):
    task = _setup(stage=1, steps=25)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    train(task, task.cfg.train, tmp_path)
    losses = _losses(tmp_path)
    # The LM here is random and frozen, so the projector alone can only move the loss a little.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.02
    changed = {n.split(".")[0] for n, p in task.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"projector"}
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_stage2_trains_projector_and_lm_on_conversations(tmp_path):
    task = _setup(stage=2, steps=20)
    batch = task.collate([task.data[i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and (batch["labels"] != -100).any()
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    train(task, task.cfg.train, tmp_path)
    losses = _losses(tmp_path)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    changed = {n.split(".")[0] for n, p in task.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"projector", "lm"}


def test_batch_of_text_only_two_image_and_one_image_samples_trains_and_generates():
    import mmlm
    from mmlm.data.conversation import encode_prompt

    task = _setup(stage=2, steps=1)
    img = [task.data[i]["images"][0] for i in range(3)]
    q = [{"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "2"}]
    samples = [
        {"id": "text-only", "images": [], "conversations": q},
        {"id": "two-images", "images": img[:2],
         "conversations": [{"from": "human", "value": "<image>\n<image>\nWhat colour is the star?"},
                           {"from": "gpt", "value": "red"}]},
        {"id": "one-image", "images": img[2:], "conversations": task.data[2]["conversations"]},
    ]
    batch = task.collate(samples)
    n = task.model.config.image_tokens
    assert batch["pixel_values"].shape[0] == 3
    assert [(row == task.model.config.image_token_id).sum().item() for row in batch["input_ids"]] == [0, 2 * n, n]
    loss = task.step(batch, __import__("contextlib").nullcontext)["loss"]
    assert loss == loss and loss > 0
    assert all(p.grad is not None for p in task.model.lm.parameters())
    mc = task.model.config
    prompts = [encode_prompt(s["conversations"][:1], task.tokenizer, "vicuna_v1", mc.image_token_id, n) for s in samples]
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    out = mmlm.generate(task.model.eval(), ids, attention_mask=mask, pixel_values=batch["pixel_values"],
                        max_new_tokens=4)
    assert out.shape[0] == 3


def test_cli_two_stages_then_export_to_transformers(tmp_path):
    """`mmlm train llava` stage 1 -> stage 2 (init_from) -> `mmlm export hf` -> transformers gives the same logits."""
    import json

    import mmlm
    from mmlm.cli import main

    tiny = ["model.vision.image_size=32", "model.vision.width=32", "model.vision.layers=2", "model.lm.width=48",
            "model.lm.layers=2", "model.lm.mlp_dim=96", "model.lm.max_seq_len=512", "max_len=512", "vocab_size=400",
            "data.train_size=32", "data.eval_size=4", "train.batch_size=8", "train.progress=false", "train.steps=2",
            "train.precision=fp32", "model.image_pos_embed=false"]  # a ViT tower: exportable to transformers
    config = "configs/llava-shapes.yaml"
    assert main(["train", "llava", "--config", config, "--out", str(tmp_path / "s1"), *tiny]) == 0
    assert main(["train", "llava", "--config", config, "--out", str(tmp_path / "s2"), *tiny, "stage=2",
                 f"init_from={tmp_path / 's1' / 'final'}"]) == 0
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert set(summary["eval"]) == {"vqa_val", "vqa_novel"}
    from PIL import Image

    Image.new("RGB", (40, 24), (200, 30, 30)).save(tmp_path / "red.png")  # not square: padded as in training
    assert main(["chat", "--model", str(tmp_path / "s2" / "final"), "--image", str(tmp_path / "red.png"),
                 "--prompt", "What colour is the square?", "--max-new-tokens", "4"]) == 0
    assert main(["export", "hf", str(tmp_path / "s2" / "final"), "--out", str(tmp_path / "hf")]) == 0
    ours = mmlm.load(tmp_path / "s2" / "final")
    transformers = __import__("pytest").importorskip("transformers")
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    n = ours.config.image_tokens
    ids = torch.tensor([[0] + [ours.config.image_token_id] * n + [5, 6, 7]])
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, pixel_values=pixels).logits,
                                   theirs(input_ids=ids, pixel_values=pixels).logits, atol=1e-4, rtol=0)


def test_llava_json_data_with_a_missing_image_trains_and_reports_it(tmp_path, capsys):
    """The shapes writer's LLaVA JSON trains through the CLI; a missing image is skipped and reported."""
    import json

    from mmlm.cli import main
    from mmlm.data.shapes import write_shapes

    write_shapes(tmp_path / "shapes", train=16, val=4, novel=0, image_size=32, single_eval=False)
    records = json.loads((tmp_path / "shapes" / "train_vqa.json").read_text())
    (tmp_path / "shapes" / records[3]["image"]).unlink()
    tiny = ["model.vision.image_size=32", "model.vision.width=32", "model.vision.layers=2", "model.lm.width=48",
            "model.lm.layers=2", "model.lm.mlp_dim=96", "model.lm.max_seq_len=512", "max_len=512", "vocab_size=400",
            "data.kind=json", f"data.path={tmp_path / 'shapes' / 'train_vqa.json'}",
            f"data.eval_path={tmp_path / 'shapes' / 'val_vqa.json'}", "data.eval_size=4", "stage=2",
            "train.batch_size=8", "train.progress=false", "train.steps=2", "train.precision=fp32",
            "train.max_bad_sample_fraction=0.2"]
    assert main(["train", "llava", "--config", "configs/llava-shapes.yaml", "--out", str(tmp_path / "run"), *tiny]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["bad_samples"] == 1 and set(summary["eval"]) == {"vqa_eval"}
    assert records[3]["id"] in capsys.readouterr().out
    val = tmp_path / "shapes" / "val_vqa.json"
    answers = tmp_path / "answers.jsonl"
    assert main(["eval", "vqa", "--model", str(tmp_path / "run" / "final"), "--data", str(val), "--limit", "2",
                 "--answers", str(answers)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    n_questions = sum(t["from"] == "gpt" for r in json.loads(val.read_text())[:2] for t in r["conversations"])
    assert result["n"] == n_questions and 0 <= result["accuracy"] <= 1 and result["examples"]
    rows = [json.loads(line) for line in answers.read_text().splitlines()]  # every answer, with its verdict
    assert len(rows) == n_questions and "answers" not in result
    assert sum(r["correct"] for r in rows) == round(result["accuracy"] * n_questions)
    assert all(r["correct"] == (r["answer"] == r["reference"].strip()) for r in rows)


@pytest.mark.slow
def test_stage2_lora_trains_only_low_rank_updates_and_exports_merged(tmp_path):
    import mmlm
    from mmlm.convert.hf import export_hf

    task = _setup(stage=2, steps=15, lora_rank=4)
    before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
    train(task, task.cfg.train, tmp_path / "run")
    changed = {n for n, p in task.model.named_parameters() if not torch.equal(p, before[n])}
    assert {n.split(".")[0] for n in changed} == {"projector", "lm"}
    assert all(n.endswith((".lora_a", ".lora_b")) for n in changed if n.startswith("lm."))
    assert any(n.endswith(".lora_b") for n in changed)
    model = task.model.eval()
    again = mmlm.load(tmp_path / "run" / "final")  # LoRA tensors are kept in mmlm checkpoints
    assert again.config.lora_rank == 4
    export_hf(model, tmp_path / "hf")
    transformers = __import__("pytest").importorskip("transformers")
    theirs = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    batch = task.collate([task.data[i] for i in range(2)])
    with torch.no_grad():
        ours = model(batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
        ref = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits
        torch.testing.assert_close(again(batch["input_ids"], attention_mask=batch["attention_mask"],
                                         pixel_values=batch["pixel_values"]).logits, ours, atol=0, rtol=0)
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], atol=1e-4, rtol=0)


def test_pretrained_lm_and_resnet_clip_tower_build_a_llava(tmp_path):
    """lm_from + vision_from: the LM's weights and tokenizer (with <image> appended to its vocabulary, the new
    embedding row the mean of the others), the CLIP's ResNet trunk without its pool; stage 1 moves only the
    projector; stage 2 then answers through the LM's own tokenizer."""
    import json

    import mmlm
    from mmlm.cli import main
    from mmlm.config import CLIPConfig, ModifiedResNetConfig, TextConfig
    from mmlm.models.clip import CLIP
    from mmlm.models.lm import LM

    data = ShapesConversations("train", 32, seed=0, image_size=32, n_questions=1)
    texts = [t["value"] for i in range(32) for t in data[i]["conversations"]] + [data[i]["caption"] for i in range(32)]
    tok = Tokenizer.train_byte_level(texts, vocab_size=300, special_tokens=["<s>", "</s>"])
    torch.manual_seed(0)
    lm = LM(LMConfig(vocab_size=tok.vocab_size, width=32, layers=2, heads=4, kv_heads=2, mlp_dim=64, max_seq_len=512,
                     eos_token_id=tok.eot_id))
    mmlm.save(lm, tmp_path / "lm", tokenizer=tok)
    clip = CLIP(CLIPConfig(embed_dim=16, vision=ModifiedResNetConfig(image_size=32, layers=(1, 1, 1, 1), width=8),
                           text=TextConfig(vocab_size=50, eot_token_id=49, context_length=8, width=32, layers=1, heads=4)))
    mmlm.save(clip, tmp_path / "clip")
    tiny = ["data.train_size=32", "data.eval_size=2", "train.batch_size=4", "train.progress=false", "train.steps=2",
            "train.precision=fp32", "stage1_trains_lm=false", "max_len=500"]
    config = "configs/llava-shapes.yaml"
    assert main(["train", "llava", "--config", config, "--out", str(tmp_path / "s1"), *tiny,
                 f"lm_from={tmp_path / 'lm'}", f"vision_from={tmp_path / 'clip'}"]) == 0
    s1 = mmlm.load(tmp_path / "s1" / "final")
    new_tok = mmlm.load_tokenizer(tmp_path / "s1" / "final")
    assert new_tok.vocab_size == tok.vocab_size + 1 and s1.config.image_token_id == tok.vocab_size
    assert s1.config.image_tokens == 4 and s1.config.template == "plain"  # stage 3 of a 32 px ResNet: 2x2
    w = lm.embed.weight
    torch.testing.assert_close(s1.lm.embed.weight, torch.cat([w, w.mean(0, keepdim=True)]))
    for name, p in s1.lm.named_parameters():
        if name != "embed.weight" and name != "lm_head.weight":
            torch.testing.assert_close(p, lm.get_parameter(name), msg=name)  # the LM did not move in stage 1
    for name, p in s1.vision.named_parameters():
        torch.testing.assert_close(p, clip.visual.get_parameter(name), msg=name)
    assert main(["train", "llava", "--config", config, "--out", str(tmp_path / "s2"), *tiny, "stage=2",
                 f"init_from={tmp_path / 's1' / 'final'}"]) == 0
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert set(summary["eval"]) == {"vqa_val", "vqa_novel"}
    assert mmlm.load(tmp_path / "s2" / "final").config.template == "vicuna_v1"


def test_loss_per_reply_is_the_mean_over_replies():
    """One step's loss with loss_per=reply equals the mean over replies of each reply's mean token loss."""
    import torch.nn.functional as F

    from mmlm.train.objectives import next_token_targets

    task = _setup(stage=2, steps=1)
    task.cfg.loss_per = "reply"
    batch = task.collate([task.data[i] for i in range(4)])
    got = task.step(batch, autocast=lambda: torch.autocast("cpu", enabled=False))["loss"]
    with torch.no_grad():
        logits = task.model(batch["input_ids"], attention_mask=batch["attention_mask"],
                            pixel_values=batch["pixel_values"]).logits
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), reduction="none",
                         ignore_index=-100).view(len(logits), -1)
    per_reply = []
    for row, labels in zip(ce, batch["labels"][:, 1:]):
        learned = (labels != -100).tolist()
        run: list[float] = []
        for value, is_learned in zip(row.tolist(), learned + [False]):
            if is_learned:
                run.append(value)
            elif run:
                per_reply.append(sum(run) / len(run))
                run = []
        if run:
            per_reply.append(sum(run) / len(run))
    assert len(per_reply) >= 8  # 4 conversations x 2 questions
    assert abs(got - sum(per_reply) / len(per_reply)) < 1e-4
    assert next_token_targets(batch["labels"])[1].numel() > len(per_reply)  # replies longer than one token exist


def test_word_dropout_replaces_only_learned_inputs_reproducibly():
    """word_dropout swaps some reply tokens' inputs for random tokens (never the image token): labels, masks,
    prompts and image tokens stay; the same samples draw the same swaps (a resumed run sees what it would have)."""
    import pytest

    task = _setup(stage=2, steps=1)
    samples = [task.data[i] for i in range(8)]
    plain = task.collate(samples)
    task.cfg.word_dropout = 0.3
    dropped, again = task.collate(samples), task.collate(samples)
    assert torch.equal(dropped["input_ids"], again["input_ids"])
    assert torch.equal(dropped["labels"], plain["labels"])
    assert torch.equal(dropped["attention_mask"], plain["attention_mask"])
    changed = dropped["input_ids"] != plain["input_ids"]
    learned = plain["labels"] != -100
    assert changed.any() and not (changed & ~learned).any()
    assert 0.15 < changed.sum() / learned.sum() < 0.35  # ~0.3, less the draws that hit the same token
    image_id = task.model.config.image_token_id
    assert int((dropped["input_ids"] == image_id).sum()) == int((plain["input_ids"] == image_id).sum())
    with pytest.raises(ValueError, match="word_dropout"):
        LlavaRunConfig(word_dropout=1.0)
