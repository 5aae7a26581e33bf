"""Tiny random CLIP (image, video, audio), LLaVA and text-to-image checkpoints, for the server's tests and load
benchmark (seconds to build).

Their answers are noise; they exercise every code path of the server at the real models' shapes of data.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import save
from ..config import (ASTConfig, AudioCLIPConfig, CLIPConfig, LlavaConfig, LMConfig, TemporalConfig, TextConfig,
                      VideoCLIPConfig, ViTConfig)
from ..data.transforms import PreprocessConfig
from ..tokenizer import Tokenizer

WORDS = ("a photo of a red green blue yellow purple orange cyan white circle square triangle star cross diamond "
         "hexagon pentagon small large top left right bottom center what shape colour is in the image there "
         "how many objects describe A chat between a curious user and an artificial intelligence assistant. "
         "USER: ASSISTANT: yes no one two three").split()


def word_corpus() -> list[str]:
    """400 random 12-word sentences over WORDS (a fixed seed): text to fit the tiny tokenizers on."""
    g = torch.Generator().manual_seed(0)
    return [" ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=g).tolist()) for _ in range(400)]


def tiny_llava(directory: str | Path, max_seq_len: int = 512, media: bool = False, connector: str = "llava") -> Path:
    """A LLaVA (ViT 32 px, patch 8 -> 16 image tokens; a 2-layer LM) with a byte-level tokenizer. `media`: it reads
    video (tiny_video_clip's frame tower, 4 frames of a class token and 2x2 cells) and sound (tiny_audio_clip's AST, 2x3 cells) too.
    `connector` "flamingo": 4 latents per item through gated cross-attention (gates open: the media matter)."""
    specials = ["<s>", "</s>", "<image>"] + (["<video>", "<audio>"] if media else [])
    tok = Tokenizer.train_byte_level(word_corpus(), vocab_size=320, special_tokens=specials)
    extra = {}
    if media:
        extra = dict(video=ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4), video_frames=4,
                     video_grid=2, video_token_id=tok.tokenizer.token_to_id("<video>"), audio=_tiny_ast(),
                     audio_grid=[2, 3], audio_token_id=tok.tokenizer.token_to_id("<audio>"))
    cfg = LlavaConfig(vision=ViTConfig(image_size=32, patch_size=8, width=32, layers=2, heads=4),
                      lm=LMConfig(vocab_size=tok.vocab_size, width=48, layers=2, heads=4, kv_heads=2, mlp_dim=96,
                                  max_seq_len=max_seq_len, eos_token_id=tok.eot_id),
                      image_token_id=tok.tokenizer.token_to_id("<image>"), connector=connector,
                      flamingo={"latents": 4, "resampler_depth": 1, "resampler_heads": 2, "resampler_head_dim": 8,
                                "only_last_media": False} if connector == "flamingo" else None, **extra)
    from ..models.llava import Llava

    torch.manual_seed(0)
    model = Llava(cfg)
    with torch.no_grad():  # larger weights: a random model's answers then depend on the prompt and vary in length
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10.0)
        for block in model.flamingo.cross if model.flamingo is not None else []:
            block.alpha_cross_attn.fill_(1.0)
            block.alpha_dense.fill_(1.0)
    return save(model, directory, tokenizer=tok, preprocess=PreprocessConfig(image_size=32, mode="pad_square"))


def tiny_clip(directory: str | Path) -> Path:
    """A CLIP (ViT 32 px, 2-layer text tower, embed 32) with a CLIP-style BPE tokenizer."""
    tok = Tokenizer.train_bpe(word_corpus(), vocab_size=600, context_length=16)
    cfg = CLIPConfig(embed_dim=32, vision=ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
                     text=TextConfig(vocab_size=tok.vocab_size, eot_token_id=tok.eot_id, context_length=16, width=64,
                                     layers=2, heads=4))
    from ..models.clip import CLIP

    torch.manual_seed(0)
    return save(CLIP(cfg), directory, tokenizer=tok, preprocess=PreprocessConfig(image_size=32))


def tiny_video_clip(directory: str | Path, frames: int = 4) -> Path:
    """A video CLIP (tiny_clip's towers, 32 px frames, `frames` frames fused by a 1-layer temporal Transformer)."""
    tok = Tokenizer.train_bpe(word_corpus(), vocab_size=600, context_length=16)
    cfg = VideoCLIPConfig(embed_dim=32, vision=ViTConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
                          text=TextConfig(vocab_size=tok.vocab_size, eot_token_id=tok.eot_id, context_length=16,
                                          width=64, layers=2, heads=4),
                          temporal=TemporalConfig(fusion="transformer", frames=frames, layers=1, heads=2))
    from ..models.video import VideoCLIP

    torch.manual_seed(0)
    return save(VideoCLIP(cfg), directory, tokenizer=tok, preprocess=PreprocessConfig(image_size=32))


def _tiny_ast() -> ASTConfig:
    return ASTConfig(num_mel_bins=32, max_length=50, patch_size=8, frequency_stride=8, time_stride=8, width=32,
                     layers=1, heads=4)


def tiny_audio_clip(directory: str | Path) -> Path:
    """An audio CLIP (a 1-layer AST over 0.5 s of 32-bin log-mel features at 16 kHz, a 2-layer text tower)."""
    tok = Tokenizer.train_bpe(word_corpus(), vocab_size=600, context_length=16)
    cfg = AudioCLIPConfig(embed_dim=32, audio=_tiny_ast(),
                          text=TextConfig(vocab_size=tok.vocab_size, eot_token_id=tok.eot_id, context_length=16,
                                          width=64, layers=2, heads=4))
    from ..models.audio import AudioCLIP

    torch.manual_seed(0)
    return save(AudioCLIP(cfg), directory, tokenizer=tok)


def tiny_text_to_image(directory: str | Path) -> Path:
    """A pixel-space text-to-image model (16 px, a 2-level UNet, a 1-layer text tower) with a CLIP-style BPE."""
    from ..diffusion_config import DiffusionConfig, NoiseScheduleConfig, UNetConfig
    from ..models.diffusion import TextToImage

    tok = Tokenizer.train_bpe(word_corpus(), vocab_size=600, context_length=16)
    cfg = DiffusionConfig(text=TextConfig(vocab_size=tok.vocab_size, eot_token_id=tok.eot_id, context_length=16,
                                          width=32, layers=1, heads=2),
                          unet=UNetConfig(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                                          cross_attention=(False, True), layers_per_block=1, heads=2,
                                          cross_attention_dim=0, norm_num_groups=8),
                          vae=None, scheduler=NoiseScheduleConfig(beta_schedule="linear", beta_start=1e-4,
                                                                  beta_end=0.02, steps_offset=0,
                                                                  timestep_spacing="trailing"))
    torch.manual_seed(0)
    model = TextToImage(cfg)
    model.text_encoder.init_weights()
    return save(model, directory, tokenizer=tok,
                preprocess=PreprocessConfig(image_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5)))
