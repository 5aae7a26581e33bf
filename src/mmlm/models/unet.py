"""Stable Diffusion's conditional UNet (matches diffusers' `UNet2DConditionModel`, SD 1.x / 2.x family).

The UNet predicts the noise (or velocity) in a noisy image x_t given the timestep t and the text's token states
(B, T, D). It is the cross-modal interaction module of a text-to-image model: the picture's positions attend to
the prompt's tokens in every Transformer2D block.

    x_t (B, C, H, W) -conv_in-> (B, c0, H, W)
      down: per level, resnets (+ Transformer2D) then a stride-2 conv; every output kept as a skip
      mid:  resnet, Transformer2D, resnet at the lowest resolution
      up:   per level, [h, skip] concatenated -> resnets (+ Transformer2D), then nearest upsample + conv
    -> GroupNorm, SiLU, conv_out -> (B, C, H, W)
    t -> sinusoidal embedding -> MLP -> added inside every ResnetBlock2D
    (addition_embed_type "text": + the prompt's token states, attention-pooled to one vector, in that same sum)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..diffusion_config import UNetConfig
from .attention import Attention, CrossAttention
from .kernels import attention, conv_add, conv_layout, group_norm_silu, linear, linear_geglu


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool = True, freq_shift: float = 0) -> torch.Tensor:
    """(B,) timesteps (may be fractional) -> (B, dim) sinusoids at geometric frequencies 1 .. 1/10000 (DDPM's,
    the Transformer's positions); [cos, sin] when `flip_sin_to_cos`, as Stable Diffusion has it."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """The timestep's sinusoids -> linear, SiLU, linear -> (B, time_embed_dim)."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class AttentionPooling(nn.Module):
    """The token states (B, T, D) -> one vector (B, D): a query made from their mean (+ a learned offset) attends
    over [that query token, the tokens] (CLIP's ResNet pooling, as DeepFloyd IF pools its T5 states)."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.k_proj, self.q_proj, self.v_proj = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, D)
        x = torch.cat([query, x], dim=1)  # (B, 1 + T, D)
        split = lambda h: h.unflatten(-1, (self.heads, D // self.heads)).transpose(1, 2)  # noqa: E731  (B, H, n, hd)
        y = attention(split(self.q_proj(query)), split(self.k_proj(x)), split(self.v_proj(x)))  # (B, H, 1, hd)
        return y.transpose(1, 2).reshape(B, D)


class TextTimeEmbedding(nn.Module):
    """LayerNorm, attention pooling, linear to the timestep embedding's width, LayerNorm: (B, T, D) -> (B, temb)."""

    def __init__(self, text_dim: int, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(text_dim)
        self.pool = AttentionPooling(heads, text_dim)
        self.proj = nn.Linear(text_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(states))))


class ResnetBlock2D(nn.Module):
    """GroupNorm, SiLU, conv; + the projected timestep embedding; GroupNorm, SiLU, conv; + the input (through a
    1x1 conv when the width changes). Without `temb_dim` (the autoencoder's blocks) no timestep is added."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch) if temb_dim else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, in_ch, H, W), temb (B, temb_dim) -> (B, out_ch, H, W)."""
        shift = None if self.time_emb_proj is None else self.time_emb_proj(F.silu(temb))  # (B, out_ch)
        h = conv_add(self.conv1, group_norm_silu(self.norm1, x), shift=shift)  # conv1(...) + one shift per channel
        skip = x if self.conv_shortcut is None else conv_add(self.conv_shortcut, x)
        return conv_add(self.conv2, group_norm_silu(self.norm2, h), residual=skip)  # skip + conv2(...)


class Downsample2D(nn.Module):
    """A stride-2 3x3 conv. `padding=0` (the autoencoder's) pads only right and bottom, by one."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)  # (B, C, H/2, W/2)


class Upsample2D(nn.Module):
    """Nearest-neighbour upsampling (to `size`, or by 2), then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return conv_add(self.conv, x)


