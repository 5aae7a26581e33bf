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

With `connector: flamingo` the same towers and projectors feed Flamingo's connector instead (models/flamingo.py):
each item keeps one token in the text, its projected tokens are resampled to a few latents, and the LM, frozen
in stage 2, reads them through gated cross-attention (`media_latents`, `_flamingo_forward`). IDEFICS
checkpoints load into this form (convert/hf_idefics.py).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LlavaConfig, ModifiedResNetConfig
from .audio import AudioSpectrogramTransformer
from .flamingo import FlamingoConnector
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
    """Videos (N, T, C, H, W) -> (N, T (1 + g^2), D): every frame read by an image tower, as a summary token and its
    feature grid average-pooled to g x g cells, projected, plus a learned embedding of the token's place in the frame
    and of the frame's time (which frame): the LM reads a clip as T small images in order and sees motion as change
    between them. The tower is a ViT (a video CLIP's frame tower: its class token and patch grid) or a ResNet (an
    image CLIP's: the mean of its stage-3 map, LLaVA's layer -2, and that map)."""

    STAGE = 3  # a ResNet tower's feature map: stage 3 (stride 16), as LLaVA's -2 reads it

    def __init__(self, cfg: LlavaConfig, out_dim: int):
        super().__init__()
        self.frames, self.grid = cfg.video_frames, cfg.video_grid
        self.resnet = isinstance(cfg.video, ModifiedResNetConfig)
        self.tower = (ModifiedResNet(cfg.video, embed_dim=None) if self.resnet
                      else VisionTransformer(cfg.video, embed_dim=None))
        self.tower.init_weights()
        width = cfg.video.stage_channels(self.STAGE) if self.resnet else cfg.video.width
        self.projector = Projector(cfg.projector, width, out_dim, bias=cfg.projector_bias,
                                   tokens=1 + cfg.video_grid**2)  # the place-in-frame embedding
        self.frame_time = nn.Parameter(torch.randn(cfg.video_frames, out_dim))  # unit scale: see projector.py

    def forward(self, videos: torch.Tensor) -> torch.Tensor:
        if videos.dim() != 5 or videos.shape[1] != self.frames:
            raise ValueError(f"videos must be (N_videos, {self.frames} frames, C, H, W), got shape {tuple(videos.shape)}")
        N, T = videos.shape[:2]
        with _frozen(self.tower):
            if self.resnet:
                grid = self.tower.forward_stages(videos.flatten(0, 1), upto=self.STAGE)[self.STAGE]  # (N T, Dv, s, s)
                summary = grid.mean(dim=(2, 3))[:, None]  # (N T, 1, Dv): the whole frame
            else:
                x = self.tower.forward_tokens(videos.flatten(0, 1))  # (N T, 1 + P, Dv): class token, then patches
                side = round((x.shape[1] - 1) ** 0.5)
                summary, grid = x[:, :1], x[:, 1:].transpose(1, 2).unflatten(2, (side, side))  # grid (N T, Dv, s, s)
        grid = F.adaptive_avg_pool2d(grid, self.grid).flatten(2).transpose(1, 2)  # (N T, g^2, Dv)
        x = torch.cat([summary, grid], dim=1)  # (N T, 1 + g^2, Dv)
        x = self.projector(x.to(self.projector.dtype or x.dtype))  # (N T, 1 + g^2, D), + place in frame
        x = x.unflatten(0, (N, T)) + self.frame_time[:, None].to(x.dtype)  # (N, T, 1 + g^2, D), + frame time
        return x.flatten(1, 2)  # (N, T (1 + g^2), D): frame by frame


