"""Train the embedded default models from scratch on CPU: VAE, InstructPix2Pix UNet, text-to-image UNet.

No pretrained diffusion weights are reachable offline, so the project trains small models whose
folders have exactly the layout of real Stable Diffusion / InstructPix2Pix checkpoints. The editor
predicts x0 ("sample"), because epsilon prediction does not converge in CPU-minutes. The
text-to-image model predicts v: its noise estimate near t = 0, which DDIM inversion lives on, is
the network output itself rather than an x0 error scaled by 1/sqrt(1 - alpha). Against an x0
text-to-image model trained on the same data for the same minutes, with the same inversion code, it
retraces photos as well (32.1 vs 31.8 dB) and follows captions better (mean caption swap 21.3 vs
20.1 dB). Self-attention only at <= 16x16 latents, because 32x32 attention is 3-4x slower
on CPU. Everything here is pure torch + diffusers; device and dtype are parameters.
"""

from __future__ import annotations

import gzip
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionInstructPix2PixPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from torch import Tensor
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from editing.instruct.ops import denoising_target
from editing.transforms import EDITS

RESOLUTION = 64
TEXT_HIDDEN = 32
TOKEN_LENGTH = 77
IP2P_DROP = 0.05  # InstructPix2Pix: 5% drop text, 5% drop image, 5% drop both
T2I_DROP = 0.10  # t2i: caption dropped to "" so classifier-free guidance works
T2I_IDENTITY_FRACTION = 0.25  # "a photo" must be learned well: inversion uses it
PREDICTION_TYPES = {"ip2p": "sample", "t2i": "v_prediction"}


# ---------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte-to-unicode table: every byte gets a printable stand-in character."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_tokenizer_from_bpe(bpe_gz: bytes, workdir: Path) -> CLIPTokenizer:
    """The exact OpenAI CLIP tokenizer, rebuilt from open-clip's `bpe_simple_vocab_16e6.txt.gz`.

    model_max_length must be 77: a tokenizer built from files otherwise reports 1e30 and the
    pipelines' padding overflows.
    """
    merges = gzip.decompress(bpe_gz).decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    vocab = list(_bytes_to_unicode().values())
    vocab += [token + "</w>" for token in vocab]
    vocab += ["".join(merge.split()) for merge in merges] + ["<|startoftext|>", "<|endoftext|>"]
    workdir.mkdir(parents=True, exist_ok=True)
    vocab_file, merges_file = workdir / "vocab.json", workdir / "merges.txt"
    vocab_file.write_text(json.dumps({token: i for i, token in enumerate(vocab)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=TOKEN_LENGTH)


def new_vae() -> AutoencoderKL:
    """x2 downsampling, 4 latent channels; no mid-block attention (1024 tokens is slow on CPU)."""
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
        mid_block_add_attention=False,
    )


def new_text_encoder() -> CLIPTextModel:
    """Tiny CLIP text tower; hidden 32 keeps the 49408-token embedding at 6.3 MB."""
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKEN_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def new_unet(kind: str) -> UNet2DConditionModel:
    """Latent 32x32 UNet, 1.66 M parameters; cross-attention only at the 16x16 and 8x8 levels.

    The width is set by the 20 MB folder budget: tokenizer 3.6 MB, text encoder 6.4 MB, VAE 2.5 MB.
    """
    in_channels = {"ip2p": 8, "t2i": 4}[kind]
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 2,
        in_channels=in_channels,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=8,
    )


