"""Attention control in the prompt-to-prompt style, installed through diffusers attention processors.

Text edits that keep a photo's layout (DDIM+P2P, SimInversion, FPE) work by letting the edited
("target") branch reuse attention probabilities of the reconstructing ("source") branch. diffusers'
fast attention never materialises those probabilities, so the edited UNet runs an explicit-softmax
processor that hands every map to a controller. Controllers form one small hierarchy:

- `AttentionController`: the base; sees `(attention_probs, is_cross, place_in_unet)` of the
  conditional half of the batch and keeps the step/layer counters.
- `AttentionStore`: records maps (for analysis, tests and local blending).
- `AttentionEdit`: copies source self-attention maps into the target rows, in chosen layers and
  for the first fraction of the steps; cross-attention is left alone. `FreePromptEdit` (FPE) is
  this with the FPE defaults.
- `CrossAttentionReplace` / `CrossAttentionRefine`: P2P, which also copies cross-attention maps
  (token by token for prompts of equal length, through a token alignment otherwise).

`attention_control(unet, controller)` installs the processors and restores the UNet's original
processor objects when the block ends, so an inversion pass or another method never runs through a
stale controller.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import Tensor

# The official FPE code edits self-attention layers with at most 32**2 query tokens at 64x64
# latents (SD at 512 px), i.e. a quarter of the latent's tokens; as a fraction it means the same
# layers (the two lower resolutions and the middle block) for a 64 px model with 32x32 latents.
FPE_TOKEN_FRACTION = 0.25
# "Layers 4-14" (1-based, execution order over the 16 self-attention layers of SD 1.x), as a
# secondary summary of the FPE paper states it; 0-based here. Kept as an option, not the default.
FPE_PAPER_LAYERS: tuple[int, ...] = tuple(range(3, 14))


def place_in_unet(processor_name: str) -> str:
    """The block family of an attention layer ("down", "mid" or "up"), from its processor key."""
    for prefix, place in (("down_blocks", "down"), ("mid_block", "mid"), ("up_blocks", "up")):
        if processor_name.startswith(prefix):
            return place
    raise ValueError(f"attention processor {processor_name!r} is outside the down/mid/up blocks")


@dataclass(frozen=True)
class SelfLayerSelection:
    """Which self-attention layers an edit replaces.

    Either by size (`max_token_fraction`: layers whose query-token count is at most this fraction of
    the latent's token count; resolution-relative so tiny and SD-size UNets mean the same layers) or
    by position (`layer_indices`: 0-based self-attention layers in execution order).
    """

    max_token_fraction: float | None = FPE_TOKEN_FRACTION
    layer_indices: frozenset[int] | None = None

    def __post_init__(self) -> None:
        if (self.max_token_fraction is None) == (self.layer_indices is None):
            raise ValueError("choose layers either by max_token_fraction or by layer_indices, not both")

    @classmethod
    def by_index(cls, indices: Iterable[int]) -> SelfLayerSelection:
        return cls(max_token_fraction=None, layer_indices=frozenset(indices))

    def selects(self, self_layer_index: int, num_tokens: int, latent_tokens: int) -> bool:
        if self.layer_indices is not None:
            return self_layer_index in self.layer_indices
        return num_tokens <= self.max_token_fraction * latent_tokens


class AttentionController:
    """Sees every attention map of one UNet call and counts layers and steps at call time.

    The UNet batch is `[uncond rows..., cond rows...]` (classifier-free guidance) and each half
    holds `num_rows` prompt rows (row 0 = source) of B images each. Only the conditional half is
    passed to `forward`, shaped `(num_rows, B * heads, N, M)`. Layers are counted when called,
    because the key order of `unet.attn_processors` is not the execution order.
    """

    def __init__(self, num_rows: int = 2) -> None:
        self.num_rows = num_rows
        self.num_att_layers = 0
        self.reset()

    def reset(self) -> None:
        self.cur_step = 0
        self.cur_att_layer = 0
        self.cur_self_layer = 0

    def forward(self, rows: Tensor, is_cross: bool, place_in_unet: str) -> Tensor:
        return rows

    def between_steps(self) -> None:
        """Called once all attention layers of a UNet call have run."""

    def __call__(self, attention_probs: Tensor, is_cross: bool, place_in_unet: str) -> Tensor:
        if self.num_att_layers <= 0:
            raise RuntimeError("controller is not installed; use attention_control(unet, controller)")
        half = attention_probs.shape[0] // 2
        cond = attention_probs[half:]
        rows = cond.reshape(self.num_rows, -1, *cond.shape[1:])
        edited = self.forward(rows, is_cross, place_in_unet).reshape(cond.shape)
        if not is_cross:
            self.cur_self_layer += 1
        self.cur_att_layer += 1
        if self.cur_att_layer == self.num_att_layers:
            self.cur_att_layer = 0
            self.cur_self_layer = 0
            self.cur_step += 1
            self.between_steps()
        return torch.cat([attention_probs[:half], edited])


class AttentionStore(AttentionController):
    """Records the conditional-half maps, keyed like P2P (`"down_self"`, `"up_cross"`, ...).

    `last_step` holds the most recent step's maps in call order; `average()` the mean over steps;
    `history` every step's maps when `keep_every_step` (tests and visualisation; memory grows with
    the steps). `max_tokens` skips large maps, as P2P does, to bound memory.
    """

    def __init__(
        self,
        num_rows: int = 2,
        max_tokens: int | None = None,
        keep_every_step: bool = False,
        recording: bool = True,
    ) -> None:
        self.max_tokens = max_tokens
        self.keep_every_step = keep_every_step
        self.recording = recording
        super().__init__(num_rows)

    def reset(self) -> None:
        super().reset()
        self.step_store: dict[str, list[Tensor]] = {}
        self.last_step: dict[str, list[Tensor]] = {}
        self.sums: dict[str, list[Tensor]] = {}
        self.history: list[dict[str, list[Tensor]]] = []

    def forward(self, rows: Tensor, is_cross: bool, place_in_unet: str) -> Tensor:
        if self.recording and (self.max_tokens is None or rows.shape[2] <= self.max_tokens):
            key = f"{place_in_unet}_{'cross' if is_cross else 'self'}"
            self.step_store.setdefault(key, []).append(rows.detach().clone())
        return rows

    def between_steps(self) -> None:
        if not self.recording:
            return
        for key, maps in self.step_store.items():
            if key in self.sums:
                self.sums[key] = [total + m for total, m in zip(self.sums[key], maps, strict=True)]
            else:
                self.sums[key] = [m.clone() for m in maps]
        if self.keep_every_step:
            self.history.append(self.step_store)
        self.last_step = self.step_store
        self.step_store = {}

    def average(self) -> dict[str, list[Tensor]]:
        return {key: [m / self.cur_step for m in maps] for key, maps in self.sums.items()}


class AttentionEdit(AttentionStore):
    """Copy the source row's self-attention probabilities into the target rows.

    Self-attention carries the layout (FPE's probing result), so giving the target branch the
    source's maps keeps geometry while its own values and cross-attention apply the new prompt.
    Replaced: steps `[0, int(num_steps * self_replace_steps))`, layers picked by `self_layers`.
    Subclasses edit cross-attention through `edit_cross`; here it is left untouched.
    """

    def __init__(
        self,
        num_steps: int,
        latent_tokens: int,
        self_replace_steps: float,
        self_layers: SelfLayerSelection | None = None,
        record_maps: bool = False,
        keep_every_step: bool = False,
    ) -> None:
        if not 0.0 <= self_replace_steps <= 1.0:
            raise ValueError(f"self_replace_steps must be in [0, 1], got {self_replace_steps}")
        self.num_steps = num_steps
        self.latent_tokens = latent_tokens
        self.self_replace_until = int(num_steps * self_replace_steps)
        self.self_layers = self_layers or SelfLayerSelection()
        super().__init__(num_rows=2, keep_every_step=keep_every_step, recording=record_maps)

    def edit_cross(self, rows: Tensor) -> Tensor:
        return rows

    def replaces_self(self, num_tokens: int) -> bool:
        """Whether the self-attention layer being called now gets the source maps."""
        return self.cur_step < self.self_replace_until and self.self_layers.selects(
            self.cur_self_layer, num_tokens, self.latent_tokens
        )

    def forward(self, rows: Tensor, is_cross: bool, place_in_unet: str) -> Tensor:
        if is_cross:
            rows = self.edit_cross(rows)
        elif self.replaces_self(rows.shape[2]):
            rows = torch.stack([rows[0], rows[0]])
        return super().forward(rows, is_cross, place_in_unet)


class FreePromptEdit(AttentionEdit):
    """FPE (Liu et al., CVPR 2024): only self-attention maps move from source to target.

    Defaults of the official code: the first 80% of the steps, layers with at most a quarter of
    the latent's tokens (N <= 32**2 at SD's 64x64 latents). Cross-attention is never touched
    because its maps carry the source prompt's object attributes, which cause failed edits.
    """

    def __init__(
        self,
        num_steps: int,
        latent_tokens: int,
        self_replace_steps: float = 0.8,
        self_layers: SelfLayerSelection | None = None,
        record_maps: bool = False,
        keep_every_step: bool = False,
    ) -> None:
        super().__init__(
            num_steps, latent_tokens, self_replace_steps, self_layers, record_maps, keep_every_step
        )


class CrossAttentionReplace(AttentionEdit):
    """P2P word swap: prompts of the same token count; the target takes every source cross map
    for the first `cross_replace_steps` of the steps (so the swapped word lands where the old one
    was), plus the self-attention replacement of `AttentionEdit`."""

    def __init__(
        self,
        num_steps: int,
        latent_tokens: int,
        cross_replace_steps: float = 0.4,
        self_replace_steps: float = 0.6,
        self_layers: SelfLayerSelection | None = None,
        record_maps: bool = False,
    ) -> None:
        super().__init__(num_steps, latent_tokens, self_replace_steps, self_layers, record_maps)
        self.cross_replace_until = int(num_steps * cross_replace_steps)

    def edit_cross(self, rows: Tensor) -> Tensor:
        if self.cur_step >= self.cross_replace_until:
            return rows
        return torch.stack([rows[0], rows[0]])


class CrossAttentionRefine(AttentionEdit):
    """P2P prompt refinement: prompts of any length; each target token that also appears in the
    source (found by `align_tokens`) takes the source token's map, new words keep their own."""

    def __init__(
        self,
        num_steps: int,
        latent_tokens: int,
        mapper: Tensor,
        alphas: Tensor,
        cross_replace_steps: float = 0.4,
        self_replace_steps: float = 0.6,
        self_layers: SelfLayerSelection | None = None,
        record_maps: bool = False,
    ) -> None:
        super().__init__(num_steps, latent_tokens, self_replace_steps, self_layers, record_maps)
        self.cross_replace_until = int(num_steps * cross_replace_steps)
        self.mapper = mapper
        self.alphas = alphas

    def edit_cross(self, rows: Tensor) -> Tensor:
        if self.cur_step >= self.cross_replace_until:
            return rows
        base = rows[0][..., self.mapper.to(rows.device)]
        alphas = self.alphas.to(rows)
        return torch.stack([rows[0], base * alphas + rows[1] * (1 - alphas)])


