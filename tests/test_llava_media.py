"""LLaVA reading video and sound beside images: towers copied from video / audio CLIPs, one batch mixing every
kind of sample, the label mask, the splice, cached decoding, and bad samples named."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from mmlm.config import FlamingoConnectorConfig, LMConfig, ViTConfig
from mmlm.data.conversation import IGNORE, ConversationError
from mmlm.data.media_sets import media_conversation, sound_questions, video_questions
from mmlm.data.sources import LlavaDataConfig
from mmlm.serve.tiny import tiny_audio_clip, tiny_video_clip
from mmlm.train.llava_run import build_task
from mmlm.train.llava_task import LlavaRunConfig
from mmlm.train.loop import TrainConfig


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    d = tmp_path_factory.mktemp("towers")
    return tiny_video_clip(d / "video"), tiny_audio_clip(d / "audio")


@pytest.fixture(scope="module", params=["llava", "flamingo"])
def task(request, towers, tmp_path_factory):
    video, audio = towers
    cfg = LlavaRunConfig(stage=2, max_len=512, vocab_size=400, video_from=str(video), audio_from=str(audio),
                         data=LlavaDataConfig(kind="media_shapes", train_size=48, n_questions=2, eval_size=4, frames=6),
                         train=TrainConfig(steps=2, batch_size=6, lr=1e-3, warmup_steps=0, log_every=1, progress=False))
    cfg.model.vision = ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4)
    cfg.model.lm = LMConfig(width=48, layers=2, heads=4, kv_heads=2, mlp_dim=96, max_seq_len=512)
    cfg.model.video_frames, cfg.model.video_grid, cfg.model.audio_grid = 4, 2, [2, 3]
    cfg.model.connector = request.param
    if request.param == "flamingo":
        cfg.model.flamingo = FlamingoConnectorConfig(media_dim=48, latents=4, resampler_depth=1, resampler_heads=2,
                                                     resampler_head_dim=8, interval=1, only_last_media=False)
    return build_task(cfg, tmp_path_factory.mktemp("run"))


def _samples(task):
    data = task.data
    by_kind = {}
    for i in range(len(data)):
        s = data[i]
        by_kind.setdefault(s["modality"], s)
    image = by_kind["image"]
    two = {**image, "id": "two-images", "images": image["images"] * 2,
           "conversations": [{"from": "human", "value": "<image>\n<image>\nAre they the same?"},
                             {"from": "gpt", "value": "yes"}]}
    text = {"id": "text-only", "images": [], "videos": [], "audios": [],
            "conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]}
    return [text, image, two, by_kind["video"], by_kind["audio"], by_kind["video+audio"]]


def test_towers_come_from_the_clips_and_tokens_follow_the_budgets(task):
    model, mc = task.model, task.model.config
    assert mc.video.width == 64 and mc.audio.width == 32  # the tiny CLIPs' towers, not the recipe's
    assert mc.video_cells == 4 * (1 + 2 * 2) and mc.audio_cells == 2 * 3
    # in the LM's context: every cell (llava) or one token per item (flamingo: the rest goes through cross-attention)
    flamingo = mc.connector == "flamingo"
    assert (mc.video_tokens, mc.audio_tokens, mc.image_tokens) == ((1, 1, 1) if flamingo else (20, 6, 16))
    assert task.tokenizer.tokenizer.token_to_id("<video>") == mc.video_token_id
    assert task.tokenizer.tokenizer.token_to_id("<audio>") == mc.audio_token_id
    from mmlm.formats import load

    clip = load(task.cfg.video_from)
    assert torch.equal(model.video.tower.transformer.blocks[0].mlp.fc1.weight,
                       clip.visual.transformer.blocks[0].mlp.fc1.weight)


def test_a_batch_mixing_every_kind_trains_and_the_label_mask_covers_only_replies(task):
    samples = _samples(task)
    batch = task.collate(samples)
    assert batch["pixel_values"].shape[0] == 1 + 2 + 0  # image, two images
    assert batch["videos"].shape == (2, 4, 3, 32, 32)  # video, video+audio: 6 rendered frames sampled to 4
    assert batch["audios"].shape == (2, 50, 32)
    mc = task.model.config
    for row, s in enumerate(samples):
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        learned = labels[labels != IGNORE]
        replies = [t["value"] for t in s["conversations"] if t["from"] == "gpt"]
        assert task.tokenizer.decode(learned.tolist()).replace("</s>", "") == "".join(replies)
        assert int((ids == mc.video_token_id).sum()) == len(s.get("videos") or []) * mc.video_tokens
        assert int((ids == mc.audio_token_id).sum()) == len(s.get("audios") or []) * mc.audio_tokens
    with torch.enable_grad():
        before = {n: p.detach().clone() for n, p in task.model.named_parameters()}
        task.model.zero_grad()
        out = task.step(batch, contextlib.nullcontext)
    assert np.isfinite(out["loss"])
    grads = {n for n, p in task.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    if mc.connector == "flamingo":  # stage 2: the LM frozen; at init only the gates move (tanh(0) hides the rest)
        assert {n for n in grads if not n.startswith("flamingo.")} == set()
        assert {f"flamingo.cross.{i}.alpha_cross_attn" for i in range(2)} <= grads
        assert not any(p.requires_grad for p in task.model.lm.parameters())
        with torch.no_grad():
            for block in task.model.flamingo.cross:
                block.alpha_cross_attn.fill_(0.5)
                block.alpha_dense.fill_(0.5)
        task.model.zero_grad()
        with torch.enable_grad():
            task.step(batch, contextlib.nullcontext)
        grads = {n for n, p in task.model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        want = ["flamingo.resampler.latents", "flamingo.cross.1.cross_attn.kv.weight"]
    else:
        want = ["lm.embed.weight"]
    for name in ["video.projector.fc1.weight", "video.projector.pos", "video.frame_time", "audio.projector.fc1.weight",
                 "audio.projector.pos", "projector.fc1.weight", *want]:
        assert name in grads, name
    assert not any(n.startswith(("video.tower.", "audio.tower.", "vision.")) for n in grads)  # towers frozen
    with torch.no_grad():  # restore the gates for the other tests
        for block in task.model.flamingo.cross if task.model.flamingo is not None else []:
            block.alpha_cross_attn.fill_(0.0)
            block.alpha_dense.fill_(0.0)
    assert all(torch.equal(p, before[n]) for n, p in task.model.named_parameters())  # step() only backpropagates


def test_media_land_at_their_tokens_and_cached_decoding_equals_a_full_forward(task):
    model = task.model.eval()
    samples = _samples(task)[3:]  # video, audio, video+audio
    batch = task.collate(samples)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    media = {k: batch[k] for k in ("pixel_values", "videos", "audios")}
    with torch.no_grad():
        mc = model.config
        if mc.connector == "llava":
            x = model.embed(ids, media["pixel_values"], videos=media["videos"], audios=media["audios"])
            assert torch.allclose(x[ids == mc.video_token_id], model.video(media["videos"]).flatten(0, 1))
            assert torch.allclose(x[ids == mc.audio_token_id], model.audio(media["audios"]).flatten(0, 1))
        # each row's prompt (up to its first reply token), left-padded as generation takes them
        first = [int((row != IGNORE).nonzero()[0]) for row in batch["labels"]]
        T = max(first)
        prompt = torch.zeros(len(ids), T, dtype=torch.long)
        pmask = torch.zeros_like(prompt)
        for r, n in enumerate(first):
            prompt[r, T - n:], pmask[r, T - n:] = ids[r, :n], 1
        ids, mask = prompt, pmask
        given = {k: v for k, v in media.items() if v is not None}
        full = model(ids, attention_mask=mask, **given)  # the next token's logits: a cached prefill equals this
        cache = model.new_cache(len(ids), T + 4)
        cached = model(ids, attention_mask=mask, cache=cache, only_last=True, **given)
    assert torch.allclose(full.logits[:, -1], cached.logits[:, -1], atol=1e-5)
    if mc.connector == "flamingo":  # gates opened: greedy decoding through the cache equals full forwards
        with torch.no_grad():
            for block in model.flamingo.cross:
                block.alpha_cross_attn.fill_(0.7)
                block.alpha_dense.fill_(0.7)
        from mmlm.generation import generate

        out = generate(model, ids, mask, max_new_tokens=5, eos_token_id=[], **given)
        cur, m = ids, mask
        with torch.no_grad():
            for _ in range(5):
                nxt = model(cur, attention_mask=m, **given).logits[:, -1].argmax(-1, keepdim=True)
                cur, m = torch.cat([cur, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
            for block in model.flamingo.cross:
                block.alpha_cross_attn.fill_(0.0)
                block.alpha_dense.fill_(0.0)
        assert torch.equal(out, cur[:, T:])


def test_evaluation_answers_questions_about_each_modality(task):
    from mmlm.eval.vqa import evaluate_vqa

    records = [media_conversation("val", i, kind, frames=6, n_questions=1) for i, kind in
               enumerate(["video", "audio", "video+audio"])]
    result = evaluate_vqa(task.model.eval(), task.tokenizer, task.processor, records, "vicuna_v1", max_new_tokens=4)
    assert result["n"] == 3 and set(result["per_modality"]) == {"video", "audio", "video+audio"}


def test_media_placeholders_without_their_media_name_the_sample(task):
    video = _samples(task)[3]
    with pytest.raises(ConversationError, match=r"video-train-\d+: the text holds 1 <video> placeholder\(s\) but "
                                                r"the sample has 0 video"):
        task.collate([{**video, "videos": []}])
    audio = _samples(task)[4]
    with pytest.raises(ConversationError, match=r"audio-train-\d+: .* 1 <audio> .* 2 audio"):
        task.collate([{**audio, "audios": audio["audios"] * 2}])
    with pytest.raises(ValueError, match="input_ids hold .* video tokens .* no videos were given"):
        batch = task.collate([video])
        task.model(batch["input_ids"])


def test_questions_have_exact_answers():
    qs = {t: a for _, a, t in video_questions("square", "red", "moving left", np.random.default_rng(0))}
    assert qs["video_action"] == "moving left" and qs["video_shape"] == "square" and qs["video_colour"] == "red"
    assert {t: a for _, a, t in sound_questions("three beeps")}["audio_count"] == "three"
    assert {t: a for _, a, t in sound_questions("a falling chirp")}["audio_direction"] == "falling"
    assert "audio_count" not in {t for _, _, t in sound_questions("a chord")}
    novel = [media_conversation("novel", i, "video", n_questions=4) for i in range(20)]
    from mmlm.data.media_sets import HELD_OUT_ACTIONS

    for r in novel:  # the held-out split asks only about held-out (shape, action) pairs
        answers = dict(zip(r["question_types"], [t["value"] for t in r["conversations"][1::2]]))
        assert (answers["video_shape"], answers["video_action"]) in HELD_OUT_ACTIONS


def test_llava_json_records_carry_videos_and_sounds(tmp_path):
    import json

    from mmlm.data.llava_json import LlavaJson
    from mmlm.data.media import write_audio, write_video

    item = media_conversation("val", 0, "video+audio", frames=6)
    write_video(tmp_path / "clip.mp4", item["videos"][0])
    write_audio(tmp_path / "sound.wav", item["audios"][0])
    records = [{"id": "both", "video": "clip.mp4", "audio": ["sound.wav"], "conversations": item["conversations"]},
               {"id": "gone", "video": "missing.mp4", "conversations": item["conversations"]}]
    (tmp_path / "data.json").write_text(json.dumps(records))
    ds = LlavaJson(tmp_path / "data.json", frames=4)
    x = ds[0]
    assert x["images"] == [] and x["videos"][0].shape == (4, 64, 64, 3) and x["audios"][0].shape == (16_000,)
    assert "gone" in ds[1]["bad"][0]  # a file that cannot be read is a bad sample, named


def test_an_image_clip_resnet_can_read_the_frames():
    """video_from may be an image CLIP: its ResNet reads each frame (the mean of its stage-3 map as the summary
    token, the map pooled to a grid), and the clip still lands at its video tokens."""
    from mmlm.config import LlavaConfig, ModifiedResNetConfig
    from mmlm.models.llava import Llava

    cfg = LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, layers=1, heads=4),
                      lm=LMConfig(vocab_size=50, width=48, layers=1, heads=4, kv_heads=2, mlp_dim=96, max_seq_len=128),
                      image_token_id=40, video=ModifiedResNetConfig(image_size=64, layers=(1, 1, 1, 1), width=8),
                      video_frames=3, video_grid=2, video_token_id=41)
    model = Llava(cfg).eval()
    assert model.video.projector.fc1.in_features == 8 * 4 * 4  # stage 3's channels
    videos = torch.randn(2, 3, 3, 64, 64)
    with torch.no_grad():
        tokens = model.video(videos)
        assert tokens.shape == (2, 3 * 5, 48)
        ids = torch.tensor([[1] + [41] * 15 + [2], [3] + [41] * 15 + [4]])
        x = model.embed(ids, None, videos=videos)
    assert torch.equal(x[ids == 41], tokens.flatten(0, 1))
    with pytest.raises(ValueError, match="video_grid must be between 1 and the frame's 4"):
        LlavaConfig(vision=cfg.vision, lm=cfg.lm, video=cfg.video, video_grid=5)
