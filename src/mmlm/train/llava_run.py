"""`mmlm train llava`: build data, tokenizer, model and VQA evaluation from a recipe, then run the loop."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch.utils.data import Dataset

from .. import distributed
from ..assets import resolve
from ..checkpoint import load_state_dict_strict
from ..config import LlavaConfig, apply_overrides, from_dict, to_dict
from ..data.conversation import VICUNA_SYSTEM
from ..data.llava_json import LlavaJson
from ..data.transforms import ImageProcessor, PreprocessConfig
from ..formats import load as load_model
from ..formats import load_tokenizer
from ..models.llava import Llava
from ..models.lm import LM
from ..eval.vqa import evaluate_vqa
from .llava_task import LlavaDataConfig, LlavaRunConfig, LlavaTask, ShapesConversations
from .loop import TrainConfig, train

SPECIAL_TOKENS = ["<s>", "</s>", "<image>", "<pad>"]


def _merge(base: dict[str, Any], extra: dict[str, Any], where: str) -> dict[str, Any]:
    for k, v in extra.items():
        if k not in base:
            raise ValueError(f"recipe{where}: unknown field {k!r}; known: {sorted(base)}")
        base[k] = _merge(base[k], v, f"{where}.{k}") if isinstance(v, dict) and isinstance(base[k], dict) else v
    return base


def run_config_from_dict(d: dict[str, Any], overrides: list[str] | None = None) -> LlavaRunConfig:
    """A recipe dict (YAML) over the defaults (a tiny LLaVA); dotted overrides apply last.

    A recipe may hold a `stage2:` mapping: the fields that differ in stage 2 (lr, steps, ...), applied over the
    recipe when the run is a stage-2 run (`stage: 2` in the recipe or `stage=2` on the command line)."""
    d = dict(d or {})
    stage2 = d.pop("stage2", None) or {}
    if not isinstance(stage2, dict):
        raise ValueError("recipe.stage2 must be a mapping of the fields that change in stage 2")
    base = to_dict(LlavaRunConfig())
    base["template"] = ""  # "" = the stage's default template
    full = _merge(base, d, "")
    if overrides:
        apply_overrides(full, overrides)
    if full["stage"] == 2 and stage2:
        full = _merge(full, stage2, ".stage2")
        if overrides:  # the command line still wins
            apply_overrides(full, overrides)
    return LlavaRunConfig(model=LlavaConfig.from_dict(full.pop("model")), data=from_dict(LlavaDataConfig, full.pop("data"), ".data"),
                          train=from_dict(TrainConfig, full.pop("train"), ".train"), **full)


def load_recipe(path: str | Path | None, overrides: list[str] | None = None) -> LlavaRunConfig:
    raw: dict[str, Any] = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a YAML mapping at the top level")
    return run_config_from_dict(raw, overrides)


def train_data(cfg: LlavaRunConfig) -> Dataset:
    d = cfg.data
    if d.kind == "json":
        return LlavaJson(d.path, d.image_root)
    return ShapesConversations("train", d.train_size, d.seed, cfg.model.vision.image_size, d.n_questions)


def build_tokenizer(cfg: LlavaRunConfig, data: Dataset, run: Path):
    from ..tokenizer import Tokenizer

    saved = run / "tokenizer"
    for src in (saved, Path(cfg.init_from) if cfg.init_from else None):  # resume / stage 2: tokenize as before
        if src is not None and (src / "tokenizer.json").is_file():
            return load_tokenizer(src)
    if cfg.lm_from:  # a pretrained LM's own tokenizer, plus the image placeholder
        tok = with_image_token(load_tokenizer(resolve(cfg.lm_from)))
        tok.save(saved)
        return tok
    n = min(len(data), 5000)
    records = data.records[:n] if isinstance(data, LlavaJson) else [data[i] for i in range(n)]  # no image decoding
    texts = [t["value"] for r in records for t in r["conversations"]] + [r.get("caption", "") for r in records]
    # The template's fixed text opens every conversation: fitted as often as the model will read it, it becomes
    # a few tokens instead of ~70 bytes-and-pieces per sample.
    texts += [VICUNA_SYSTEM + " USER: ASSISTANT: "] * len(records)
    tok = Tokenizer.train_byte_level(texts, vocab_size=cfg.vocab_size, special_tokens=SPECIAL_TOKENS)
    tok.pad_id = tok.tokenizer.token_to_id("<pad>")
    tok.save(saved)
    return tok


def with_image_token(tok):
    """The tokenizer with `<image>` as a special token (a new id at the end of the vocabulary if it is new)."""
    from tokenizers import AddedToken

    if tok.tokenizer.token_to_id("<image>") is None:
        tok.tokenizer.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return tok


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
    clip = None
    if cfg.vision_from:  # the tower is that CLIP's: its architecture wins over the recipe's `model.vision`
        clip = load_model(cfg.vision_from)
        vision = getattr(getattr(clip, "config", None), "vision", None)
        if getattr(vision, "kind", None) not in ("vit", "modified_resnet"):
            raise ValueError(f"vision_from={cfg.vision_from!r} must be a CLIP (ViT or ModifiedResNet image tower), "
                             f"got {getattr(vision, 'kind', type(clip).__name__)!r}")
        mc.vision = vision
        mc.__post_init__()  # vision_layer checked against this tower
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
    model = Llava(mc)
    if lm is not None:
        load_state_dict_strict(model.lm, pretrained_lm_state(lm, tok.vocab_size), f"{cfg.lm_from} (LM)")
        del lm
    if clip is not None:
        sd = {k.removeprefix("visual."): v for k, v in clip.state_dict().items()  # no projection, no pooling
              if k.startswith("visual.") and k != "visual.proj.weight" and not k.startswith("visual.attn_pool.")}
        load_state_dict_strict(model.vision, sd, f"{cfg.vision_from} (vision tower)")
    if cfg.lora_rank and cfg.stage == 2:
        model.add_lora(cfg.lora_rank, cfg.lora_alpha)
    return model


def build_evaluator(cfg: LlavaRunConfig, model: Llava, tok, preprocess: PreprocessConfig) -> Callable[[], dict[str, Any]]:
    if cfg.stage == 1 or cfg.data.eval_size <= 0:
        return lambda: {}
    processor = ImageProcessor(preprocess)
    size, d = cfg.model.vision.image_size, cfg.data
    if d.kind == "json":
        if not d.eval_path:
            return lambda: {}
        ds = LlavaJson(d.eval_path, d.image_root)
        items = [ds[i] for i in range(min(len(ds), d.eval_size))]
        sets = {"vqa_eval": [x for x in items if "bad" not in x]}
    else:
        sets = {f"vqa_{split}": [ds[i] for i in range(len(ds))] for split in ("val", "novel")
                for ds in [ShapesConversations(split, d.eval_size, d.seed, size, 1)]}
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
    out = Path(out)
    w = distributed.setup(cfg.train.dist_timeout_s)  # under torchrun (else nothing)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    task = build_task(cfg, out)
    if w.is_main:
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    summary = train(task, cfg.train, out, resume=resume)
    if w.is_main:
        print(json.dumps({"run": str(out), **summary}))
    return summary
