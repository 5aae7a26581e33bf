"""CLIP's ModifiedResNet (matches OpenAI `clip/model.py` and open_clip `modified_resnet.py`).

Differences from torchvision's ResNet, all from the CLIP paper: a 3-conv stem with an average pool
instead of a max pool; strided convolutions replaced by stride-1 convolutions followed by an average
pool ("anti-aliased"); and a final attention pool (a single multi-head attention layer whose query is
the mean of the feature map) instead of global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import ModifiedResNetConfig
from .attention import Attention
from .kernels import conv_bn, conv_layout


class Downsample(nn.Module):
    """The shortcut of a block that changes resolution or width: avg-pool, then a 1x1 conv + BN."""

    def __init__(self, inplanes: int, outplanes: int, stride: int, eps: float):
        super().__init__()
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv = nn.Conv2d(inplanes, outplanes, 1, bias=False)
        self.bn = nn.BatchNorm2d(outplanes, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return conv_bn(self.pool(x), self.conv, self.bn)  # bn(conv(pool(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int, eps: float):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, eps=eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=eps)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        needs_shortcut = stride > 1 or inplanes != planes * self.expansion
        self.downsample = Downsample(inplanes, planes * self.expansion, stride, eps) if needs_shortcut else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(conv_bn(x, self.conv1, self.bn1))  # conv_bn(x, conv, bn) = bn(conv(x))
        out = self.relu(conv_bn(out, self.conv2, self.bn2))
        out = conv_bn(self.pool(out), self.conv3, self.bn3)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class AttentionPool2d(nn.Module):
    """One attention layer over the feature map, queried by its mean token; projects to embed_dim."""

    def __init__(self, grid: int, dim: int, heads: int, out_dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(grid * grid + 1, dim) / dim**0.5)
        self.attn = Attention(dim, heads, out_dim=out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.pos_embed.to(x.dtype)  # (B, 1 + HW, C)
        # Every position attends, but only the mean token's output is kept (OpenAI queries with x[:1]).
        return self.attn(x)[:, 0]


class ModifiedResNet(nn.Module):
    """`embed_dim=None` builds the trunk without the attention pool (a LLaVA tower reads the feature maps)."""

    def __init__(self, cfg: ModifiedResNetConfig, embed_dim: int | None):
        super().__init__()
        self.cfg = cfg
        w, eps = cfg.width, cfg.norm_eps
        self.conv1 = nn.Conv2d(3, w // 2, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w // 2, eps=eps)
        self.conv2 = nn.Conv2d(w // 2, w // 2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(w // 2, eps=eps)
        self.conv3 = nn.Conv2d(w // 2, w, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(w, eps=eps)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.AvgPool2d(2)
        inplanes = w
        stages = []
        for i, depth in enumerate(cfg.layers):
            planes = w * 2**i
            blocks = [Bottleneck(inplanes, planes, 1 if i == 0 else 2, eps)]
            inplanes = planes * Bottleneck.expansion
            blocks += [Bottleneck(inplanes, planes, 1, eps) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.attn_pool = AttentionPool2d(cfg.grid, cfg.feature_dim, cfg.heads, embed_dim) if embed_dim else None

    def init_weights(self) -> None:
        """OpenAI's init: attention-pool projections ~ N(0, C^-1/2); each block's last BN starts at zero."""
        std = self.cfg.feature_dim**-0.5
        if self.attn_pool is not None:
            nn.init.normal_(self.attn_pool.attn.qkv.weight, std=std)
            nn.init.normal_(self.attn_pool.attn.proj.weight, std=std)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                nn.init.zeros_(block.bn3.weight)

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, 32 * width, H / 32, W / 32) feature map before the attention pool."""
        return self.forward_stages(pixel_values)[-1]

    def forward_stages(self, pixel_values: torch.Tensor, upto: int = 4) -> list[torch.Tensor]:
        """The stem's feature map (stride 4), then stages 1..`upto`'s (strides 4, 8, 16, 32): (B, C_i, H_i, W_i)."""
        x = conv_layout(pixel_values.to(self.conv1.weight.dtype))  # (B, 3, H, W)
        x = self.relu(conv_bn(x, self.conv1, self.bn1))  # relu(bn1(conv1(x)))
        x = self.relu(conv_bn(x, self.conv2, self.bn2))
        x = self.relu(conv_bn(x, self.conv3, self.bn3))
        hidden = [self.pool(x)]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4)[:upto]:
            hidden.append(stage(hidden[-1]))
        return hidden

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, embed_dim)."""
        if pixel_values.shape[-2:] != (self.cfg.image_size, self.cfg.image_size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[-2:])}, the model expects "
                             f"{self.cfg.image_size}x{self.cfg.image_size}")
        return self.attn_pool(self.forward_features(pixel_values))
