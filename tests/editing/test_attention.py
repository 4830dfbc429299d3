"""Attention control: processors are installed and removed exactly, counters follow the calls,
and the P2P token aligner maps shared words."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionPipeline

from editing.attention import (
    AttentionController,
    AttentionStore,
    CrossAttentionRefine,
    SelfLayerSelection,
    align_tokens,
    attention_control,
)
from editing.text_edit import encode_prompts


def _unet_inputs(pipe: StableDiffusionPipeline, rows: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * rows, 4, 16, 16, generator=generator)
    context = encode_prompts(pipe, ["", "", "a photo", "a sepia photo"][: 2 * rows])
    return latents, context


def test_processors_are_restored_as_the_same_objects(pipe: StableDiffusionPipeline) -> None:
    before = pipe.unet.attn_processors
    with attention_control(pipe.unet, AttentionController()):
        assert all(proc is not before[name] for name, proc in pipe.unet.attn_processors.items())
    after = pipe.unet.attn_processors
    assert after.keys() == before.keys()
    assert all(after[name] is before[name] for name in before)


def test_processors_are_restored_when_the_block_fails(pipe: StableDiffusionPipeline) -> None:
    before = pipe.unet.attn_processors
    with pytest.raises(RuntimeError, match="boom"), attention_control(pipe.unet, AttentionController()):
        raise RuntimeError("boom")
    assert all(pipe.unet.attn_processors[name] is before[name] for name in before)


def test_pass_through_controller_leaves_the_unet_output_unchanged(pipe: StableDiffusionPipeline) -> None:
    latents, context = _unet_inputs(pipe)
    with torch.no_grad():
        reference = pipe.unet(latents, 500, encoder_hidden_states=context).sample
        with attention_control(pipe.unet, AttentionController()):
            controlled = pipe.unet(latents, 500, encoder_hidden_states=context).sample
    torch.testing.assert_close(controlled, reference, atol=1e-5, rtol=1e-5)


def test_counters_advance_one_step_per_unet_call(pipe: StableDiffusionPipeline) -> None:
    latents, context = _unet_inputs(pipe)
    store = AttentionStore()
    with torch.no_grad(), attention_control(pipe.unet, store):
        pipe.unet(latents, 500, encoder_hidden_states=context)
        pipe.unet(latents, 400, encoder_hidden_states=context)
    layers = len(pipe.unet.attn_processors)
    assert (store.cur_step, store.cur_att_layer, store.cur_self_layer) == (2, 0, 0)
    recorded = sum(len(maps) for maps in store.last_step.values())
    assert recorded == layers
    assert sum(len(maps) for key, maps in store.last_step.items() if key.endswith("_self")) == layers // 2
    # maps are (rows, B * heads, N, M) of the conditional half only
    self_map = store.last_step["down_self"][0]
    assert self_map.shape[0] == 2 and self_map.shape[2] == self_map.shape[3] == 256
    assert torch.allclose(self_map.sum(-1), torch.ones(()))
    averaged = store.average()["down_self"][0]
    assert averaged.shape == self_map.shape


def test_uninstalled_controller_refuses_to_run() -> None:
    with pytest.raises(RuntimeError, match="not installed"):
        AttentionController()(torch.rand(4, 3, 3), False, "down")


def test_layer_selection_is_relative_to_the_latent_size() -> None:
    rule = SelfLayerSelection()
    # SD 1.x at 512 px: latent 64x64; the official rule edits N <= 32**2
    assert rule.selects(0, 32**2, 64**2) and not rule.selects(0, 64**2, 64**2)
    # the same layers of a 64 px model with 32x32 latents
    assert rule.selects(0, 16**2, 32**2) and not rule.selects(0, 32**2, 32**2)
    by_index = SelfLayerSelection.by_index([3, 4])
    assert by_index.selects(3, 10**6, 1) and not by_index.selects(2, 1, 10**6)
    with pytest.raises(ValueError):
        SelfLayerSelection(max_token_fraction=0.25, layer_indices=frozenset({1}))


def test_align_tokens_maps_shared_words_and_leaves_new_ones() -> None:
    bos, eos = 100, 101
    source = [bos, 1, 2, eos]  # "a photo"
    target = [bos, 1, 7, 8, 2, eos]  # "a sepia(2 tokens) photo"
    mapper, alphas = align_tokens(source, target, max_length=10)
    assert mapper[:5].tolist() == [0, 1, 0, 0, 2]
    assert alphas[:5].tolist() == [1, 1, 0, 0, 1]
    # end token and padding map to the source's end token and padding
    assert mapper[5:].tolist() == [3, 4, 5, 6, 7]
    assert alphas[5:].tolist() == [1.0] * 5


def test_refine_copies_matched_tokens_and_keeps_new_ones() -> None:
    mapper = torch.tensor([0, 1, 0, 2])
    alphas = torch.tensor([1.0, 1.0, 0.0, 1.0])
    refine = CrossAttentionRefine(num_steps=10, latent_tokens=16, mapper=mapper, alphas=alphas)
    rows = torch.rand(2, 3, 16, 4)
    edited = refine.edit_cross(rows)
    torch.testing.assert_close(edited[0], rows[0])
    torch.testing.assert_close(edited[1][..., [0, 1, 3]], rows[0][..., [0, 1, 2]])
    torch.testing.assert_close(edited[1][..., 2], rows[1][..., 2])
    refine.cur_step = 4  # past cross_replace_steps=0.4 of 10 steps
    torch.testing.assert_close(refine.edit_cross(rows), rows)