class AudioTokens(nn.Module):
    """Sounds (N, T, F) log-mel features -> (N, f t, D): an AST's patch tokens, their (frequency, time) grid
    average-pooled to f x t cells and projected, plus a learned embedding per cell."""

    def __init__(self, cfg: LlavaConfig, out_dim: int):
        super().__init__()
        self.grid = tuple(cfg.audio_grid)
        self.tower = AudioSpectrogramTransformer(cfg.audio)
        self.projector = Projector(cfg.projector, cfg.audio.width, out_dim, bias=cfg.projector_bias,
                                   tokens=cfg.audio_cells)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        cfg = self.tower.config
        with _frozen(self.tower):
            x = self.tower(features).last_hidden_state[:, 2:]  # (N, Fp Tp, Da): patches, frequency-major
        x = x.transpose(1, 2).unflatten(2, (cfg.frequency_patches, cfg.time_patches))  # (N, Da, Fp, Tp)
        x = F.adaptive_avg_pool2d(x, self.grid).flatten(2).transpose(1, 2)  # (N, f t, Da)
        return self.projector(x.to(self.projector.dtype or x.dtype))  # (N, f t, D)


class Llava(nn.Module):
    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        # The tower's tokens only: no CLIP projection (nor a ResNet's attention pool).
        resnet = isinstance(cfg.vision, ModifiedResNetConfig)
        self.vision = ModifiedResNet(cfg.vision, embed_dim=None) if resnet else VisionTransformer(cfg.vision, embed_dim=None)
        # the projectors give the LM's width (llava: they become its input) or the resampler's (flamingo)
        out = cfg.flamingo.media_dim if cfg.connector == "flamingo" else cfg.lm.width
        self.projector = Projector(cfg.projector, cfg.vision_feature_dim, out, bias=cfg.projector_bias,
                                   tokens=cfg.image_cells if cfg.image_pos_embed else 0)
        self.lm = LM(cfg.lm)
        self.vision.init_weights()
        self.video = VideoTokens(cfg, out) if cfg.video is not None else None
        self.audio = AudioTokens(cfg, out) if cfg.audio is not None else None
        self.flamingo = FlamingoConnector(cfg.flamingo, cfg.lm) if cfg.connector == "flamingo" else None
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
        return self.projector(feats.to(self.projector.dtype or feats.dtype))

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
        media = self._media(input_ids, pixel_values, videos, audios)
        masks = [input_ids == token_id for _, token_id, _ in self._kinds()]  # (B, T) each
        # a media token id may lie outside the vocabulary (LLaVA's -200): those slots are overwritten anyway
        x = self.lm.embed(input_ids.masked_fill(torch.stack(masks).any(0), 0))  # (B, T, D)
        for kind, token_id, feats in media:
            mask = input_ids == token_id  # (B, T)
            n_tokens, (n_items, per_item) = int(mask.sum()), feats.shape[:2]
            if n_tokens != n_items * per_item:
                raise ValueError(f"input_ids hold {n_tokens} {kind} tokens (id {token_id}) but the {n_items} {kind}(s) "
                                 f"give {n_items * per_item} features ({per_item} per {kind}): each <{kind}> must "
                                 f"expand to exactly {per_item} {kind} tokens")
            x = x.masked_scatter(mask[..., None], feats.to(x.dtype))
        return x

    def _kinds(self) -> list[tuple[str, int, nn.Module | None]]:
        """(kind, token id, encoder) of every medium this model reads."""
        cfg = self.config
        kinds = [("image", cfg.image_token_id, self.encode_images), ("video", cfg.video_token_id, self.video),
                 ("audio", cfg.audio_token_id, self.audio)]
        return [k for k in kinds if k[2] is not None]

    def _media(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, videos: torch.Tensor | None,
               audios: torch.Tensor | None) -> list[tuple[str, int, torch.Tensor]]:
        """(kind, token id, projected features (N, P, D)) of each medium given, checked against input_ids' tokens."""
        out = []
        readers = {kind: (token_id, encoder) for kind, token_id, encoder in self._kinds()}
        for kind, arg, inputs in (("image", "pixel_values", pixel_values), ("video", "videos", videos),
                                  ("audio", "audios", audios)):
            if kind not in readers:
                if inputs is not None:
                    raise ValueError(f"{arg} given, but this model has no {kind} tower (llava.{kind} is null)")
                continue
            token_id, encoder = readers[kind]
            if inputs is None:
                n_tokens = int((input_ids == token_id).sum())
                if n_tokens:
                    raise ValueError(f"input_ids hold {n_tokens} {kind} tokens (id {token_id}) but no {arg} were given")
                continue
            if kind == "image" and inputs.dim() != 4:
                raise ValueError(f"pixel_values must be (N_images, C, H, W), got shape {tuple(inputs.shape)}")
            out.append((kind, token_id, encoder(inputs)))
        return out

    def media_latents(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                      videos: torch.Tensor | None = None, audios: torch.Tensor | None = None
                      ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor] | None:
        """Flamingo: every media item resampled to its latents, in the order of its token in input_ids (row-major)
        -> each cross-attention block's keys and values of them and the (B, T, M L) mask of which latents each
        token sees; None when the batch holds no media."""
        media = self._media(input_ids, pixel_values, videos, audios)
        if not media:
            return None
        ids = [token_id for _, token_id, _ in media]
        order = input_ids[torch.isin(input_ids, torch.tensor(ids, device=input_ids.device))]  # (N,) kinds, row-major
        latents = None
        for kind, token_id, feats in media:
            at = (order == token_id).nonzero().squeeze(1)  # where this kind's items go among all items
            if len(at) != len(feats):
                raise ValueError(f"input_ids hold {len(at)} {kind} tokens (id {token_id}) but {len(feats)} {kind}(s) "
                                 f"were given: each <{kind}> is one token")
            lat = self.flamingo.resampler(feats.to(self.flamingo.resampler.latents.dtype))  # (N_kind, L, Dm): L, whatever P was
            if latents is None:
                latents = lat.new_zeros(len(order), *lat.shape[1:])
            latents = latents.index_copy(0, at, lat)
        context, mask = self.flamingo.context(input_ids, latents, ids)
        return self.flamingo.keys_values(context), mask

    def decode_step(self, input_ids: torch.Tensor, position_ids: torch.Tensor, key_mask: torch.Tensor,
                    cache: KVCache, slot: int | torch.Tensor) -> torch.Tensor:
        """The LM's generation step (LM.decode_step): a generated token is an ordinary token. Flamingo: it reads
        the media through the keys and values the prefill left in the cache, as the last prompt token saw them."""
        hook = None
        if self.flamingo is not None:
            hook = self.flamingo.before_block(cache.media_kv, cache.media_mask)
        return self.lm.decode_step(input_ids, position_ids, key_mask, cache, slot, before_block=hook)

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
        if self.flamingo is not None:
            return self._flamingo_forward(input_ids, attention_mask, pixel_values, videos, audios, position_ids, cache,
                                          only_last, logits_at, targets)
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

    def _flamingo_forward(self, input_ids, attention_mask, pixel_values, videos, audios, position_ids, cache,
                          only_last, logits_at, targets) -> LMOutput:
        """The text through the LM, each media token an ordinary token, the media read through the gated
        cross-attention blocks. A prefill leaves the media's keys and values in the cache for `decode_step`."""
        if input_ids is None:
            raise ValueError("a Flamingo connector needs input_ids (its media tokens say where each item is)")
        more = all(m is None for m in (pixel_values, videos, audios))
        if cache is not None and cache.pos > 0 and more:  # more tokens after a prefill: the media it read (or none)
            mask = cache.media_mask
            hook = self.flamingo.before_block(cache.media_kv, None if mask is None else mask.expand(-1, input_ids.shape[1], -1))
        else:
            kv, mask = self.media_latents(input_ids, pixel_values, videos, audios) or (None, None)
            hook = self.flamingo.before_block(kv, mask)  # no media: the blocks' dense halves still run
            if cache is not None:  # every generated token sees what the prompt's last token saw
                cache.media_kv, cache.media_mask = kv, None if mask is None else mask[:, -1:]
        return self.lm(input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                       only_last=only_last, logits_at=logits_at, targets=targets, before_block=hook)