def align_tokens(source_ids: list[int], target_ids: list[int], max_length: int) -> tuple[Tensor, Tensor]:
    """For each of the `max_length` target positions: the source position it inherits its
    cross-attention from (`mapper`) and whether it inherits (`alphas`, 1 or 0).

    Ids include the start and end tokens but no padding. Shared word tokens are matched in order
    (longest common subsequence by difflib), new target words keep their own maps, and the end
    token and padding map to the source's end token and padding.
    """
    if len(source_ids) > max_length or len(target_ids) > max_length:
        raise ValueError(f"prompts longer than {max_length} tokens")
    mapper = torch.zeros(max_length, dtype=torch.long)
    alphas = torch.zeros(max_length)
    mapper[0], alphas[0] = 0, 1.0
    matcher = difflib.SequenceMatcher(a=source_ids[1:-1], b=target_ids[1:-1], autojunk=False)
    for block in matcher.get_matching_blocks():
        for offset in range(block.size):
            mapper[1 + block.b + offset] = 1 + block.a + offset
            alphas[1 + block.b + offset] = 1.0
    tail = len(target_ids) - 1
    for position in range(tail, max_length):
        mapper[position] = min(position - tail + len(source_ids) - 1, max_length - 1)
        alphas[position] = 1.0
    return mapper, alphas


