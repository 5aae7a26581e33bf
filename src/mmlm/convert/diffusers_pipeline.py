"""diffusers Stable Diffusion pipeline directories <-> mmlm `TextToImage` (no diffusers import needed).

A pipeline directory holds `model_index.json` and one folder per part:
    unet/          config.json + diffusion_pytorch_model.safetensors   (UNet2DConditionModel)
    vae/           config.json + diffusion_pytorch_model.safetensors   (AutoencoderKL; absent in pixel space)
    text_encoder/  config.json + model.safetensors                     (transformers CLIPTextModel)
    tokenizer/     vocab.json + merges.txt (+ tokenizer_config.json, special_tokens_map.json)
    scheduler/     scheduler_config.json
Tensor names convert by a table of name swaps (below); loading is strict across all parts, each tensor streamed
from its memory-mapped file into its final dtype and device (weights.load_into). mmlm's own checkpoint of the same
model (config.json with kind "diffusion" + model.safetensors) opens here too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import CONFIG_NAME, WEIGHTS_NAME, load_state_dict_strict, read_json, read_state_dict, save_tensors, write_json
from ..config import from_dict
from ..diffusion_config import DiffusionConfig, NoiseScheduleConfig, UNetConfig, VAEConfig
from ..models.diffusion import TextToImage
from ..models.vae import AutoencoderKL
from ..tokenizer import TOKENIZER_FILE, Tokenizer
from ..weights import close_all, load_into, open_weights
from . import hf_clip
from .mapping import Rule, rename

INDEX_NAME = "model_index.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
EMA_NAME = "ema.safetensors"  # written by train/diffusion_task.py beside a run's model.safetensors

# mmlm name part -> the diffusers name part(s); several parts are one fused mmlm tensor (rows stacked in order)
SWAPS: list[tuple[str, tuple[str, ...]]] = [
    (".attn1.qkv.", (".attn1.to_q.", ".attn1.to_k.", ".attn1.to_v.")),  # self-attention, mmlm's fused q/k/v
    (".attn1.proj.", (".attn1.to_out.0.",)),
    (".attn2.q.", (".attn2.to_q.",)),  # cross-attention: q from the image, fused k/v from the text
    (".attn2.kv.", (".attn2.to_k.", ".attn2.to_v.")),
    (".attn2.proj.", (".attn2.to_out.0.",)),
    (".ff.proj.", (".ff.net.0.proj.",)),  # GEGLU
    (".ff.out.", (".ff.net.2.",)),
    (".attn.qkv.", (".to_q.", ".to_k.", ".to_v.")),  # the autoencoder's mid-block attention
    (".attn.proj.", (".to_out.0.",)),
    (".downsample.", (".downsamplers.0.",)),
    (".upsample.", (".upsamplers.0.",)),
]
# transformers CLIPTextModel names: CLIPModel's text rules without the projection, "text." dropped
TEXT_RULES = [Rule(r.ours.removeprefix("text."), r.theirs) for r in hf_clip.RULES
              if r.ours.startswith("text.") and r.ours != "text.proj.weight"]


def rules_for(module: nn.Module) -> list[Rule]:
    """One Rule per tensor of an mmlm UNet or autoencoder: its name and its diffusers name(s)."""
    rules = []
    for name in module.state_dict():
        theirs: tuple[str, ...] = (name,)
        for ours, parts in SWAPS:
            if ours in name:
                theirs = tuple(name.replace(ours, p) for p in parts)
                break
        rules.append(Rule(name, theirs if len(theirs) > 1 else theirs[0]))
    return rules


def _refuse(cfg: dict, where: str, expected: dict[str, Any]) -> None:
    """A ValueError naming each field whose value this architecture does not have."""
    bad = [f"{k}={cfg[k]!r} (supported: {v!r})" for k, v in expected.items() if k in cfg and cfg[k] != v]
    if bad:
        raise ValueError(f"{where}: not a Stable Diffusion 1.x/2.x part mmlm builds: " + "; ".join(bad))


# ----------------------------------------------------------------------------- configs

def unet_config_from_diffusers(d: dict, where: str = "unet/config.json") -> UNetConfig:
    _refuse(d, where, {"mid_block_type": "UNetMidBlock2DCrossAttn", "act_fn": "silu", "center_input_sample": False,
                       "class_embed_type": None, "time_embedding_type": "positional",
                       "conv_in_kernel": 3, "conv_out_kernel": 3, "only_cross_attention": False,
                       "dual_cross_attention": False, "resnet_time_scale_shift": "default", "time_cond_proj_dim": None,
                       "downsample_padding": 1, "mid_block_scale_factor": 1, "encoder_hid_dim": None,
                       "attention_type": "default", "cross_attention_norm": None, "resnet_out_scale_factor": 1.0,
                       "timestep_post_act": None, "time_embedding_dim": None, "reverse_transformer_layers_per_block": None,
                       "mid_block_only_cross_attention": None, "resnet_skip_time_act": False,
                       "time_embedding_act_fn": None, "class_embeddings_concat": False, "num_class_embeds": None})
    if d.get("addition_embed_type") not in (None, "text"):
        raise ValueError(f"{where}: addition_embed_type={d['addition_embed_type']!r} is not supported (null or 'text')")
    down, up = list(d.get("down_block_types", [])), list(d.get("up_block_types", []))
    kinds = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
    unknown = [t for t in down if t not in kinds]
    if unknown:
        raise ValueError(f"{where}: down_block_types {unknown} are not supported (CrossAttnDownBlock2D, DownBlock2D)")
    mirror = ["CrossAttnUpBlock2D" if kinds[t] else "UpBlock2D" for t in reversed(down)]
    if up != mirror:
        raise ValueError(f"{where}: up_block_types {up} must mirror down_block_types {down}: expected {mirror}")
    for key in ("transformer_layers_per_block", "cross_attention_dim"):
        if isinstance(d.get(key), (list, tuple)):
            raise ValueError(f"{where}: {key} as a per-block list is not supported, got {d[key]}")
    heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)  # SD's attention_head_dim counts heads
    size = d.get("sample_size")  # null (diffusers' default) as absent: SD 1.x's 64
    if size is not None and not (isinstance(size, int) and size > 0):
        raise ValueError(f"{where}: sample_size must be a positive integer, got {size!r}")
    return UNetConfig(sample_size=64 if size is None else size, in_channels=d.get("in_channels", 4),
                      out_channels=d.get("out_channels", 4), block_out_channels=tuple(d["block_out_channels"]),
                      cross_attention=tuple(kinds[t] for t in down), layers_per_block=d.get("layers_per_block", 2),
                      transformer_layers_per_block=d.get("transformer_layers_per_block", 1),
                      heads=list(heads) if isinstance(heads, (list, tuple)) else heads,
                      cross_attention_dim=d.get("cross_attention_dim", 1280),
                      use_linear_projection=d.get("use_linear_projection", False),
                      norm_num_groups=d.get("norm_num_groups", 32), norm_eps=d.get("norm_eps", 1e-5),
                      flip_sin_to_cos=d.get("flip_sin_to_cos", True), freq_shift=d.get("freq_shift", 0),
                      upcast_attention=d.get("upcast_attention", False),
                      addition_embed_type=d.get("addition_embed_type"),
                      addition_embed_type_num_heads=d.get("addition_embed_type_num_heads", 64))


def unet_config_to_diffusers(c: UNetConfig) -> dict:
    down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in c.cross_attention]
    return {"_class_name": "UNet2DConditionModel", "sample_size": c.sample_size, "in_channels": c.in_channels,
            "out_channels": c.out_channels, "down_block_types": down,
            "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(c.cross_attention)],
            "mid_block_type": "UNetMidBlock2DCrossAttn", "block_out_channels": list(c.block_out_channels),
            "layers_per_block": c.layers_per_block, "transformer_layers_per_block": c.transformer_layers_per_block,
            "attention_head_dim": c.heads, "cross_attention_dim": c.cross_attention_dim,
            "use_linear_projection": c.use_linear_projection, "norm_num_groups": c.norm_num_groups,
            "norm_eps": c.norm_eps, "flip_sin_to_cos": c.flip_sin_to_cos, "freq_shift": c.freq_shift,
            "upcast_attention": c.upcast_attention, "act_fn": "silu", "downsample_padding": 1,
            "addition_embed_type": c.addition_embed_type, "addition_embed_type_num_heads": c.addition_embed_type_num_heads}


def vae_config_from_diffusers(d: dict, where: str = "vae/config.json") -> VAEConfig:
    _refuse(d, where, {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None})
    n = len(d["block_out_channels"])
    for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        if list(d.get(key, [kind] * n)) != [kind] * n:
            raise ValueError(f"{where}: {key} must be {n} x {kind}, got {d.get(key)}")
    return VAEConfig(in_channels=d.get("in_channels", 3), out_channels=d.get("out_channels", 3),
                     latent_channels=d.get("latent_channels", 4), block_out_channels=tuple(d["block_out_channels"]),
                     layers_per_block=d.get("layers_per_block", 2), norm_num_groups=d.get("norm_num_groups", 32),
                     sample_size=int(d.get("sample_size", 512)), scaling_factor=d.get("scaling_factor", 0.18215),
                     use_quant_conv=d.get("use_quant_conv", True), use_post_quant_conv=d.get("use_post_quant_conv", True),
                     mid_block_add_attention=d.get("mid_block_add_attention", True))


def vae_config_to_diffusers(c: VAEConfig) -> dict:
    n = len(c.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels, "out_channels": c.out_channels,
            "latent_channels": c.latent_channels, "block_out_channels": list(c.block_out_channels),
            "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
            "layers_per_block": c.layers_per_block, "norm_num_groups": c.norm_num_groups, "act_fn": "silu",
            "sample_size": c.sample_size, "scaling_factor": c.scaling_factor, "use_quant_conv": c.use_quant_conv,
            "use_post_quant_conv": c.use_post_quant_conv, "mid_block_add_attention": c.mid_block_add_attention}


# the defaults of the scheduler classes whose configs a pipeline may hold (fields a config leaves out)
_SCHEDULER_DEFAULTS = {
    "DDIMScheduler": {"timestep_spacing": "leading", "clip_sample": True, "set_alpha_to_one": True},
    "DDPMScheduler": {"timestep_spacing": "leading", "clip_sample": True},
    "PNDMScheduler": {"timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False},
    "EulerDiscreteScheduler": {"timestep_spacing": "linspace", "clip_sample": False},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "linspace", "clip_sample": False},
    "LMSDiscreteScheduler": {"timestep_spacing": "linspace", "clip_sample": False},
    "DPMSolverMultistepScheduler": {"timestep_spacing": "linspace", "clip_sample": False},
}


def scheduler_config_from_diffusers(d: dict, where: str = "scheduler/scheduler_config.json") -> NoiseScheduleConfig:
    """The noise schedule of any of the common scheduler classes (the sampler is picked at generation time)."""
    _refuse(d, where, {"trained_betas": None, "rescale_betas_zero_snr": False, "thresholding": False,
                       "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
                       "timestep_type": "discrete", "interpolation_type": "linear"})
    defaults = _SCHEDULER_DEFAULTS.get(d.get("_class_name"), _SCHEDULER_DEFAULTS["DDIMScheduler"])
    get = lambda k, default: d.get(k, defaults.get(k, default))  # noqa: E731
    return NoiseScheduleConfig(num_train_timesteps=get("num_train_timesteps", 1000), beta_start=get("beta_start", 0.0001),
                               beta_end=get("beta_end", 0.02), beta_schedule=get("beta_schedule", "linear"),
                               prediction_type=get("prediction_type", "epsilon"),
                               timestep_spacing=get("timestep_spacing", "leading"), steps_offset=get("steps_offset", 0),
                               clip_sample=get("clip_sample", False), clip_sample_range=get("clip_sample_range", 1.0),
                               set_alpha_to_one=get("set_alpha_to_one", False))


def scheduler_config_to_diffusers(c: NoiseScheduleConfig) -> dict:
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": c.num_train_timesteps, "beta_start": c.beta_start,
            "beta_end": c.beta_end, "beta_schedule": c.beta_schedule, "prediction_type": c.prediction_type,
            "timestep_spacing": c.timestep_spacing, "steps_offset": c.steps_offset, "clip_sample": c.clip_sample,
            "clip_sample_range": c.clip_sample_range, "set_alpha_to_one": c.set_alpha_to_one}


def text_config_from_diffusers(d: dict, where: str = "text_encoder/config.json"):
    """transformers CLIPTextModel config -> TextConfig. The pooled token is never read by the UNet: an end-of-text
    id outside a (tiny) vocabulary pools at argmax(ids) instead of failing."""
    if d.get("model_type", "clip_text_model") != "clip_text_model":
        raise ValueError(f"{where}: text_encoder must be a transformers CLIPTextModel, got model_type {d.get('model_type')!r}")
    if not 0 <= d.get("eos_token_id", 49407) < d.get("vocab_size", 49408):
        d = {**d, "eos_token_id": 2}
    return hf_clip.text_config_from_hf(d)


# ----------------------------------------------------------------------------- tokenizer

def _token_name(v: Any) -> str | None:
    return v.get("content") if isinstance(v, dict) else v


def load_clip_tokenizer(directory: Path, context_length: int) -> Tokenizer:
    """A transformers CLIPTokenizer folder (vocab.json + merges.txt) or mmlm's tokenizer.json, padding with the
    folder's pad token and framing to its model_max_length, as transformers' CLIPTokenizer does."""
    settings: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (directory / name).is_file():
            settings.update(read_json(directory / name))
    if (directory / TOKENIZER_FILE).is_file():
        tok = Tokenizer.load(directory)
        if "clean" in settings:  # mmlm's own settings: nothing to translate
            return tok
    elif (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        tok = Tokenizer.from_vocab_merges(directory / "vocab.json", directory / "merges.txt", context_length)
    else:
        raise FileNotFoundError(f"{directory}: no tokenizer.json or vocab.json + merges.txt (a CLIPTokenizer)")
    pad = _token_name(settings.get("pad_token"))
    if pad is not None:
        pad_id = tok.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ValueError(f"{directory}: pad_token {pad!r} is not in vocab.json")
        tok.pad_id = pad_id
    max_len = settings.get("model_max_length")
    if isinstance(max_len, int) and 0 < max_len <= context_length:
        tok.context_length = max_len
    return tok


def save_clip_tokenizer(tok: Tokenizer, directory: Path) -> None:
    """vocab.json + merges.txt + tokenizer_config.json: what transformers' CLIPTokenizer reads."""
    model = json.loads(tok.tokenizer.to_str())["model"]
    if tok.clean != "clip" or model.get("type") != "BPE":
        raise ValueError("only a CLIP BPE tokenizer exports as a transformers CLIPTokenizer")
    directory.mkdir(parents=True, exist_ok=True)
    vocab = tok.tokenizer.get_vocab(with_added_tokens=True)
    (directory / "vocab.json").write_text(json.dumps(dict(sorted(vocab.items(), key=lambda kv: kv[1])), ensure_ascii=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    name = tok.tokenizer.id_to_token
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tok.context_length, "bos_token": name(tok.sot_id),
        "eos_token": name(tok.eot_id), "pad_token": name(tok.pad_id), "unk_token": name(tok.eot_id),
        "do_lower_case": True})