class GEGLU(nn.Module):
    """The transformer blocks' feed-forward: proj -> [h, gate]; h * GELU(gate) -> out (Shazeer 2020)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * mult * dim)
        self.out = nn.Linear(mult * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.out, linear_geglu(self.proj, x))  # proj -> [h, gate] (B, N, 4 dim) each; h * GELU(gate)


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm residual block over the image positions: self-attention, cross-attention to the text,
    GEGLU feed-forward."""

    def __init__(self, dim: int, context_dim: int, heads: int, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, qkv_bias=False)  # mmlm's one attention: fused q/k/v
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, N, dim), context (B, T, context_dim) -> (B, N, dim)."""
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2D(nn.Module):
    """GroupNorm, proj_in (1x1 conv, or linear over the flattened positions: SD 2.x), transformer blocks over the
    H*W positions, proj_out back; plus the input (diffusers' `Transformer2DModel`, continuous input)."""

    def __init__(self, ch: int, context_dim: int, heads: int, layers: int, groups: int, linear: bool, upcast: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(ch, context_dim, heads, upcast) for _ in range(layers))
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W), context (B, T, D) -> (B, C, H, W)."""
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = conv_add(self.proj_in, h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, N, C): one token per position
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            return conv_add(self.proj_out, h, residual=x)  # x + proj_out(h)
        return x + h


class DownBlock2D(nn.Module):
    """A level of the encoder half: `layers` resnets, each optionally followed by a Transformer2D
    (CrossAttnDownBlock2D when `attn_heads` is given), then a stride-2 conv unless it is the last level.
    Returns the output and every intermediate state (the skips the up half reads)."""

    def __init__(self, in_ch: int, out_ch: int, cfg: UNetConfig, attn_heads: int | None, downsample: bool):
        super().__init__()
        groups, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, temb, groups, eps)
                                     for j in range(cfg.layers_per_block))
        self.attentions = None if attn_heads is None else nn.ModuleList(
            Transformer2D(out_ch, cfg.cross_attention_dim, attn_heads, cfg.transformer_layers_per_block, groups,
                          cfg.use_linear_projection, cfg.upcast_attention) for _ in range(cfg.layers_per_block))
        self.downsample = Downsample2D(out_ch) if downsample else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = []
        for j, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, skips


class CrossAttnDownBlock2D(DownBlock2D):
    """A DownBlock2D with a Transformer2D after each resnet."""


class UpBlock2D(nn.Module):
    """A level of the decoder half: `layers + 1` resnets, each reading the running state concatenated with one
    skip from the mirror level (popped last first), each optionally followed by a Transformer2D
    (CrossAttnUpBlock2D), then nearest upsampling + conv unless it is the last level."""

    def __init__(self, prev_ch: int, out_ch: int, skip_in_ch: int, cfg: UNetConfig, attn_heads: int | None, upsample: bool):
        super().__init__()
        groups, eps, temb, n = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim, cfg.layers_per_block + 1
        # skip widths: this level's outputs, and last the state that entered this level on the way down
        self.resnets = nn.ModuleList(
            ResnetBlock2D((prev_ch if j == 0 else out_ch) + (skip_in_ch if j == n - 1 else out_ch), out_ch, temb, groups, eps)
            for j in range(n))
        self.attentions = None if attn_heads is None else nn.ModuleList(
            Transformer2D(out_ch, cfg.cross_attention_dim, attn_heads, cfg.transformer_layers_per_block, groups,
                          cfg.use_linear_projection, cfg.upcast_attention) for _ in range(n))
        self.upsample = Upsample2D(out_ch) if upsample else None

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor], temb: torch.Tensor, context: torch.Tensor,
                size: tuple[int, int] | None = None) -> torch.Tensor:
        for j, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)  # (B, C + C_skip, H, W) -> (B, out_ch, H, W)
            if self.attentions is not None:
                x = self.attentions[j](x, context)
        if self.upsample is not None:
            x = self.upsample(x, size)
        return x


class CrossAttnUpBlock2D(UpBlock2D):
    """An UpBlock2D with a Transformer2D after each resnet."""


class UNetMidBlock2DCrossAttn(nn.Module):
    """The bottom of the U: resnet, then (Transformer2D, resnet) at the lowest resolution."""

    def __init__(self, ch: int, cfg: UNetConfig, heads: int):
        super().__init__()
        groups, eps, temb = cfg.norm_num_groups, cfg.norm_eps, cfg.time_embed_dim
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, temb, groups, eps) for _ in range(2))
        self.attentions = nn.ModuleList([Transformer2D(ch, cfg.cross_attention_dim, heads, cfg.transformer_layers_per_block,
                                                       groups, cfg.use_linear_projection, cfg.upcast_attention)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


class UNet2DConditionModel(nn.Module):
    """The whole UNet: `unet(sample, timestep, encoder_hidden_states)` -> the prediction, shaped like `sample`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        chs, heads, n = cfg.block_out_channels, cfg.level_heads, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chs[0], cfg.time_embed_dim)
        self.add_embedding = (TextTimeEmbedding(cfg.cross_attention_dim, cfg.time_embed_dim, cfg.addition_embed_type_num_heads)
                              if cfg.addition_embed_type == "text" else None)
        self.down_blocks = nn.ModuleList()
        for i in range(n):
            block = CrossAttnDownBlock2D if cfg.cross_attention[i] else DownBlock2D
            self.down_blocks.append(block(chs[max(i - 1, 0)], chs[i], cfg, heads[i] if cfg.cross_attention[i] else None,
                                          downsample=i < n - 1))
        self.mid_block = UNetMidBlock2DCrossAttn(chs[-1], cfg, heads[-1])
        self.up_blocks = nn.ModuleList()
        for i in range(n):  # i = 0 is the lowest resolution: the mirror of down level n - 1 - i
            level = n - 1 - i
            block = CrossAttnUpBlock2D if cfg.cross_attention[level] else UpBlock2D
            self.up_blocks.append(block(chs[min(level + 1, n - 1)], chs[level], chs[max(level - 1, 0)], cfg,
                                        heads[level] if cfg.cross_attention[level] else None, upsample=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chs[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chs[0], cfg.out_channels, 3, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample (B, C, H, W), timestep (a number, or (B,)), encoder_hidden_states (B, T, D) -> (B, C_out, H, W)."""
        cfg = self.cfg
        if sample.dim() != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"sample must be (B, {cfg.in_channels}, H, W), got {tuple(sample.shape)}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[-1] != cfg.cross_attention_dim:
            raise ValueError(f"encoder_hidden_states must be (B, T, {cfg.cross_attention_dim}), "
                             f"got {tuple(encoder_hidden_states.shape)}")
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(sample.shape[0])  # (B,)
        temb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                                      cfg.freq_shift).to(sample.dtype))  # (B, 4 c0)
        if self.add_embedding is not None:  # the pooled prompt joins the timestep: every resnet sees both
            temb = temb + self.add_embedding(encoder_hidden_states)
        x = self.conv_in(conv_layout(sample))  # (B, c0, H, W)
        skips = [x]
        for block in self.down_blocks:
            x, level_skips = block(x, temb, encoder_hidden_states)
            skips += level_skips
        x = self.mid_block(x, temb, encoder_hidden_states)
        for i, block in enumerate(self.up_blocks):
            level_skips = skips[-len(block.resnets):]
            del skips[-len(block.resnets):]
            size = tuple(skips[-1].shape[-2:]) if skips else None  # upsample to the next level's size exactly
            x = block(x, level_skips, temb, encoder_hidden_states, size)
        return self.conv_out(group_norm_silu(self.conv_norm_out, x))
