"""LLaVA: a CLIP vision tower, a projector, and a decoder LM reading image features as if they were tokens.

The tower is a ViT (patch tokens, as LLaVA) or CLIP's ModifiedResNet (one token per cell of a stage's
feature map: a convolutional tower for small data, see `LlavaConfig`).

Reference: Liu et al. 2023/2024 (LLaVA, LLaVA-1.5); logits equal transformers' `LlavaForConditionalGeneration`
(tests/test_llava.py). The splice follows transformers' convention: input_ids already hold one
`image_token_id` per image feature (the conversation encoder expands each `<image>`), and the features of
all images of the batch, in order, replace the embeddings at those positions in one `masked_scatter`, so a
batch may mix text-only samples, one-image samples and several-image samples with no per-sample loop.

Video and sound join the same way (mmlm only): a `<video>` or `<audio>` placeholder expands to its own token id,
each modality has its own tower and projector (`VideoTokens`, `AudioTokens`), and each splice is one more
`masked_scatter`, so one batch may mix images, videos, sounds and text-only samples.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlavaConfig, ModifiedResNetConfig
from .audio import AudioSpectrogramTransformer
from .positions import KVCache
from .lm import LM, LMOutput
from .lora import add_lora, merge_lora
from .projector import Projector
from .resnet import ModifiedResNet
from .vit import VisionTransformer


def _frozen(module: nn.Module):
    """No graph for a tower whose parameters need no gradient (a frozen tower)."""
    return torch.no_grad() if not any(p.requires_grad for p in module.parameters()) else contextlib.nullcontext()


class VideoTokens(nn.Module):
    """Videos (N, T, C, H, W) -> (N, T g^2, D): every frame read by a ViT, its patch tokens average-pooled to a
    g x g grid and projected, plus a learned embedding of the cell (where in the frame) and of the frame's time
    (which frame): the LM reads a clip as T small images in order and sees motion as change between them."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.frames, self.grid = cfg.video_frames, cfg.video_grid
        self.tower = VisionTransformer(cfg.video, embed_dim=None)
        self.tower.init_weights()
        self.projector = Projector(cfg.projector, cfg.video.width, cfg.lm.width, bias=cfg.projector_bias,
                                   tokens=cfg.video_grid**2)  # the cell embedding
        self.frame_time = nn.Parameter(torch.randn(cfg.video_frames, cfg.lm.width))  # unit scale: see projector.py

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.dim() != 5 or videos.shape[1] != self.frames:
            raise ValueError(f"videos must be (N_videos, {self.frames} frames, C, H, W), got shape {tuple(videos.shape)}")
        N, T = videos.shape[:2]
        with _frozen(self.tower):
            x = self.tower.forward_tokens(videos.flatten(0, 1))[:, 1:]  # (N T, P, Dv): patch tokens, no class token
        side = round(x.shape[1] ** 0.5)
        x = x.transpose(1, 2).unflatten(2, (side, side))  # (N T, Dv, side, side): the patch grid
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (N T, g^2, Dv)
        x = self.projector(x.to(self.projector.fc1.weight.dtype))  # (N T, g^2, D), + cell embedding
        x = x.unflatten(0, (N, T)) + self.frame_time[:, None].to(x.dtype)  # (N, T, g^2, D), + frame time
        return x.flatten(1, 2)  # (N, T g^2, D): frame by frame


