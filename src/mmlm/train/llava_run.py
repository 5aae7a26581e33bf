"""`mmlm train llava`: build data, tokenizer, model and VQA evaluation from a run config, then run the loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import Dataset

from .. import distributed
from ..assets import resolve
from ..checkpoint import load_state_dict_strict
from ..data.conversation import VICUNA_SYSTEM
from ..data.sources import CONVERSATIONS
from ..config import ASTConfig, ModifiedResNetConfig, ViTConfig
from ..data.media import MediaProcessor
from ..data.transforms import PreprocessConfig
from ..eval.vqa import evaluate_vqa
from ..formats import load as load_model
from ..formats import load_tokenizer
from ..models.llava import Llava
from ..models.lm import LM
from .llava_task import LlavaRunConfig, LlavaTask
from .loop import run_training

SPECIAL_TOKENS = ["<s>", "</s>", "<image>", "<pad>"]
MEDIA_TOKENS = ["<video>", "<audio>"]  # joined when the model reads video or sound


def train_data(cfg: LlavaRunConfig) -> Dataset:
    """The conversations of `data.kind`."""
    return CONVERSATIONS[cfg.data.kind].train(cfg.data, cfg.model.vision.image_size)


def build_tokenizer(cfg: LlavaRunConfig, data: Dataset, run: Path):
    from ..tokenizer import Tokenizer

    saved = run / "tokenizer"
    for src in (saved, Path(cfg.init_from) if cfg.init_from else None):  # resume / stage 2: tokenize as before
        if src is not None and (src / "tokenizer.json").is_file():
            return load_tokenizer(src)
    if cfg.lm_from:  # a pretrained LM's own tokenizer, plus the media placeholders
        tok = with_image_token(load_tokenizer(resolve(cfg.lm_from)), media_placeholders(cfg))
        tok.save(saved)
        return tok
    n = min(len(data), 5000)
    records = CONVERSATIONS[cfg.data.kind].records(data, n)  # without decoding images where the source allows
    texts = [t["value"] for r in records for t in r["conversations"]] + [r.get("caption", "") for r in records]
    # The template's fixed text opens every conversation: fitted as often as the model will read it, it becomes
    # a few tokens instead of ~70 bytes-and-pieces per sample.
    texts += [VICUNA_SYSTEM + " USER: ASSISTANT: "] * len(records)
    tok = Tokenizer.train_byte_level(texts, vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS + media_placeholders(cfg))
    tok.pad_id = tok.tokenizer.token_to_id("<pad>")
    tok.save(saved)
    return tok


def media_placeholders(cfg: LlavaRunConfig) -> list[str]:
    """`<video>` / `<audio>` when the run's model reads them (a tower to copy, or one in the recipe)."""
    video = bool(cfg.video_from) or cfg.model.video is not None
    audio = bool(cfg.audio_from) or cfg.model.audio is not None
    return [p for p, used in zip(MEDIA_TOKENS, (video, audio)) if used]


def with_image_token(tok, extra: list[str] = ()):
    """The tokenizer with `<image>` (and `extra` placeholders) as special tokens (new ids at the end of the
    vocabulary where they are new)."""
    from tokenizers import AddedToken

    for token in ["<image>", *extra]:
        if tok.tokenizer.token_to_id(token) is None:
            tok.tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
    return tok


def copy_tower(path: str, kinds: tuple[type, ...], field: str, prefix: str, what: str) -> tuple[Any, dict[str, torch.Tensor]]:
    """A CLIP checkpoint's tower -> (its config, its tensors without the CLIP projection or attention pool), for
    a LLaVA tower: `field` names the tower's config in the CLIP's config, `prefix` its tensors."""
    clip = load_model(path)
    tower = getattr(getattr(clip, "config", None), field, None)
    if not isinstance(tower, kinds):
        raise ValueError(f"{what}_from={path!r} must be a CLIP whose {field} tower is a "
                         f"{' or '.join(k.__name__.removesuffix('Config') for k in kinds)}, got "
                         f"{type(clip).__name__} ({type(tower).__name__ if tower is not None else 'no ' + field})")
    sd = {k.removeprefix(prefix + "."): v for k, v in clip.state_dict().items()
          if k.startswith(prefix + ".") and k != f"{prefix}.proj.weight" and not k.startswith(f"{prefix}.attn_pool.")}
    return tower, sd


def pretrained_lm_state(lm: LM, vocab_size: int) -> dict[str, torch.Tensor]:
    """The LM's tensors with the vocabulary grown to `vocab_size`; new rows are the mean embedding (as LLaVA
    does for the tokens it adds), so the new token starts as an average word."""
    sd = lm.state_dict()
    for key in ("embed.weight", "lm_head.weight"):
        if key in sd and sd[key].shape[0] < vocab_size:
            w = sd[key]
            sd[key] = torch.cat([w, w.mean(0, keepdim=True).expand(vocab_size - w.shape[0], -1)])
    return sd