def training_scheduler(prediction_type: str = "sample") -> DDPMScheduler:
    """DDPM noise schedule used for training (1000 steps, squaredcos_cap_v2)."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        prediction_type=prediction_type,
        clip_sample=False,
    )


def inference_scheduler(prediction_type: str = "sample") -> DDIMScheduler:
    """The scheduler saved in the folders: DDIM accepts x0 and v prediction (Euler Ancestral refuses x0).

    set_alpha_to_one stays False: with x0 prediction the inverse scheduler would otherwise divide
    by sqrt(1 - 1) = 0 at its first step.
    """
    return DDIMScheduler.from_config(
        training_scheduler(prediction_type).config,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


class CropSampler:
    """Random square crops (64 px to the whole photo, log-uniform side) resized to the model size.

    A quarter of every batch is procedural (smooth colour fields with discs) so the edits are
    learned as colour maths, not as properties of the dozen training photos.
    """

    def __init__(
        self,
        photos: list[np.ndarray],
        resolution: int,
        generator: torch.Generator,
        procedural_fraction: float = 0.25,
    ) -> None:
        self.photos = [torch.from_numpy(p).permute(2, 0, 1).float().div(255) for p in photos]
        self.resolution = resolution
        self.generator = generator
        self.procedural_fraction = procedural_fraction

    def _uniform(self) -> float:
        return torch.rand((), generator=self.generator).item()

    def _crop(self) -> Tensor:
        photo = self.photos[int(torch.randint(len(self.photos), (), generator=self.generator))]
        height, width = photo.shape[-2:]
        largest = min(height, width)
        smallest = min(64, largest)
        side = round(math.exp(math.log(smallest) + self._uniform() * math.log(largest / smallest)))
        top = int(torch.randint(height - side + 1, (), generator=self.generator))
        left = int(torch.randint(width - side + 1, (), generator=self.generator))
        crop = photo[:, top : top + side, left : left + side][None]
        crop = F.interpolate(crop, size=(self.resolution,) * 2, mode="bilinear", antialias=True)
        if self._uniform() < 0.5:
            crop = crop.flip(-1)
        return crop.clamp(0, 1)

    def _procedural(self) -> Tensor:
        size = self.resolution
        field_ = torch.rand((1, 3, 4, 4), generator=self.generator)
        image = F.interpolate(field_, size=(size, size), mode="bicubic", align_corners=False)
        ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
        for _ in range(int(torch.randint(1, 5, (), generator=self.generator))):
            centre = torch.rand(2, generator=self.generator) * size
            radius = (0.08 + 0.25 * self._uniform()) * size
            inside = ((ys - centre[0]) ** 2 + (xs - centre[1]) ** 2) < radius**2
            colour = torch.rand((3, 1, 1), generator=self.generator)
            image[0] = torch.where(inside, colour, image[0])
        return image.clamp(0, 1)

    def sample(self, batch_size: int) -> Tensor:
        """(B, 3, R, R) in [0, 1]."""
        n_procedural = round(batch_size * self.procedural_fraction)
        images = [self._procedural() for _ in range(n_procedural)]
        images += [self._crop() for _ in range(batch_size - n_procedural)]
        return torch.cat(images)


def apply_edits(images: Tensor, edit_ids: list[str | None]) -> Tensor:
    """Ground truth per item; None is the identity. Items sharing an edit are processed together."""
    targets = images.clone()
    for edit_id in set(edit_ids) - {None}:
        rows = [i for i, e in enumerate(edit_ids) if e == edit_id]
        targets[rows] = EDITS[edit_id].function(images[rows])
    return targets


# ---------------------------------------------------------------------------------------------
# Training loops
# ---------------------------------------------------------------------------------------------


@dataclass
class TrainLog:
    """What the model card reports about a run: steps, wall time and the loss curve."""

    steps: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)


def _run(
    step_fn: Callable[[int], float],
    minutes: float,
    max_steps: int | None,
    desc: str,
    log_every: int = 50,
) -> TrainLog:
    """Run training steps until the time budget or the step cap; tqdm bar plus a loss line per 50."""
    log = TrainLog()
    deadline = time.monotonic() + 60 * minutes
    start = time.monotonic()
    running: list[float] = []
    with tqdm(total=max_steps, desc=desc, mininterval=5) as bar:
        while time.monotonic() < deadline and (max_steps is None or log.steps < max_steps):
            running.append(step_fn(log.steps))
            log.steps += 1
            bar.update(1)
            if log.steps % log_every == 0:
                mean = float(np.mean(running))
                running.clear()
                log.losses.append((log.steps, mean))
                bar.set_postfix(loss=f"{mean:.4f}")
                tqdm.write(f"{desc} step {log.steps} loss {mean:.5f} ({time.monotonic() - start:.0f} s)")
    log.seconds = time.monotonic() - start
    return log


def train_vae(
    photos: list[np.ndarray],
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    batch_size: int = 32,
    crop: int = 32,
    lr: float = 1e-3,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[AutoencoderKL, TrainLog]:
    """Reconstruction (MSE + L1) with a tiny KL term; sets scaling_factor = 1 / std of the latents."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = CropSampler(photos, RESOLUTION, generator)
    vae = new_vae().to(device=device, dtype=dtype).train()
    optimiser = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / 100))

    def step(_: int) -> float:
        # A random 32 px window of a 64 px image: same scale statistics, a quarter of the compute.
        top, left = (int(torch.randint(RESOLUTION - crop + 1, (), generator=generator)) for _ in range(2))
        x = sampler.sample(batch_size)[..., top : top + crop, left : left + crop]
        x = x.to(device=device, dtype=dtype) * 2 - 1
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=None)).sample
        loss = F.mse_loss(recon, x) + 0.5 * F.l1_loss(recon, x) + 1e-7 * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimiser.step()
        lr_schedule.step()
        return loss.item()

    log = _run(step, minutes, max_steps, "vae")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat(
            [
                vae.encode(sampler.sample(32).to(device=device, dtype=dtype) * 2 - 1).latent_dist.mode()
                for _ in range(8)
            ]
        )
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae, log


