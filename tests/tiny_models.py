"""Tiny, randomly initialised diffusers folders for fast tests of the editing mechanics.

They have exactly the folder format of real InstructPix2Pix / Stable Diffusion checkpoints (stock
pipelines load them), but a character-level CLIP tokenizer (512 byte tokens, no merges) so that they
build in well under a second without the shipped vocabulary. They produce noise, not edits: quality
is tested on the shipped models, mechanics here.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

RESOLUTION = 32
_CROSS_DIM = 32


def _bytes_to_unicode() -> list[str]:
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


def build_tokenizer(folder: Path) -> CLIPTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    units = _bytes_to_unicode()
    vocab = units + [u + "</w>" for u in units] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=77)


def _components(in_channels: int, seed: int, tmp: Path) -> dict:
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(tmp / "_tok")
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=_CROSS_DIM,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=len(tokenizer) - 2,
            eos_token_id=len(tokenizer) - 1,
            pad_token_id=len(tokenizer) - 1,
        )
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RESOLUTION,
    )
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=in_channels,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=_CROSS_DIM,
        attention_head_dim=8,
        norm_num_groups=4,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="sample",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def _save(pipeline_cls, in_channels: int, folder: Path, seed: int, spec: dict) -> Path:
    pipe = pipeline_cls(
        **_components(in_channels, seed, folder.parent),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    spec = {"model": folder.name, "resolution": RESOLUTION, **spec, "edits": []}
    (folder / "edits.json").write_text(json.dumps(spec, indent=2))
    return folder


def build_tiny_ip2p(folder: Path, seed: int = 0) -> Path:
    """Save a random InstructPix2Pix-format folder (8-channel UNet) with an edits.json."""
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "image_guidance_scale": 1.5}
    return _save(StableDiffusionInstructPix2PixPipeline, 8, folder, seed, {"defaults": defaults})


def build_tiny_t2i(folder: Path, seed: int = 0) -> Path:
    """Save a random Stable-Diffusion-format folder (4-channel UNet) with an edits.json."""
    defaults = {"num_inference_steps": 4, "guidance_scale": 3.0, "image_guidance_scale": 1.0}
    return _save(StableDiffusionPipeline, 4, folder, seed, {"defaults": defaults, "base_caption": "a photo"})