# ----------------------------------------------------------------------------- load

def is_pipeline_dir(path: Path) -> bool:
    return path.is_dir() and (path / INDEX_NAME).is_file()


def _lazy_part(directory: Path, names: tuple[str, ...]) -> tuple[dict, list]:
    for n in names:
        if (directory / n).is_file():
            return open_weights(directory / n)
    raise FileNotFoundError(f"{directory}: none of {list(names)} (only safetensors weights are read)")


def load_pipeline(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TextToImage:
    """A diffusers Stable Diffusion pipeline directory -> TextToImage with its tokenizer, loaded strictly."""
    d = Path(path)
    index = read_json(d / INDEX_NAME)
    for part in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not isinstance(index.get(part), list) or index[part][0] is None:
            raise ValueError(f"{d / INDEX_NAME}: the pipeline has no {part!r}; a text-to-image pipeline needs one")
    has_vae = isinstance(index.get("vae"), list) and index["vae"][0] is not None
    sched_file = d / "scheduler" / "scheduler_config.json"
    cfg = DiffusionConfig(text=text_config_from_diffusers(read_json(d / "text_encoder" / CONFIG_NAME)),
                          unet=unet_config_from_diffusers(read_json(d / "unet" / CONFIG_NAME)),
                          vae=vae_config_from_diffusers(read_json(d / "vae" / CONFIG_NAME)) if has_vae else None,
                          scheduler=scheduler_config_from_diffusers(read_json(sched_file), str(sched_file)))
    with torch.device("meta"):
        model = TextToImage(cfg)
    files: list = []
    try:
        sd: dict[str, Any] = {}
        parts = [("unet", model.unet, (DIFFUSERS_WEIGHTS,)), ("text_encoder", None, ("model.safetensors",))]
        if has_vae:
            parts.append(("vae", model.vae, (DIFFUSERS_WEIGHTS,)))
        for part, module, names in parts:
            tensors, opened = _lazy_part(d / part, names)
            files += opened
            if module is None:  # transformers 5 saves CLIPTextModel's tensors without the "text_model." prefix
                tensors = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in tensors.items()}
                ours = rename(tensors, TEXT_RULES, "to_ours", str(d / part), ignore=lambda n: n.endswith("position_ids"))
            else:
                ours = rename(tensors, rules_for(module), "to_ours", str(d / part))
            sd.update({f"{part}.{k}": v for k, v in ours.items()})
        load_into(model, sd, str(d), dtype, device)
    finally:
        close_all(files)
    model.tokenizer = load_clip_tokenizer(d / "tokenizer", cfg.text.context_length)
    return model


