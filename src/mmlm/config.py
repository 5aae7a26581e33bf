"""Typed architecture configs.

Every tower names its type in an explicit `kind` field (never guessed from other fields), derived
sizes are filled in `__post_init__` so that one setting drives the rest, and every config round-trips
through plain dicts (config.json) and YAML. Weights and preprocessing live elsewhere.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import yaml

ACTIVATIONS = ("quick_gelu", "gelu", "gelu_tanh", "silu")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass
class ViTConfig:
    """Vision Transformer as in CLIP: patchify conv (no bias), class token, ln_pre, blocks, ln_post on CLS."""

    kind: str = "vit"
    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 0  # 0 = 4 * width
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    in_channels: int = 3
    # the position embeddings' std at init; 0 = OpenAI's width^-1/2, a quarter of what a patch's content weighs
    # at these widths, so a tower trained from scratch first learns what is in a picture and only slowly where
    # (a video tower needs where from the start: a move left and a move right show the same frames, reversed)
    pos_init_std: float = 0.0

    def __post_init__(self) -> None:
        _check(self.kind == "vit", f"ViTConfig.kind must be 'vit', got {self.kind!r}")
        _check(self.pos_init_std >= 0, f"vision.pos_init_std must be >= 0, got {self.pos_init_std}")
        if not self.mlp_dim:
            self.mlp_dim = 4 * self.width
        _check(self.image_size % self.patch_size == 0,
               f"vision.image_size {self.image_size} is not a multiple of vision.patch_size {self.patch_size}")
        _check(self.width % self.heads == 0, f"vision.width {self.width} is not divisible by vision.heads {self.heads}")
        _check(self.act in ACTIVATIONS, f"vision.act {self.act!r} is not one of {ACTIVATIONS}")

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


@dataclass
class ModifiedResNetConfig:
    """CLIP's ModifiedResNet: 3-conv stem, anti-aliased (avg-pool) strided bottlenecks, attention pooling."""

    kind: str = "modified_resnet"
    image_size: int = 224
    layers: tuple[int, int, int, int] = (3, 4, 6, 3)
    width: int = 64
    heads: int = 0  # 0 = width * 32 // 64, OpenAI's rule
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        _check(self.kind == "modified_resnet", f"ModifiedResNetConfig.kind must be 'modified_resnet', got {self.kind!r}")
        self.layers = tuple(int(n) for n in self.layers)
        _check(len(self.layers) == 4, f"vision.layers must list 4 stage depths, got {self.layers}")
        if not self.heads:
            self.heads = self.width * 32 // 64
        _check(self.image_size % 32 == 0, f"vision.image_size {self.image_size} must be a multiple of 32 for a ResNet")
        _check((self.width * 32) % self.heads == 0,
               f"attention-pool width {self.width * 32} is not divisible by vision.heads {self.heads}")

    @property
    def grid(self) -> int:
        return self.image_size // 32

    @property
    def feature_dim(self) -> int:
        return self.width * 32

    # The hidden states a LLaVA can read: 0 = the stem's output (stride 4), 1..4 = each stage's (stride 4..32).
    def stage_channels(self, i: int) -> int:
        return self.width if i % 5 == 0 else self.width * 2 ** (i % 5 - 1) * 4

    def stage_grid(self, i: int) -> int:
        return self.image_size // 4 // 2 ** max(i % 5 - 1, 0)


@dataclass
class TextConfig:
    """CLIP's text Transformer: token + position embedding, causal blocks, final LN, EOT pooling."""

    kind: str = "text_transformer"
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 0  # 0 = 4 * width
    act: str = "quick_gelu"
    norm_eps: float = 1e-5
    eot_token_id: int = 49407
    # How the sentence vector is picked: "argmax" takes the largest id in each row (OpenAI, open_clip and
    # transformers' legacy eos_token_id == 2 configs; right for CLIP's BPE whose EOT is the largest id);
    # "eot" takes the first position of eot_token_id (transformers' current behaviour).
    pool: str = "argmax"

    def __post_init__(self) -> None:
        _check(self.kind == "text_transformer", f"TextConfig.kind must be 'text_transformer', got {self.kind!r}")
        if not self.mlp_dim:
            self.mlp_dim = 4 * self.width
        _check(self.width % self.heads == 0, f"text.width {self.width} is not divisible by text.heads {self.heads}")
        _check(self.act in ACTIVATIONS, f"text.act {self.act!r} is not one of {ACTIVATIONS}")
        _check(self.pool in ("argmax", "eot"), f"text.pool must be 'argmax' or 'eot', got {self.pool!r}")
        _check(0 <= self.eot_token_id < self.vocab_size,
               f"text.eot_token_id {self.eot_token_id} is outside the vocabulary (size {self.vocab_size})")


