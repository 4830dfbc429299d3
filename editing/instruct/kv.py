"""Instruction keys and values injected into the cross-attention layers of a frozen UNet.

InstructBrush optimises the keys and values that the instruction tokens produce in every
cross-attention layer, not the text the encoder sees: a text encoder trained on coarse captions
cannot express every edit, but the attention layers can be steered directly. This module holds
those K/V (or, for the VISII-style text-space baseline, the token embeddings they are projected
from), the attention processor that substitutes them, and the shared per-call state (which rows
carry the instruction, which time group each row is in).

Layout: row 0 of the 77-token context is BOS, rows 1..m the instruction tokens, rows m+1.. the
EOS/padding rows. In the attention space every row the UNet attends to learns (all 77, per time
group), initialised from the projections of the initial instruction: CLIP's text encoder is
causal, so the EOS/padding rows carry the whole sentence. If only rows 1..m learned, the attention
mass on the frozen EOS/padding rows, which still say the initial phrase, would drown the learned
rows, and the learned instruction would barely beat leaving the photo unedited. The text space
(VISII) keeps VISII's rule: only rows 1..m learn.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel

SPACES = ("attention", "text")


def cross_attention_layers(unet: UNet2DConditionModel) -> dict[str, nn.Module]:
    """Module name -> Attention for every cross-attention layer, in the processor dict's key order."""
    layers = {}
    for key in unet.attn_processors:
        name = key.removesuffix(".processor")
        module = unet.get_submodule(name)
        if getattr(module, "is_cross_attention", False):
            layers[name] = module
    return layers