def load_checkpoint(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> TextToImage:
    """mmlm's own checkpoint of a TextToImage (config.json kind "diffusion" + model.safetensors [+ tokenizer]); a
    training checkpoint's ema.safetensors, when there is one, replaces the UNet's weights."""
    d = Path(path)
    cfg = DiffusionConfig.from_dict(read_json(d / CONFIG_NAME))
    with torch.device("meta"):
        model = TextToImage(cfg)
    tensors, files = open_weights(d / WEIGHTS_NAME)
    try:
        load_into(model, tensors, str(d / WEIGHTS_NAME), dtype, device)
    finally:
        close_all(files)
    if (d / EMA_NAME).is_file():  # a training run's average of the UNet's weights: what sampling uses
        ema = read_state_dict(d / EMA_NAME)
        load_state_dict_strict(model.unet, {k.removeprefix("unet."): v for k, v in ema.items()}, str(d / EMA_NAME))
    if (d / TOKENIZER_FILE).is_file():
        model.tokenizer = Tokenizer.load(d)
    return model


def is_vae_dir(path: Path) -> bool:
    """An autoencoder alone: mmlm's checkpoint (config.json kind "autoencoder_kl") or diffusers' folder."""
    if not (path.is_dir() and (path / CONFIG_NAME).is_file()):
        return False
    cfg = read_json(path / CONFIG_NAME)
    return isinstance(cfg, dict) and (cfg.get("kind") == "autoencoder_kl" or cfg.get("_class_name") == "AutoencoderKL")


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> AutoencoderKL:
    """An AutoencoderKL, strictly: mmlm's checkpoint of one (`mmlm train vae`), a diffusers `AutoencoderKL` folder
    (a pipeline's vae/), or the autoencoder of a latent text-to-image model (a pipeline or an mmlm checkpoint)."""
    d = Path(path)
    if not d.exists():
        raise FileNotFoundError(f"{d}: no such file or directory (expected an autoencoder)")
    if not is_vae_dir(d):
        model = None
        if is_pipeline_dir(d):
            model = load_pipeline(d, dtype, device)
        elif (d / CONFIG_NAME).is_file() and read_json(d / CONFIG_NAME).get("kind") == "diffusion":
            model = load_checkpoint(d, dtype, device)
        if model is None or model.vae is None:
            raise ValueError(f"{d}: not an autoencoder, nor a latent text-to-image model that holds one")
        return model.vae.eval()
    raw = read_json(d / CONFIG_NAME)
    ours = raw.get("kind") == "autoencoder_kl"
    cfg = from_dict(VAEConfig, raw, str(d / CONFIG_NAME)) if ours else vae_config_from_diffusers(raw, str(d / CONFIG_NAME))
    with torch.device("meta"):
        model = AutoencoderKL(cfg)
    tensors, files = _lazy_part(d, (WEIGHTS_NAME,) if ours else (DIFFUSERS_WEIGHTS,))
    try:
        sd = tensors if ours else rename(tensors, rules_for(model), "to_ours", str(d))
        load_into(model, sd, str(d), dtype, device)
    finally:
        close_all(files)
    return model.eval()


# ----------------------------------------------------------------------------- export

def export_pipeline(model: TextToImage, out: str | Path) -> Path:
    """Write a directory that `diffusers.StableDiffusionPipeline.from_pretrained` opens (no safety checker)."""
    if not isinstance(model, TextToImage):
        raise ValueError(f"only a text-to-image model exports as a diffusers pipeline, got {type(model).__name__}")
    if model.tokenizer is None:
        raise ValueError("the model has no tokenizer; attach one (model.tokenizer = ...) before exporting")
    cfg, out = model.config, Path(out)
    if cfg.vae is None:
        raise ValueError("a pixel-space model (no vae) has no StableDiffusionPipeline form; keep it in mmlm format")
    state = model.state_dict()
    part = lambda p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")}  # noqa: E731
    save_tensors(out / "unet" / DIFFUSERS_WEIGHTS, rename(part("unet"), rules_for(model.unet), "to_theirs", "mmlm"))
    write_json(out / "unet" / CONFIG_NAME, unet_config_to_diffusers(cfg.unet))
    save_tensors(out / "vae" / DIFFUSERS_WEIGHTS, rename(part("vae"), rules_for(model.vae), "to_theirs", "mmlm"))
    write_json(out / "vae" / CONFIG_NAME, vae_config_to_diffusers(cfg.vae))
    save_tensors(out / "text_encoder" / "model.safetensors", rename(part("text_encoder"), TEXT_RULES, "to_theirs", "mmlm"))
    write_json(out / "text_encoder" / CONFIG_NAME, {"architectures": ["CLIPTextModel"], "torch_dtype": "float32",
                                                     **hf_clip.text_config_to_hf(cfg.text, cfg.text.width)})
    save_clip_tokenizer(model.tokenizer, out / "tokenizer")
    write_json(out / "scheduler" / "scheduler_config.json", scheduler_config_to_diffusers(cfg.scheduler))
    write_json(out / INDEX_NAME, {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"], "safety_checker": [None, None], "feature_extractor": [None, None],
        "requires_safety_checker": False})
    return out