class ControlledAttnProcessor:
    """diffusers' plain `AttnProcessor` with the probabilities routed through a controller.

    Explicit softmax (not scaled_dot_product_attention) because the maps must exist to be edited.
    """

    def __init__(self, controller: AttentionController, place_in_unet: str) -> None:
        self.controller = controller
        self.place_in_unet = place_in_unet

    def __call__(
        self,
        attn: Attention,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        is_cross = encoder_hidden_states is not None
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
        batch_size, sequence_length, _ = (
            hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
        )
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        query = attn.head_to_batch_dim(query)
        key = attn.head_to_batch_dim(key)
        value = attn.head_to_batch_dim(value)

        attention_probs = attn.get_attention_scores(query, key, attention_mask)
        attention_probs = self.controller(attention_probs, is_cross, self.place_in_unet)
        hidden_states = attn.batch_to_head_dim(torch.bmm(attention_probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def attention_control(
    unet: UNet2DConditionModel, controller: AttentionController
) -> Iterator[AttentionController]:
    """Route every attention layer of `unet` through `controller` inside the block.

    The original processor objects are put back on exit (even on error), so anything that ran
    before, e.g. fast SDPA processors or LoRA processors, is exactly what runs afterwards.
    """
    original = unet.attn_processors
    processors = {name: ControlledAttnProcessor(controller, place_in_unet(name)) for name in original}
    controller.reset()
    controller.num_att_layers = len(processors)
    unet.set_attn_processor(processors)
    try:
        yield controller
    finally:
        unet.set_attn_processor(dict(original))