def _caption_groups(
    batch_size: int, captions_per_crop: int, generator: torch.Generator
) -> tuple[list[str | None], list[str]]:
    """t2i batches that show each crop under several captions: per group, "a photo" (the crop itself)
    followed by `captions_per_crop - 1` distinct edits. The model then sees what each caption changes
    on the same content, the difference that inversion-based editing samples along.

    Measured (session 8, a 15-minute third sitting on the shipped t2i, 4 captions per crop against
    ordinary batches for the same minutes): no better. On training photos the ordinary sitting
    scored 1.1 dB higher with DDIM+P2P and SimInversion and 0.4 dB with FPE, so the shipped weights
    use ordinary batches. Kept as a lever for larger models."""
    if captions_per_crop < 2 or captions_per_crop > len(EDITS) + 1 or batch_size % captions_per_crop:
        raise ValueError(
            f"captions_per_crop={captions_per_crop} must be 2..{len(EDITS) + 1} and divide the batch "
            f"size {batch_size}"
        )
    edit_ids = list(EDITS)
    chosen: list[str | None] = []
    texts: list[str] = []
    for _ in range(batch_size // captions_per_crop):
        picks = torch.randperm(len(edit_ids), generator=generator)[: captions_per_crop - 1].tolist()
        chosen += [None] + [edit_ids[i] for i in picks]
        texts += ["a photo"] + [EDITS[edit_ids[i]].caption for i in picks]
    return chosen, texts


def _edit_batch(kind: str, batch_size: int, generator: torch.Generator) -> tuple[list[str | None], list[str]]:
    """Per item: which edit (None = identity, t2i only) and the text the model is conditioned on."""
    edit_ids = list(EDITS)
    chosen: list[str | None] = []
    texts: list[str] = []
    for _ in range(batch_size):
        if kind == "t2i" and torch.rand((), generator=generator).item() < T2I_IDENTITY_FRACTION:
            chosen.append(None)
            texts.append("a photo")
            continue
        edit_id = edit_ids[int(torch.randint(len(edit_ids), (), generator=generator))]
        chosen.append(edit_id)
        if kind == "ip2p":
            phrasings = EDITS[edit_id].phrasings
            texts.append(phrasings[int(torch.randint(len(phrasings), (), generator=generator))])
        else:
            texts.append(EDITS[edit_id].caption)
    return chosen, texts


def train_unet(
    kind: str,
    vae: AutoencoderKL,
    tokenizer: CLIPTokenizer,
    photos: list[np.ndarray],
    minutes: float,
    seed: int,
    max_steps: int | None = None,
    batch_size: int = 32,
    lr: float = 5e-4,
    resume_from: Path | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    prediction_type: str | None = None,
    captions_per_crop: int = 1,
) -> tuple[UNet2DConditionModel, CLIPTextModel, TrainLog]:
    """Jointly train a UNet and the text encoder on latents of the frozen VAE, predicting
    `prediction_type` (default `PREDICTION_TYPES[kind]`; "sample" = x0, "v_prediction" or "epsilon").

    ip2p: input = noisy target latent (scaled) + source latent (unscaled `mode()`, exactly what the
    stock pipeline feeds), with InstructPix2Pix condition dropout. t2i: the edited photo captioned
    with its style, "a photo" for the unedited one. resume_from: a saved pipeline folder whose UNet
    and text encoder continue training (the budget can then be spent in several sittings).
    captions_per_crop > 1 (t2i only): each crop appears that many times in the batch, as itself under
    "a photo" and under distinct edit captions, with the same noise and timestep (`_caption_groups`).
    """
    if captions_per_crop != 1 and kind != "t2i":
        raise ValueError("captions_per_crop applies to the t2i model only")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    sampler = CropSampler(photos, RESOLUTION, generator)
    if resume_from is None:
        unet, text_encoder = new_unet(kind), new_text_encoder()
    else:
        unet = UNet2DConditionModel.from_pretrained(resume_from / "unet")
        text_encoder = CLIPTextModel.from_pretrained(resume_from / "text_encoder")
    unet = unet.to(device=device, dtype=dtype).train()
    text_encoder = text_encoder.to(device=device, dtype=dtype).train()
    vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    scheduler = training_scheduler(prediction_type or PREDICTION_TYPES[kind])
    scaling = vae.config.scaling_factor
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimiser = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: min(1.0, (step + 1) / 200))
    token_cache: dict[str, Tensor] = {}

    def tokens(texts: list[str]) -> Tensor:
        for text in set(texts) - token_cache.keys():
            token_cache[text] = tokenizer(
                text, padding="max_length", max_length=TOKEN_LENGTH, truncation=True, return_tensors="pt"
            ).input_ids[0]
        return torch.stack([token_cache[text] for text in texts]).to(device)

    group = captions_per_crop

    def step(_: int) -> float:
        if group > 1:
            source = sampler.sample(batch_size // group).repeat_interleave(group, dim=0)
            edit_ids, texts = _caption_groups(batch_size, group, generator)
        else:
            source = sampler.sample(batch_size)
            edit_ids, texts = _edit_batch(kind, batch_size, generator)
        target = apply_edits(source, edit_ids)
        with torch.no_grad():
            target_latents = vae.encode(target.to(device, dtype) * 2 - 1).latent_dist.mode() * scaling
        drop = torch.rand(batch_size, generator=generator)
        if kind == "ip2p":
            drop_text = (drop < IP2P_DROP) | ((drop >= 2 * IP2P_DROP) & (drop < 3 * IP2P_DROP))
            drop_image = (drop >= IP2P_DROP) & (drop < 3 * IP2P_DROP)
        else:
            drop_text = drop < T2I_DROP
        texts = ["" if dropped else text for text, dropped in zip(texts, drop_text.tolist(), strict=True)]
        encoder_states = text_encoder(tokens(texts))[0]
        # One noise draw and timestep per crop: within a caption group only the caption's edit differs.
        shape = (batch_size // group, *target_latents.shape[1:])
        noise = torch.randn(shape, generator=generator).repeat_interleave(group, dim=0).to(device, dtype)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (batch_size // group,), generator=generator
        ).repeat_interleave(group)
        noisy = scheduler.add_noise(target_latents, noise, timesteps)
        if kind == "ip2p":
            with torch.no_grad():
                source_latents = vae.encode(source.to(device, dtype) * 2 - 1).latent_dist.mode()
            source_latents = source_latents * (~drop_image).to(device, dtype).view(-1, 1, 1, 1)
            noisy = torch.cat([noisy, source_latents], dim=1)
        prediction = unet(noisy, timesteps.to(device), encoder_hidden_states=encoder_states).sample
        loss = F.mse_loss(prediction, denoising_target(scheduler, target_latents, noise, timesteps))
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimiser.step()
        lr_schedule.step()
        return loss.item()

    log = _run(step, minutes, max_steps, kind)
    return unet.eval(), text_encoder.eval(), log


def build_pipeline(
    kind: str,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    tokenizer: CLIPTokenizer,
    prediction_type: str | None = None,
) -> StableDiffusionInstructPix2PixPipeline | StableDiffusionPipeline:
    """Assemble the stock pipeline class; no safety checker (nothing to check on 64 px edits)."""
    pipeline_class = {"ip2p": StableDiffusionInstructPix2PixPipeline, "t2i": StableDiffusionPipeline}[kind]
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=inference_scheduler(prediction_type or PREDICTION_TYPES[kind]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