def time_group(timesteps: Tensor, num_groups: int, num_train_timesteps: int) -> Tensor:
    """Equal ranges of the training timestep axis (0..T-1), the same rule at training and inference."""
    return (timesteps.long() * num_groups // num_train_timesteps).clamp(0, num_groups - 1)


@dataclass
class InjectionState:
    """What the processors need to know about the current UNet call.

    `groups` is set by a forward pre-hook from the call's timestep; `instruction_rows` marks the
    rows that carry the instruction (the text chunk of IP2P guidance); None means every row does.
    """

    num_groups: int
    num_train_timesteps: int
    groups: Tensor | None = None
    instruction_rows: Tensor | None = None

    def pre_hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = kwargs["sample"] if "sample" in kwargs else args[0]
        timestep = kwargs["timestep"] if "timestep" in kwargs else args[1]
        timestep = torch.as_tensor(timestep, device=sample.device).reshape(-1)
        self.groups = time_group(timestep.expand(sample.shape[0]), self.num_groups, self.num_train_timesteps)


class InstructionKV(nn.Module):
    """Per-layer instruction K/V for one instruction, learnable in the attention or the text space.

    attention space: parameters `keys[i]`, `values[i]` of shape (groups, 77, d_i), one pair per
        cross-attention layer i (every context row, BOS and EOS/padding included), initialised from
        the projections of the initial instruction.
    text space: one parameter `tokens` (m, D), the encoder output rows of the instruction tokens;
        every layer projects them with its own frozen to_k/to_v (VISII's parametrisation).
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        context: Tensor,
        null_context: Tensor,
        num_tokens: int,
        space: str = "attention",
        num_groups: int = 1,
    ) -> None:
        super().__init__()
        if space not in SPACES:
            raise ValueError(f"space must be one of {SPACES}, got {space!r}")
        if space == "text" and num_groups != 1:
            raise ValueError("time-aware groups exist only in the attention space")
        if not 1 <= num_tokens <= context.shape[0] - 2:
            raise ValueError(f"num_tokens must be in 1..{context.shape[0] - 2}, got {num_tokens}")
        self.space = space
        self.num_tokens = num_tokens
        self.num_groups = num_groups
        # plain dict: the UNet's modules must not become submodules (parameters, state_dict)
        self._layers = cross_attention_layers(unet)
        self.layer_names = list(self._layers)
        self.register_buffer("context", context.detach().clone())
        self._cache: list[tuple[Tensor, Tensor]] | None = None
        with torch.no_grad():
            base = [(a.to_k(context), a.to_v(context)) for a in self._layers.values()]
            null = [(a.to_k(null_context), a.to_v(null_context)) for a in self._layers.values()]
        self._base = base
        self._null = null
        rows = slice(1, 1 + num_tokens)
        if space == "attention":
            self.keys = nn.ParameterList(
                nn.Parameter(k.unsqueeze(0).repeat(num_groups, 1, 1)) for k, _ in base
            )
            self.values = nn.ParameterList(
                nn.Parameter(v.unsqueeze(0).repeat(num_groups, 1, 1)) for _, v in base
            )
        else:
            self.tokens = nn.Parameter(context[rows].detach().clone())

    def learned_context(self) -> Tensor:
        """The full (77, D) context with the learned token rows (text space)."""
        m = self.num_tokens
        return torch.cat([self.context[:1], self.tokens, self.context[1 + m :]], dim=0)

    def _instruction_kv(self, index: int) -> tuple[Tensor, Tensor]:
        """(groups, 77, d) keys and values of the instruction for layer `index`."""
        if self.space == "text":
            attn = self._layers[self.layer_names[index]]
            context = self.learned_context()
            return attn.to_k(context).unsqueeze(0), attn.to_v(context).unsqueeze(0)
        return self.keys[index], self.values[index]

    def freeze(self) -> None:
        """Compute every layer's instruction K/V once; application then never recomputes them."""
        with torch.no_grad():
            self._cache = [self._instruction_kv(i) for i in range(len(self.layer_names))]

    def kv(self, index: int, state: InjectionState, batch: int) -> tuple[Tensor, Tensor]:
        """(batch, 77, d) keys and values for layer `index` in the current call."""
        keys, values = self._cache[index] if self._cache is not None else self._instruction_kv(index)
        if self.num_groups == 1 or state.groups is None:
            keys, values = keys[:1].expand(batch, -1, -1), values[:1].expand(batch, -1, -1)
        else:
            keys, values = keys[state.groups], values[state.groups]
        if state.instruction_rows is None:
            return keys, values
        null_k, null_v = self._null[index]
        rows = state.instruction_rows.view(batch, 1, 1)
        return torch.where(rows, keys, null_k.expand_as(keys)), torch.where(
            rows, values, null_v.expand_as(values)
        )

    def named_tensors(self) -> dict[str, Tensor]:
        """The learned tensors under stable, readable names (the artifact's keys)."""
        if self.space == "text":
            return {"tokens": self.tokens.detach().clone()}
        tensors = {}
        for index, name in enumerate(self.layer_names):
            tensors[f"keys/{name}"] = self.keys[index].detach().clone()
            tensors[f"values/{name}"] = self.values[index].detach().clone()
        return tensors

    def load_named_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Inverse of `named_tensors`; shapes must match this UNet exactly."""
        with torch.no_grad():
            if self.space == "text":
                self.tokens.copy_(tensors["tokens"])
            else:
                for index, name in enumerate(self.layer_names):
                    self.keys[index].copy_(tensors[f"keys/{name}"])
                    self.values[index].copy_(tensors[f"values/{name}"])
        self._cache = None


class InstructionKVProcessor:
    """Cross-attention with the keys/values taken from an InstructionKV instead of to_k/to_v(text).

    Follows diffusers' AttnProcessor2_0 step by step otherwise, so that with the initial K/V it
    computes exactly what the stock processor computes for the initial instruction.
    """

    def __init__(self, bank: InstructionKV, index: int, state: InjectionState) -> None:
        self.bank = bank
        self.index = index
        self.state = state

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
    ) -> Tensor:
        if attention_mask is not None:
            raise ValueError("instruction K/V injection does not support attention masks")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        key, value = self.bank.kv(self.index, self.state, batch)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
        key = key.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        value = value.reshape(batch, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


@contextmanager
def instruction_processors(
    unet: UNet2DConditionModel, bank: InstructionKV, state: InjectionState
) -> Iterator[None]:
    """Install the injection processors on the cross-attention layers only; restore on exit.

    The original processor objects are put back as they were (self-attention layers are never
    touched), and the timestep pre-hook is removed, even when the body raises.
    """
    original = dict(unet.attn_processors)
    index_of = {name: i for i, name in enumerate(bank.layer_names)}
    processors = {}
    for key, processor in original.items():
        name = key.removesuffix(".processor")
        processors[key] = (
            InstructionKVProcessor(bank, index_of[name], state) if name in index_of else processor
        )
    hook = unet.register_forward_pre_hook(state.pre_hook, with_kwargs=True)
    unet.set_attn_processor(processors)
    try:
        yield
    finally:
        hook.remove()
        unet.set_attn_processor(dict(original))
