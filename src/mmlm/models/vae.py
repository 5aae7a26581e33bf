"""Stable Diffusion's KL autoencoder (matches diffusers' `AutoencoderKL`): the latent space the UNet works in.

    encode: x (B, 3, H, W) -> Encoder -> quant_conv -> (mean, logvar), each (B, L, H/f, W/f)   (f = 2^(levels-1))
            a latent z = mean + exp(logvar / 2) * noise, times `scaling_factor` before the UNet sees it
    decode: z (B, L, H/f, W/f) -> post_quant_conv -> Decoder -> (B, 3, H, W), pixels in about [-1, 1]
"""

from __future__ import annotations

import torch
from torch import nn

from ..diffusion_config import VAEConfig
from .attention import Attention
from .kernels import conv_layout, group_norm_silu
from .unet import Downsample2D, ResnetBlock2D, Upsample2D

EPS = 1e-6  # the autoencoder's GroupNorm epsilon


class SpatialSelfAttention(nn.Module):
    """One-head self-attention over the H*W positions, GroupNorm first, plus the input."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=EPS)
        self.attn = Attention(ch, 1)  # mmlm's one attention: fused q/k/v, with biases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        h = self.attn(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)


class UNetMidBlock2D(nn.Module):
    """resnet, (self-attention), resnet at the lowest resolution; no timestep."""

    def __init__(self, ch: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(ch, ch, None, groups, EPS) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(ch, groups)]) if add_attention else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    """diffusers' DownEncoderBlock2D: resnets, then a stride-2 conv (padded right and bottom) unless last."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, EPS) for j in range(layers))
        self.downsample = Downsample2D(out_ch, padding=0) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsample is None else self.downsample(x)


class DecoderBlock(nn.Module):
    """diffusers' UpDecoderBlock2D: resnets, then nearest upsampling + conv unless last."""

    def __init__(self, in_ch: int, out_ch: int, layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(in_ch if j == 0 else out_ch, out_ch, None, groups, EPS) for j in range(layers))
        self.upsample = Upsample2D(out_ch) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsample is None else self.upsample(x)


class Encoder(nn.Module):
    """conv_in, a block per level (downsampling between), mid block, GroupNorm, SiLU, conv_out to 2 L channels."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, n, g = cfg.block_out_channels, len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(EncoderBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block, g, i < n - 1)
                                         for i in range(n))
        self.mid_block = UNetMidBlock2D(chs[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(group_norm_silu(self.conv_norm_out, self.mid_block(x)))


class Decoder(nn.Module):
    """conv_in from L channels, mid block, a block per level (upsampling between), GroupNorm, SiLU, conv_out."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, n, g = cfg.block_out_channels[::-1], len(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid_block = UNetMidBlock2D(chs[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(DecoderBlock(chs[max(i - 1, 0)], chs[i], cfg.layers_per_block + 1, g, i < n - 1)
                                       for i in range(n))
        self.conv_norm_out = nn.GroupNorm(g, chs[-1], eps=EPS)
        self.conv_out = nn.Conv2d(chs[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(group_norm_silu(self.conv_norm_out, x))


class AutoencoderKL(nn.Module):
    """`encode(x) -> (mean, logvar)` of the diagonal Gaussian over latents; `decode(z) -> x`."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        L = cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * L, 2 * L, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(L, L, 1) if cfg.use_post_quant_conv else None

    @property
    def config(self) -> VAEConfig:  # what checkpoint.save writes to config.json
        return self.cfg

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> mean, logvar (B, L, H/f, W/f); logvar clamped to [-30, 20] as diffusers'."""
        if x.dim() != 4 or x.shape[1] != self.cfg.in_channels:
            raise ValueError(f"x must be (B, {self.cfg.in_channels}, H, W), got {tuple(x.shape)}")
        moments = self.encoder(conv_layout(x))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """A draw from the diagonal Gaussian: mean + std * noise."""
        device = generator.device if generator is not None else mean.device  # a CPU generator serves a GPU run
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=device).to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, L, h, w) (unscaled: divide the UNet's latents by `scaling_factor` first) -> (B, C, h f, w f)."""
        if z.dim() != 4 or z.shape[1] != self.cfg.latent_channels:
            raise ValueError(f"z must be (B, {self.cfg.latent_channels}, h, w), got {tuple(z.shape)}")
        z = conv_layout(z)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