def build_model(cfg: LlavaRunConfig, tok) -> Llava:
    """A new model whose LM vocabulary, end token and image token follow the tokenizer (one setting drives
    the rest), or, with `init_from`, that checkpoint's model and architecture (stage 2 after stage 1)."""
    if cfg.init_from:
        model = load_model(cfg.init_from)
        if not isinstance(model, Llava):
            raise ValueError(f"init_from={cfg.init_from!r} is a {type(model).__name__}, not a LLaVA model")
        if cfg.lora_rank and cfg.stage == 2 and not model.config.lora_rank:
            model.add_lora(cfg.lora_rank, cfg.lora_alpha)
        cfg.model = model.config
        return model
    mc = cfg.model
    towers = {}
    if cfg.vision_from:  # the tower is that CLIP's: its architecture wins over the recipe's `model.vision`
        mc.vision, towers["vision"] = copy_tower(cfg.vision_from, (ViTConfig, ModifiedResNetConfig), "vision",
                                                 "visual", "vision")
    if cfg.video_from:
        mc.video, towers["video"] = copy_tower(cfg.video_from, (ViTConfig, ModifiedResNetConfig), "vision", "visual",
                                               "video")
    if cfg.audio_from:
        mc.audio, towers["audio"] = copy_tower(cfg.audio_from, (ASTConfig,), "audio", "audio", "audio")
    mc.__post_init__()  # vision_layer and the media grids checked against the towers
    mc.lora_rank = 0  # added below, after the pretrained tensors are in
    lm = None
    if cfg.lm_from:
        lm = load_model(resolve(cfg.lm_from))
        if not isinstance(lm, LM):
            raise ValueError(f"lm_from={cfg.lm_from!r} is a {type(lm).__name__}, not a language model")
        mc.lm = dataclasses.replace(lm.config, vocab_size=tok.vocab_size)
    else:
        mc.lm.vocab_size = tok.vocab_size
        mc.lm.eos_token_id = [tok.eot_id]
        mc.lm.bos_token_id = tok.sot_id
    mc.image_token_id = tok.tokenizer.token_to_id("<image>")
    for field_name, token, tower in (("video_token_id", "<video>", mc.video), ("audio_token_id", "<audio>", mc.audio)):
        if tower is not None:
            token_id = tok.tokenizer.token_to_id(token)
            if token_id is None:
                raise ValueError(f"the tokenizer has no {token} token, and the model reads {token[1:-1]}")
            setattr(mc, field_name, token_id)
    model = Llava(mc)
    if lm is not None:
        load_state_dict_strict(model.lm, pretrained_lm_state(lm, tok.vocab_size), f"{cfg.lm_from} (LM)")
        del lm
    for name, sd in towers.items():
        tower = model.vision if name == "vision" else getattr(model, name).tower
        load_state_dict_strict(tower, sd, f"{getattr(cfg, name + '_from')} ({name} tower)")
    if cfg.lora_rank and cfg.stage == 2:
        model.add_lora(cfg.lora_rank, cfg.lora_alpha)
    return model


def build_evaluator(cfg: LlavaRunConfig, model: Llava, tok, preprocess: PreprocessConfig) -> Callable[[], dict[str, Any]]:
    if cfg.stage == 1 or cfg.data.eval_size <= 0:
        return lambda: {}
    processor = MediaProcessor.for_model(model.config, preprocess)
    sets = CONVERSATIONS[cfg.data.kind].evaluation(cfg.data, cfg.model.vision.image_size)
    return lambda: {name: evaluate_vqa(model, tok, processor, items, cfg.template)["accuracy"]
                    for name, items in sets.items()}


def build_task(cfg: LlavaRunConfig, run: Path) -> LlavaTask:
    """A LLaVA stage's data, tokenizer (written to `run`), model and evaluator, as `train_llava` trains them."""
    data = train_data(cfg)
    with distributed.main_first():  # rank 0 fits and saves the tokenizer, the other ranks load it
        tok = build_tokenizer(cfg, data, run)
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg, tok)
    preprocess = PreprocessConfig(image_size=cfg.model.vision.image_size, mode=cfg.preprocess)
    model.config.template = cfg.template  # saved with the model: chat and eval prompt it as it was tuned
    return LlavaTask(cfg, model, tok, data, preprocess, build_evaluator(cfg, model, tok, preprocess))


def train_llava(cfg: LlavaRunConfig, out: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train a LLaVA stage per `cfg` into run directory `out` (resuming from its latest checkpoint if any)."""
    return run_training(cfg, out, lambda run: build_task(cfg, run), resume)
