"""Video CLIP: CLIP's image tower applied to every frame, then the frame features fused over time.

    frames (B, T, C, H, W) --flatten--> (B*T, C, H, W) --image tower--> (B*T, E) --unflatten--> (B, T, E)
        --temporal fusion--> (B, E)      compared with the text tower's (B, E) exactly as an image is

Reference: ActionCLIP (Wang et al. 2021, `visual_prompt.py`): "meanP" averages the frame features, "Transf"
adds frame position embeddings, runs a small Transformer over the T frame vectors, adds the result back to the
frame features and averages. Both fuse *after* the image tower's projection, in the shared space: for the mean
that loses nothing (a linear projection commutes with an average), and it lets any image CLIP serve as the frame
encoder unchanged. A video of one frame with mean fusion is then exactly the image CLIP's feature.

Every weight of the image CLIP keeps its name here (`visual.*`, `text.*`, `logit_scale`); only `temporal.*` is
new, so `VideoCLIP.from_image_clip` starts from any image CLIP mmlm loads (OpenAI, open_clip, transformers).
To train with the frame encoder frozen (LiT-style), lock the image tower (`lock.image: true` in a recipe).
"""

from __future__ import annotations

from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import nn

from ..config import CLIPConfig, TemporalConfig, VideoCLIPConfig
from .blocks import Transformer
from .clip import CLIP, CLIPOutput


class TemporalFusion(nn.Module):
    """Frame features (B, T, E) -> one vector per video (B, E): the mean, or ActionCLIP's temporal Transformer."""

    def __init__(self, cfg: TemporalConfig, dim: int):
        super().__init__()
        self.cfg = cfg
        if cfg.fusion == "transformer":
            self.frame_pos = nn.Parameter(torch.zeros(cfg.frames, dim))  # one learned vector per frame index
            self.transformer = Transformer(dim, cfg.layers, cfg.heads, 4 * dim, cfg.act, 1e-5)
            self.init_weights()

    def init_weights(self) -> None:
        """ActionCLIP's init (weights ~ N(0, 0.02), biases 0, LayerNorms the identity) except the frame positions,
        ~ N(0, 1): at ActionCLIP's 0.02 a position is ~1% of a frame feature (norm ~10) once the first LayerNorm has
        scaled them together, and a 15-minute run never learned to read the order (a clip and its reverse gave
        cosine 0.999; growing and shrinking at chance). At N(0, 1) both are told apart from the first evaluation."""
        if self.cfg.fusion != "transformer":
            return
        nn.init.normal_(self.frame_pos, std=1.0)
        for m in self.transformer.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, E) -> (B, E)."""
        if self.cfg.fusion == "transformer":
            T = x.shape[1]
            if T > self.cfg.frames:
                raise ValueError(f"a video of {T} frames is longer than the {self.cfg.frames} frame positions "
                                 "this model has (temporal.frames)")
            # the frames attend to each other; their positions tell first from last (mean pooling cannot)
            x = x + self.transformer(x + self.frame_pos[:T].to(x.dtype))  # (B, T, E), residual to the frames
        return x.mean(dim=1)  # (B, E)


class VideoCLIP(CLIP):
    """A CLIP that also encodes videos; `encode_image`, `encode_text` and `logits` are the image CLIP's."""

    def __init__(self, cfg: VideoCLIPConfig):
        super().__init__(cfg)
        self.temporal = TemporalFusion(cfg.temporal, cfg.embed_dim)

    def init_weights(self) -> None:
        super().init_weights()
        if hasattr(self, "temporal"):  # CLIP.__init__ calls this before the temporal part exists
            self.temporal.init_weights()

    @classmethod
    def from_image_clip(cls, clip: CLIP, temporal: TemporalConfig | None = None) -> "VideoCLIP":
        """A video CLIP whose frame encoder, text tower and temperature are `clip`'s (copied); the temporal
        part is freshly initialised."""
        base = {f.name: getattr(clip.config, f.name) for f in fields(CLIPConfig) if f.name != "kind"}
        model = cls(VideoCLIPConfig(**base, temporal=temporal or TemporalConfig()))
        missing, unexpected = model.load_state_dict(clip.state_dict(), strict=False)
        if unexpected or any(not name.startswith("temporal.") for name in missing):
            raise ValueError(f"the image CLIP does not fit the video CLIP: missing {missing}, unexpected {unexpected}")
        return model.to(next(clip.parameters()).dtype)

    def encode_video(self, frames: torch.Tensor) -> torch.Tensor:
        """(B, T, C, H, W) preprocessed frames -> (B, E), projected, not normalised."""
        if frames.dim() != 5:
            raise ValueError(f"video frames must be (B, T, C, H, W), got shape {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        x = self.visual(frames.flatten(0, 1))  # (B*T, E): every frame through the image tower at once
        return self.temporal(x.unflatten(0, (B, T)))  # (B, T, E) -> (B, E)

    def forward(self, pixel_values: torch.Tensor | None = None, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, video_values: torch.Tensor | None = None) -> CLIPOutput:
        """Images (N, C, H, W) or videos `video_values` (N, T, C, H, W) against texts: the image fields of the
        output then hold the videos'."""
        if (pixel_values is None) == (video_values is None):
            raise ValueError("pass exactly one of pixel_values (images) and video_values (videos)")
        if video_values is None:
            return super().forward(pixel_values, input_ids, attention_mask)
        video_embeds = F.normalize(self.encode_video(video_values), dim=-1)
        text_embeds = F.normalize(self.encode_text(input_ids, attention_mask), dim=-1)
        logits = self.logits(video_embeds, text_embeds)
        return CLIPOutput(logits, logits.t(), video_embeds, text_embeds)