class AudioTokens(nn.Module):
    """Sounds (N, T, F) log-mel features -> (N, f t, D): an AST's patch tokens, their (frequency, time) grid
    average-pooled to f x t cells and projected, plus a learned embedding per cell."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.grid = tuple(cfg.audio_grid)
        self.tower = AudioSpectrogramTransformer(cfg.audio)
        self.projector = Projector(cfg.projector, cfg.audio.width, cfg.lm.width, bias=cfg.projector_bias,
                                   tokens=cfg.audio_tokens)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cfg = self.tower.config
        with _frozen(self.tower):
            x = self.tower(features).last_hidden_state[:, 2:]  # (N, Fp Tp, Da): patches, frequency-major
        x = x.transpose(1, 2).unflatten(2, (cfg.frequency_patches, cfg.time_patches))  # (N, Da, Fp, Tp)
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (N, f t, Da)
        return self.projector(x.to(self.projector.fc1.weight.dtype))  # (N, f t, D)


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        # The tower's tokens only: no CLIP projection (nor a ResNet's attention pool).
        resnet = isinstance(cfg.vision, ModifiedResNetConfig)
        self.vision = ModifiedResNet(cfg.vision, embed_dim=None) if resnet else VisionTransformer(cfg.vision, embed_dim=None)
        self.projector = Projector(cfg.projector, cfg.vision_feature_dim, cfg.lm.width, bias=cfg.projector_bias,
                                   tokens=cfg.image_tokens if cfg.image_pos_embed else 0)
        self.lm = LM(cfg.lm)
        self.vision.init_weights()
        self.video = VideoTokens(cfg) if cfg.video is not None else None
        self.audio = AudioTokens(cfg) if cfg.audio is not None else None
        if cfg.lora_rank:
            add_lora(self.lm.blocks, cfg.lora_rank, cfg.lora_alpha)

    def add_lora(self, rank: int, alpha: float) -> None:
        """Give the LM's block linears a LoRA update (stage 2 after a stage 1 without one); the config records it."""
        if self.config.lora_rank:
            raise ValueError(f"this model already has LoRA (rank {self.config.lora_rank})")
        add_lora(self.lm.blocks, rank, alpha)
        self.config.lora_rank, self.config.lora_alpha = rank, alpha

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with any LoRA update folded into the weights: a plain LLaVA's tensors."""
        sd = self.state_dict()
        return merge_lora(sd, self.config.lora_alpha / self.config.lora_rank) if self.config.lora_rank else sd

    @property
    def max_seq_len(self) -> int:
        return self.lm.max_seq_len

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        return self.lm.new_cache(batch, max_len)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, image_tokens, lm.width): the chosen layers' tokens, projected.

        A frozen tower (no parameter needing a gradient) runs without building a graph.
        """
        cfg = self.config
        with _frozen(self.vision):
            if isinstance(self.vision, ModifiedResNet):
                # the stem's and each stage's feature maps (N, C_i, H_i, W_i) -> one token per cell (N, H_i * W_i, C_i)
                n = len(cfg.vision.layers) + 1
                stages = self.vision.forward_stages(pixel_values, upto=max(i % n for i in cfg.vision_layers))
                feats = torch.cat([stages[i % n].flatten(2).transpose(1, 2) for i in cfg.vision_layers], dim=-1)
            else:
                hidden: list[torch.Tensor] = []  # the first block's input, then each block's output: (N, 1 + P, Dv)
                n = cfg.vision.layers + 1
                layers = [i % n for i in cfg.vision_layers]  # blocks after the last one read are never run
                self.vision.forward_tokens(pixel_values, hidden_states=hidden, upto=max(layers))
                feats = torch.cat([hidden[i] for i in layers], dim=-1)  # (N, 1 + P, Dv * n_layers)
                if cfg.drop_cls:
                    feats = feats[:, 1:]
        return self.projector(feats.to(self.projector.fc1.weight.dtype))

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, decoding: bool = False,
              videos: torch.Tensor | None = None, audios: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> (B, T, D) LM inputs with media features at the media-token positions.

        The k-th image-token position of the batch (row-major order) receives the k-th feature row of the
        flattened (N_images * image_tokens, D) features: images belong to rows in the order they appear.
        Videos (N, frames, C, H, W) and sounds (N, T, F) fill their own token ids the same way.
        `decoding` (a cached generation step) embeds a generated media-token id as an ordinary token.
        """
        if decoding and pixel_values is None and videos is None and audios is None:
            return self.lm.embed(input_ids)
        cfg = self.config
        media = [("image", cfg.image_token_id, pixel_values, self.encode_images, "pixel_values"),
                 ("video", cfg.video_token_id, videos, self.video, "videos"),
                 ("audio", cfg.audio_token_id, audios, self.audio, "audios")]
        masks = [input_ids == token_id for _, token_id, _, encoder, _ in media if encoder is not None]  # (B, T) each
        # a media token id may lie outside the vocabulary (LLaVA's -200): those slots are overwritten anyway
        x = self.lm.embed(input_ids.masked_fill(torch.stack(masks).any(0), 0))  # (B, T, D)
        for (kind, token_id, inputs, encoder, arg) in media:
            if encoder is None:
                if inputs is not None:
                    raise ValueError(f"{arg} given, but this model has no {kind} tower (llava.{kind} is null)")
                continue
            mask = input_ids == token_id  # (B, T)
            n_tokens = int(mask.sum())
            if inputs is None:
                if n_tokens:
                    raise ValueError(f"input_ids hold {n_tokens} {kind} tokens (id {token_id}) but no {arg} were given")
                continue
            if kind == "image" and inputs.dim() != 4:
                raise ValueError(f"pixel_values must be (N_images, C, H, W), got shape {tuple(inputs.shape)}")
            feats = encoder(inputs)  # (N, L, D)
            n_items, per_item = feats.shape[:2]
            if n_tokens != n_items * per_item:
                raise ValueError(f"input_ids hold {n_tokens} {kind} tokens (id {token_id}) but the {n_items} {kind}(s) "
                                 f"give {n_items * per_item} features ({per_item} per {kind}): each <{kind}> must "
                                 f"expand to exactly {per_item} {kind} tokens")
            x = x.masked_scatter(mask[..., None], feats.to(x.dtype))
        return x

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache: KVCache, slot: int | torch.Tensor) -> torch.Tensor:
        """The LM's generation step (LM.decode_step): a generated token is an ordinary token."""
        return self.lm.decode_step(input_ids, position_ids, key_mask, cache, slot)

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                only_last: bool = False, logits_at: torch.Tensor | None = None,
                targets: torch.Tensor | None = None, videos: torch.Tensor | None = None,
                audios: torch.Tensor | None = None) -> LMOutput:
        """input_ids (B, T) with image tokens, pixel_values (N_images, C, H, W) or None -> logits (B, T, V).
        videos (N_videos, frames, C, H, W) and audios (N_sounds, T, F) fill `<video>` and `<audio>` tokens.

        Everything else is the LM's forward (padding on either side, cache, only_last, logits_at, targets).
        """
        if inputs_embeds is None:
            if input_ids is None:
                raise ValueError("pass input_ids or inputs_embeds")
            decoding = cache is not None and cache.pos > 0
            inputs_embeds = self.embed(input_ids, pixel_values, decoding=decoding, videos=videos, audios=audios)
        elif pixel_values is not None or videos is not None or audios is not None:
            raise ValueError("pass media (pixel_values, videos, audios) with input_ids (media tokens mark where they go), "
                             "not with inputs_embeds")
        return self.lm(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                       cache=cache, only_last=only_last, logits_at=logits_at, targets=targets)
