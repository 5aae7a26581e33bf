"""The audio tower: an Audio Spectrogram Transformer (AST) over log-mel features, and an audio-text CLIP.

    features (B, T, F) --as an image (B, 1, F, T)--> overlapping p x p patches, stride (f_stride, t_stride)
        --conv--> (B, L, D) --[cls, dist] + patches + positions--> (B, 2 + L, D) --blocks, LayerNorm-->
        last_hidden_state (B, 2 + L, D) --mean of the two tokens--> pooler_output (B, D) --proj--> (B, E)

Reference: Gong et al. 2021 ("AST: Audio Spectrogram Transformer"), a DeiT over spectrograms: it keeps DeiT's
distillation token beside the class token and pools the average of both. Outputs equal transformers'
`ASTModel` / `ASTForAudioClassification` (tests/test_audio.py); `mmlm.load` opens their directories. The blocks
are mmlm's one pre-norm Transformer (the same Attention and Block as CLIP's towers and the LLM).

The features come from `data/fbank.py` (Kaldi log-mel, as transformers' ASTFeatureExtractor makes them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ASTConfig, AudioCLIPConfig
from .blocks import Transformer
from .clip import CLIP, CLIPOutput
from .text import TextTransformer


@dataclass
class ASTOutput:
    last_hidden_state: torch.Tensor  # (B, 2 + L, D): class, distillation, then patch tokens, after the LayerNorm
    pooler_output: torch.Tensor  # (B, D): the mean of the class and distillation tokens
    logits: torch.Tensor | None = None  # (B, num_labels) when the config has a classification head


class ASTHead(nn.Module):
    """ASTForAudioClassification's head: LayerNorm, then one linear layer to the labels."""

    def __init__(self, width: int, num_labels: int, eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=eps)
        self.dense = nn.Linear(width, num_labels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(self.norm(x))


class AudioSpectrogramTransformer(nn.Module):
    def __init__(self, cfg: ASTConfig, embed_dim: int | None = None):
        """embed_dim given: a CLIP audio tower with a projection (`embed`); else transformers' ASTModel."""
        super().__init__()
        self.config = cfg
        w = cfg.width
        # patches overlap when a stride is below patch_size (AST: 16 x 16 patches every 10 bins / 10 frames)
        self.patch_embed = nn.Conv2d(1, w, kernel_size=cfg.patch_size, stride=(cfg.frequency_stride, cfg.time_stride))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, w))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, w))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 2, w))
        self.transformer = Transformer(w, cfg.layers, cfg.heads, cfg.mlp_dim, cfg.act, cfg.norm_eps, cfg.qkv_bias)
        self.norm = nn.LayerNorm(w, eps=cfg.norm_eps)
        self.head = ASTHead(w, cfg.num_labels, cfg.norm_eps) if cfg.num_labels else None
        self.proj = nn.Linear(w, embed_dim, bias=False) if embed_dim is not None else None
        self.init_weights()

    def init_weights(self) -> None:
        """transformers' AST init: linear/conv weights ~ N(0, 0.02) (truncated), biases 0, tokens and positions 0.
        A CLIP audio tower's projection ~ N(0, width^-1/2), as CLIP's image tower."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=self.config.width**-0.5)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, F) log-mel features -> (B, 2 + L, D) tokens with positions."""
        cfg = self.config
        if features.dim() != 3 or features.shape[1:] != (cfg.max_length, cfg.num_mel_bins):
            raise ValueError(f"audio features must be (B, {cfg.max_length} frames, {cfg.num_mel_bins} mel bins), "
                             f"got shape {tuple(features.shape)}")
        x = features.transpose(1, 2).unsqueeze(1)  # (B, 1, F, T): frequency up, time across, like a picture
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, Fp * Tp, D), frequency-major
        tokens = torch.cat([self.cls_token, self.dist_token]).to(x.dtype).transpose(0, 1)  # (1, 2, D)
        x = torch.cat([tokens.expand(x.shape[0], -1, -1), x], dim=1)  # (B, 2 + L, D)
        return x + self.pos_embed.to(x.dtype)

    def forward(self, input_values: torch.Tensor) -> ASTOutput:
        """(B, T, F) -> ASTOutput (== transformers' ASTModel / ASTForAudioClassification outputs)."""
        x = self.norm(self.transformer(self.embed(input_values)))  # (B, 2 + L, D)
        pooled = (x[:, 0] + x[:, 1]) / 2  # (B, D): class and distillation token, averaged
        return ASTOutput(x, pooled, None if self.head is None else self.head(pooled))

    def encode(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, F) -> (B, E): the pooled tokens, projected (a CLIP audio tower)."""
        if self.proj is None:
            raise ValueError("this AST has no projection (it is a bare ASTModel): wrap it in an AudioCLIP")
        return self.proj(self.forward(features).pooler_output)


class AudioCLIP(nn.Module):
    """Audio-text CLIP: the AST's pooled tokens and the text tower's, projected into one space."""

    def __init__(self, cfg: AudioCLIPConfig):
        super().__init__()
        self.config = cfg
        self.audio = AudioSpectrogramTransformer(cfg.audio, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.logit_scale_init)))
        self.logit_bias = None if cfg.logit_bias_init is None else nn.Parameter(torch.tensor(float(cfg.logit_bias_init)))
        self.text.init_weights()

    @classmethod
    def from_pretrained_towers(cls, cfg: AudioCLIPConfig, ast: AudioSpectrogramTransformer | None = None,
                               text: nn.Module | None = None) -> "AudioCLIP":
        """A new AudioCLIP whose audio tower starts from a loaded AST (e.g. `mmlm.load(hf_ast_dir)`) and whose
        text tower starts from an image CLIP's `text` (when given); the projections stay fresh."""
        model = cls(cfg)
        if ast is not None:
            sd = {k: v for k, v in ast.state_dict().items() if not k.startswith("head.")}
            missing, unexpected = model.audio.load_state_dict(sd, strict=False)
            if unexpected or missing != ["proj.weight"]:
                raise ValueError(f"the AST does not fit audio tower config: missing {missing}, unexpected {unexpected}")
        if text is not None:
            model.text.load_state_dict(text.state_dict())
        return model

    def encode_audio(self, features: torch.Tensor) -> torch.Tensor:
        """(B, T, F) log-mel features -> (B, E), projected, not normalised."""
        return self.audio.encode(features)

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(N, T) -> (N, E), projected, not normalised."""
        return self.text(input_ids, attention_mask)

    logits = CLIP.logits  # the same scaled cosine similarities (+ bias) as an image CLIP

    def forward(self, audio_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> CLIPOutput:
        """Clips (N, T, F) against texts; the image fields of the output hold the clips'."""
        audio_embeds = F.normalize(self.encode_audio(audio_values), dim=-1)
        text_embeds = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits = self.logits(audio_embeds, text_embeds)
        return CLIPOutput(logits, logits.t(), audio_embeds, text_embeds)