VisionConfig = Union[ViTConfig, ModifiedResNetConfig]
VISION_KINDS: dict[str, type] = {"vit": ViTConfig, "modified_resnet": ModifiedResNetConfig}


@dataclass
class CLIPConfig:
    KIND: typing.ClassVar[str] = "clip"  # what `kind` must say (VideoCLIPConfig says "video_clip")
    kind: str = "clip"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=ViTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None  # set (e.g. -10) for SigLIP's sigmoid loss

    def __post_init__(self) -> None:
        _check(self.kind == self.KIND, f"{type(self).__name__}.kind must be {self.KIND!r}, got {self.kind!r}")
        if isinstance(self.vision, dict):
            self.vision = vision_config_from_dict(self.vision)
        if isinstance(self.text, dict):
            self.text = from_dict(TextConfig, self.text)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
        return from_dict(cls, d)


FUSIONS = ("mean", "transformer")


@dataclass
class TemporalConfig:
    """How a video tower fuses its per-frame features (B, T, E) into one vector (B, E).

    "mean" averages the frames (order-blind); "transformer" is ActionCLIP's "Transf": frame position
    embeddings, `layers` residual blocks over the frames, a residual back to the frame features, then the mean.
    `frames` is the most frames a clip may have (the size of the position table)."""

    kind: str = "temporal"
    fusion: str = "mean"
    frames: int = 16
    layers: int = 1
    heads: int = 0  # 0 = max(1, embed_dim // 64)
    act: str = "quick_gelu"

    def __post_init__(self) -> None:
        _check(self.kind == "temporal", f"TemporalConfig.kind must be 'temporal', got {self.kind!r}")
        _check(self.fusion in FUSIONS, f"temporal.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        _check(self.frames >= 1, f"temporal.frames must be >= 1, got {self.frames}")
        _check(self.layers >= 1, f"temporal.layers must be >= 1, got {self.layers}")
        _check(self.act in ACTIVATIONS, f"temporal.act {self.act!r} is not one of {ACTIVATIONS}")


@dataclass
class VideoCLIPConfig(CLIPConfig):
    """A CLIP whose image tower also reads videos: each frame through the tower, then `temporal` fusion
    (models/video.py). Every image CLIP weight keeps its name, so an image CLIP initialises one."""

    KIND: typing.ClassVar[str] = "video_clip"
    kind: str = "video_clip"
    temporal: TemporalConfig = field(default_factory=TemporalConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.temporal, dict):
            self.temporal = from_dict(TemporalConfig, self.temporal, ".temporal")
        if not self.temporal.heads:
            self.temporal.heads = max(1, self.embed_dim // 64)
        _check(self.embed_dim % self.temporal.heads == 0,
               f"embed_dim {self.embed_dim} is not divisible by temporal.heads {self.temporal.heads}")


@dataclass
class ASTConfig:
    """Audio Spectrogram Transformer (Gong et al. 2021; transformers' ASTModel): a ViT over overlapping
    patch_size x patch_size patches of a log-mel spectrogram (T = max_length frames, F = num_mel_bins), strided
    by `frequency_stride` and `time_stride`, with a class and a distillation token. `num_labels` > 0 adds the
    classification head of ASTForAudioClassification."""

    kind: str = "ast"
    num_mel_bins: int = 128
    max_length: int = 1024
    patch_size: int = 16
    frequency_stride: int = 10
    time_stride: int = 10
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 0  # 0 = 4 * width
    act: str = "gelu"
    norm_eps: float = 1e-12
    qkv_bias: bool = True
    num_labels: int = 0

    def __post_init__(self) -> None:
        _check(self.kind == "ast", f"ASTConfig.kind must be 'ast', got {self.kind!r}")
        if not self.mlp_dim:
            self.mlp_dim = 4 * self.width
        _check(self.width % self.heads == 0, f"audio.width {self.width} is not divisible by audio.heads {self.heads}")
        _check(self.act in ACTIVATIONS, f"audio.act {self.act!r} is not one of {ACTIVATIONS}")
        _check(min(self.num_mel_bins, self.max_length) >= self.patch_size,
               f"audio.patch_size {self.patch_size} is larger than the spectrogram "
               f"({self.max_length} frames x {self.num_mel_bins} mel bins)")

    @property
    def frequency_patches(self) -> int:
        return (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1

    @property
    def time_patches(self) -> int:
        return (self.max_length - self.patch_size) // self.time_stride + 1

    @property
    def num_patches(self) -> int:
        return self.frequency_patches * self.time_patches

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


@dataclass
class AudioCLIPConfig:
    """An audio-text CLIP: an AST audio tower and CLIP's text tower projected into one space (models/audio.py)."""

    kind: str = "audio_clip"
    embed_dim: int = 512
    audio: ASTConfig = field(default_factory=ASTConfig)
    text: TextConfig = field(default_factory=TextConfig)
    logit_scale_init: float = math.log(1 / 0.07)
    logit_bias_init: float | None = None

    def __post_init__(self) -> None:
        _check(self.kind == "audio_clip", f"AudioCLIPConfig.kind must be 'audio_clip', got {self.kind!r}")
        if isinstance(self.audio, dict):
            self.audio = from_dict(ASTConfig, self.audio, ".audio")
        if isinstance(self.text, dict):
            self.text = from_dict(TextConfig, self.text, ".text")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


ROPE_TYPES = ("default", "linear", "llama3")


@dataclass
class LMConfig:
    """A Llama-family decoder (Llama 1-3, SmolLM, Qwen2, Mistral without sliding window).

    RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention. Qwen2 is Llama with q/k/v biases
    (`qkv_bias`); Llama's `attention_bias` sets both `qkv_bias` and `out_bias`.
    """

    kind: str = "llama"
    vocab_size: int = 32000
    width: int = 4096
    layers: int = 32
    heads: int = 32
    kv_heads: int = 0  # 0 = heads (multi-head); fewer = grouped-query attention
    head_dim: int = 0  # 0 = width // heads
    mlp_dim: int = 11008
    act: str = "silu"
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or {"rope_type": "linear", "factor": F} / {"rope_type": "llama3", "factor", "low_freq_factor",
    # "high_freq_factor", "original_max_position_embeddings"} as transformers writes it.
    rope_scaling: Optional[dict] = None
    max_seq_len: int = 2048
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: Optional[int] = None
    eos_token_id: Optional[list] = None  # every id that ends a reply (a list; an int is widened)

    def __post_init__(self) -> None:
        _check(self.kind == "llama", f"LMConfig.kind must be 'llama', got {self.kind!r}")
        if not self.kv_heads:
            self.kv_heads = self.heads
        if not self.head_dim:
            _check(self.width % self.heads == 0, f"lm.width {self.width} is not divisible by lm.heads {self.heads}")
            self.head_dim = self.width // self.heads
        _check(self.heads % self.kv_heads == 0, f"lm.heads {self.heads} is not a multiple of lm.kv_heads {self.kv_heads}")
        _check(self.head_dim % 2 == 0, f"lm.head_dim {self.head_dim} must be even for rotary embeddings")
        _check(self.act in ACTIVATIONS, f"lm.act {self.act!r} is not one of {ACTIVATIONS}")
        if isinstance(self.eos_token_id, int):
            self.eos_token_id = [self.eos_token_id]
        if self.rope_scaling is not None:
            _check(isinstance(self.rope_scaling, dict), f"lm.rope_scaling must be a mapping, got {self.rope_scaling!r}")
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))
            _check(kind in ROPE_TYPES, f"lm.rope_scaling type {kind!r} is not supported; known: {ROPE_TYPES}")
            self.rope_scaling = {k: v for k, v in self.rope_scaling.items() if k not in ("type", "rope_theta")}
            self.rope_scaling["rope_type"] = kind
            if kind == "default":
                self.rope_scaling = None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LMConfig":
        return from_dict(cls, d)


PROJECTORS = ("linear", "mlp2x_gelu", "identity")


@dataclass
class FlamingoConnectorConfig:
    media_dim: int  # width of the tower's features (Dv)
    latents: int = 16  # L: latents per media item
    resampler_depth: int = 2
    resampler_heads: int = 4
    resampler_head_dim: int = 32
    interval: int = 1  # a gated cross-attention block before every `interval`-th LM block:
    offset: int = 0  # before LM block i where i % interval == offset (IDEFICS 0; OpenFlamingo interval - 1)
    cross_heads: int | None = None  # default: the LM's heads
    only_last_media: bool = True  # a token sees the most recent media before it (False: every earlier one)

    def __post_init__(self) -> None:
        for name in ("media_dim", "latents", "resampler_depth", "resampler_heads", "resampler_head_dim", "interval"):
            if getattr(self, name) < 1:
                raise ValueError(f"flamingo.{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.offset < self.interval:
            raise ValueError(f"flamingo.offset must be in 0..interval - 1 = {self.interval - 1}, got {self.offset}")


@dataclass
class LlavaConfig:
    """LLaVA: a CLIP image tower's tokens, projected into a decoder LM's embedding space.

    The vision features are the hidden states of `vision_layer` (an index into the tower's hidden states,
    where 0 is the input of the first block: -2 is LLaVA-1.5's penultimate layer; a list concatenates
    several layers along the feature axis); `drop_cls` removes the class token. Each image becomes
    `image_tokens` positions holding `image_token_id` in input_ids. The image size is `vision.image_size`;
    how images are resized/padded is preprocessing (preprocess.json), kept apart from the architecture.

    The tower is a ViT (LLaVA's, and the only one transformers' Llava holds) or CLIP's ModifiedResNet, whose
    hidden states are the stem's and each stage's feature maps (5; -2 = the third stage, stride 16), read as
    one token per grid cell: a convolutional tower for small data (mmlm only; no transformers export).
    """

    kind: str = "llava"
    vision: ViTConfig = field(default_factory=lambda: ViTConfig(image_size=336, patch_size=14, width=1024, layers=24,
                                                                heads=16))
    lm: LMConfig = field(default_factory=LMConfig)
    vision_layer: Union[int, list] = -2
    drop_cls: bool = True
    projector: str = "mlp2x_gelu"
    projector_bias: bool = True
    # A learned embedding per image-token position, added to the projected features (mmlm only: no
    # transformers export). For a ResNet tower, whose cells carry little sense of where they lie.
    image_pos_embed: bool = False
    image_token_id: int = 32000
    lora_rank: int = 0  # > 0: the LM's block linears carry a trainable low-rank update (merged on export)
    lora_alpha: float = 16.0
    # The conversation template the model was tuned with (plain | vicuna_v1 | chat): chat, serving and VQA
    # evaluation prompt it the same way. Not architecture: transformers' config has no such field.
    template: str = "vicuna_v1"
    # Video and sound (mmlm only; None: the model reads images alone). A video is `video_frames` frames, each
    # read by the `video` tower (a video CLIP's frame ViT, or an image CLIP's tower): a summary token and its
    # feature grid average-pooled to video_grid x video_grid tokens, plus a learned frame-time embedding; `<video>`
    # expands to video_frames * (1 + video_grid**2) tokens. A sound is read by the `audio` AST (an audio CLIP's tower), its (frequency, time) patch grid
    # average-pooled to `audio_grid` cells; `<audio>` expands to their product. Each has its own projector.
    video: Optional[Union[ViTConfig, ModifiedResNetConfig]] = None
    video_frames: int = 8
    video_grid: int = 2
    video_token_id: int = -1
    audio: Optional[ASTConfig] = None
    audio_grid: list = field(default_factory=lambda: [1, 8])
    audio_token_id: int = -1
    # How media reach the LM. "llava": each item's projected tokens take its placeholder's positions in the LM's
    # input. "flamingo": each item keeps one token in the text, a perceiver resampler turns its projected tokens
    # into `flamingo.latents` latents, and the LM, frozen, reads them through gated cross-attention blocks
    # (models/flamingo.py; `flamingo.media_dim` is the projectors' output width, default the LM's).
    connector: str = "llava"
    flamingo: Optional[FlamingoConnectorConfig] = None

    def __post_init__(self) -> None:
        _check(self.kind == "llava", f"LlavaConfig.kind must be 'llava', got {self.kind!r}")
        _check(self.template in ("plain", "vicuna_v1", "chat"),
               f"llava.template must be plain, vicuna_v1 or chat, got {self.template!r}")
        if isinstance(self.vision, dict):
            self.vision = vision_config_from_dict(self.vision)
        _check(isinstance(self.vision, (ViTConfig, ModifiedResNetConfig)),
               "llava.vision must be a ViT (kind 'vit') or a ModifiedResNet (kind 'modified_resnet')")
        if isinstance(self.lm, dict):
            self.lm = from_dict(LMConfig, self.lm, ".lm")
        _check(self.projector in PROJECTORS, f"llava.projector must be one of {PROJECTORS}, got {self.projector!r}")
        layers = self.vision_layers
        _check(len(layers) > 0 and all(isinstance(i, int) and not isinstance(i, bool) for i in layers),
               f"llava.vision_layer must be an integer or a non-empty list of integers, got {self.vision_layer!r}")
        resnet = isinstance(self.vision, ModifiedResNetConfig)
        n = 5 if resnet else self.vision.layers + 1  # ViT: the first block's input, then each block's output
        bad = [i for i in layers if not -n <= i < n]
        _check(not bad, f"llava.vision_layer {bad} is outside the {n} hidden states of the "
                        f"{'ResNet (stem + 4 stages)' if resnet else f'{self.vision.layers}-layer ViT'}")
        _check(not resnet or len({self.vision.stage_grid(i) for i in layers}) == 1,
               f"llava.vision_layer {layers}: ResNet feature maps of different sizes cannot be concatenated")
        _check(self.lora_rank >= 0, f"llava.lora_rank must be >= 0, got {self.lora_rank}")
        if isinstance(self.vision_layer, tuple):
            self.vision_layer = list(self.vision_layer)
        _check(self.connector in ("llava", "flamingo"), f"llava.connector must be llava or flamingo, got {self.connector!r}")
        if isinstance(self.flamingo, dict):
            self.flamingo = from_dict(FlamingoConnectorConfig, {"media_dim": self.lm.width, **self.flamingo}, ".flamingo")
        if self.connector == "flamingo" and self.flamingo is None:
            self.flamingo = FlamingoConnectorConfig(media_dim=self.lm.width)
        if isinstance(self.video, dict):
            self.video = vision_config_from_dict(self.video)
        _check(self.video is None or isinstance(self.video, (ViTConfig, ModifiedResNetConfig)),
               "llava.video must be a ViT (kind 'vit'), a ModifiedResNet (kind 'modified_resnet') or null")
        if self.video is not None:
            cells = (self.video.stage_grid(3) if isinstance(self.video, ModifiedResNetConfig)
                     else self.video.image_size // self.video.patch_size)
            _check(self.video_frames >= 1, f"llava.video_frames must be at least 1, got {self.video_frames}")
            _check(1 <= self.video_grid <= cells,
                   f"llava.video_grid must be between 1 and the frame's {cells} patches a side, got {self.video_grid}")
        if isinstance(self.audio, dict):
            self.audio = from_dict(ASTConfig, self.audio, ".audio")
        _check(self.audio is None or isinstance(self.audio, ASTConfig), "llava.audio must be an AST (kind 'ast') or null")
        self.audio_grid = list(self.audio_grid)
        if self.audio is not None:
            most = [self.audio.frequency_patches, self.audio.time_patches]
            _check(len(self.audio_grid) == 2 and all(isinstance(g, int) and 1 <= g <= m
                                                     for g, m in zip(self.audio_grid, most)),
                   f"llava.audio_grid must be [frequency, time] cells within the tower's {most} patches, "
                   f"got {self.audio_grid}")

    @property
    def vision_layers(self) -> list:
        return list(self.vision_layer) if isinstance(self.vision_layer, (list, tuple)) else [self.vision_layer]

    @property
    def video_cells(self) -> int:
        """Media tokens one video gives: every frame's class token and pooled cells."""
        return self.video_frames * (1 + self.video_grid**2)

    @property
    def audio_cells(self) -> int:
        """Media tokens one sound gives: the pooled (frequency, time) cells."""
        return self.audio_grid[0] * self.audio_grid[1]

    @property
    def video_tokens(self) -> int:
        """LM positions one `<video>` fills: its cells (llava), or its one token (flamingo)."""
        return 0 if self.video is None else 1 if self.connector == "flamingo" else self.video_cells

    @property
    def audio_tokens(self) -> int:
        """LM positions one `<audio>` fills: its cells (llava), or its one token (flamingo)."""
        return 0 if self.audio is None else 1 if self.connector == "flamingo" else self.audio_cells

    def placeholders(self) -> dict[str, tuple[int, int]]:
        """The placeholders this model reads -> (token id, LM positions each expands to)."""
        out = {"<image>": (self.image_token_id, self.image_tokens)}
        if self.video is not None:
            out["<video>"] = (self.video_token_id, self.video_tokens)
        if self.audio is not None:
            out["<audio>"] = (self.audio_token_id, self.audio_tokens)
        return out

    @property
    def image_tokens(self) -> int:
        """Positions one image occupies in the LM's sequence: its tower's tokens, or one (flamingo)."""
        return 1 if self.connector == "flamingo" else self.image_cells

    @property
    def image_cells(self) -> int:
        """Media tokens one image gives: the tower's tokens."""
        if isinstance(self.vision, ModifiedResNetConfig):  # one per cell of the feature map; no class token
            return self.vision.stage_grid(self.vision_layers[0]) ** 2
        return self.vision.num_patches + (0 if self.drop_cls else 1)

    @property
    def vision_feature_dim(self) -> int:
        if isinstance(self.vision, ModifiedResNetConfig):
            return sum(self.vision.stage_channels(i) for i in self.vision_layers)
        return self.vision.width * len(self.vision_layers)

    # What generation reads from a model's config.
    @property
    def eos_token_id(self) -> Optional[list]:
        return self.lm.eos_token_id

    @property
    def vocab_size(self) -> int:
        return self.lm.vocab_size

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LlavaConfig":
        return from_dict(cls, d)


# ----------------------------------------------------------------------------- dict / YAML io

def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-ready dict (tuples become lists)."""
    out = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            v = to_dict(v)
        elif isinstance(v, tuple):
            v = list(v)
        out[f.name] = v
    return out


def from_dict(cls: type, d: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from `d`; unknown keys are an error naming them."""
    if not isinstance(d, dict):
        raise ValueError(f"config{where or ''}: expected a mapping, got {type(d).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config{where}: unknown field(s) {unknown} for {cls.__name__}; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _check_scalar(v, hints.get(k), f"config{where}.{k}") for k, v in d.items()})


def _check_scalar(value: Any, hint: Any, where: str) -> Any:
    """Validate (and widen int -> float) the plain scalar fields; other fields check themselves."""
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
    elif hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise ValueError(f"{where}: expected an integer, got {value!r}")
        return int(value)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: expected a number, got {value!r}")
        return float(value)
    elif hint is str and not isinstance(value, str):
        raise ValueError(f"{where}: expected a string, got {value!r}")
    return value


def vision_config_from_dict(d: dict[str, Any]) -> VisionConfig:
    kind = d.get("kind")
    if kind not in VISION_KINDS:
        raise ValueError(f"config.vision: 'kind' must be one of {sorted(VISION_KINDS)}, got {kind!r}")
    return from_dict(VISION_KINDS[kind], d, ".vision")


def apply_overrides(d: dict[str, Any], overrides: list[str] | dict[str, Any]) -> dict[str, Any]:
    """Apply dotted overrides (`["model.vision.width=128", ...]` or a dict) to a nested dict, in place.

    Values are parsed as YAML scalars/lists (`1e-3`, `true`, `[3,4,6,3]`). A key that does not exist
    is an error naming it, so a typo never silently does nothing.
    """
    items = overrides.items() if isinstance(overrides, dict) else (_split_override(o) for o in overrides)
    for key, value in items:
        node = d
        parts = key.split(".")
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node.get(p), dict):
                raise ValueError(f"override {key!r}: {'.'.join(parts[: i + 1])!r} is not a section of the config")
            node = node[p]
        if parts[-1] not in node:
            raise ValueError(f"override {key!r}: no such field; fields here: {sorted(node)}")
        node[parts[-1]] = value
    return d


def _split_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like key.path=value")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw)
    if isinstance(value, str):  # YAML 1.1 reads "2e-3" (no dot) as a string; a number is meant
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip(), value


# ----------------------------------------------------------------------------- presets

def _openai_text(width: int = 512, heads: int = 8) -> TextConfig:
    return TextConfig(width=width, heads=heads, layers=12)


CLIP_PRESETS: dict[str, Any] = {
    # The published OpenAI architectures (all QuickGELU, context 77, vocab 49408).
    "RN50": lambda: CLIPConfig(embed_dim=1024, vision=ModifiedResNetConfig(image_size=224, layers=(3, 4, 6, 3), width=64),
                               text=_openai_text()),
    "RN101": lambda: CLIPConfig(embed_dim=512, vision=ModifiedResNetConfig(image_size=224, layers=(3, 4, 23, 3), width=64),
                                text=_openai_text()),
    "ViT-B-32": lambda: CLIPConfig(embed_dim=512, vision=ViTConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12),
                                   text=_openai_text()),
    "ViT-B-16": lambda: CLIPConfig(embed_dim=512, vision=ViTConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12),
                                   text=_openai_text()),
    "ViT-L-14": lambda: CLIPConfig(embed_dim=768, vision=ViTConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
                                   text=_openai_text(768, 12)),
    "ViT-L-14-336": lambda: CLIPConfig(embed_dim=768, vision=ViTConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16),
                                       text=_openai_text(768, 12)),
    # Tiny ones for tests and CPU experiments.
    "tiny-vit": lambda: CLIPConfig(embed_dim=32, vision=ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
                                   text=TextConfig(vocab_size=1000, eot_token_id=999, context_length=16, width=64, layers=2, heads=4)),
    "tiny-rn": lambda: CLIPConfig(embed_dim=32, vision=ModifiedResNetConfig(image_size=64, layers=(1, 1, 1, 1), width=16),
                                  text=TextConfig(vocab_size=1000, eot_token_id=999, context_length=16, width=64, layers=2, heads=4)),
}


def clip_preset(name: str) -> CLIPConfig:
    """A named architecture; `ViT-B/32` and `ViT-B-32` both work."""
    key = name.replace("/", "-")
    if key not in CLIP_PRESETS:
        raise ValueError(f"unknown CLIP preset {name!r}; known: {sorted(CLIP_PRESETS)}")
    return CLIP_PRESETS[key]()


MODEL_CONFIGS: dict[str, type] = {"clip": CLIPConfig, "llama": LMConfig, "llava": LlavaConfig,
                                   "video_clip": VideoCLIPConfig, "audio_clip": AudioCLIPConfig, "ast": ASTConfig}


def model_config_from_dict(d: dict[str, Any], source: str = "config") -> Any:
    """Dispatch on the top-level explicit `kind`."""
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind not in MODEL_CONFIGS:
        raise ValueError(f"{source}: top-level 'kind' must be one of {sorted(MODEL_CONFIGS)}, got {kind!r}")
    return from_dict(MODEL_CONFIGS[kind], d)
