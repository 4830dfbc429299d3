"""What a stored instruction artifact can and cannot be made to do.

The content hash is unkeyed, so these tests tamper the way someone with write access to
`instructions/` would: change the tensors, then recompute the hash. A changed value with the right
shape still loads (the README says so); a changed name, shape or dtype, or an extra tensor, is refused.
"""

from __future__ import annotations

import dataclasses

import pytest
import safetensors.torch
import torch

from editing.instruct import InstructionIntegrityError, LearnedInstruction, load_instruction, save_instruction
from editing.instruct.artifact import _content_hash
from editing.instruct.kv import InstructionKV
from editing.instruct.ops import encode_text
from editing.models import load_model

TEXT = "make it warmer"


@pytest.fixture(scope="module")
def model(tiny_ip2p_dir):
    return load_model(tiny_ip2p_dir)


@pytest.fixture(scope="module")
def artifact(model) -> tuple[bytes, dict]:
    """An attention-space instruction (two time groups), saved as it would be after learning."""
    context, null = encode_text(model.pipe, [TEXT, ""])
    bank = InstructionKV(model.pipe.unet, context, null, 3, "attention", 2)
    instruction = LearnedInstruction(
        category="warm", space="attention", instruction=TEXT, num_tokens=3, num_groups=2, context=context,
        tensors=bank.named_tensors(), model_id=model.model_id, model_sha256=model.sha256,
    )
    return save_instruction(instruction)


def _rehashed(tensors: dict[str, torch.Tensor], metadata: dict) -> tuple[bytes, dict]:
    """What a tamperer writes: new tensors, and a content hash recomputed to match them."""
    data = safetensors.torch.save(tensors)
    return data, {**metadata, "content_sha256": _content_hash(data, metadata)}


def test_the_untouched_artifact_loads_and_a_flipped_byte_anywhere_is_refused(model, artifact) -> None:
    data, metadata = artifact
    assert load_instruction(data, metadata, model).sha256 == metadata["content_sha256"]
    header = int.from_bytes(data[:8], "little") + 8
    for position in (8, header, header + (len(data) - header) // 2, len(data) - 1):  # header, first/mid/last data
        tampered = bytearray(data)
        tampered[position] ^= 0x01
        with pytest.raises(InstructionIntegrityError, match="content hash"):
            load_instruction(bytes(tampered), metadata, model)
    with pytest.raises(InstructionIntegrityError, match="content hash"):
        load_instruction(data, {**metadata, "instruction": "make it colder"}, model)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t, k: {**t, "extra/payload": torch.zeros(4)}, "does not take"),
        (lambda t, k: {n: v for n, v in t.items() if n != k}, "lacks tensor"),
        (lambda t, k: {**t, k: t[k][:1]}, "this model takes"),  # one group where two are declared
        (lambda t, k: {**t, k: t[k][:, :, :1].contiguous()}, "this model takes"),  # would broadcast
        (lambda t, k: {**t, k: t[k].double()}, "torch.float64"),
        (lambda t, k: {**t, "context": t["context"][:10].contiguous()}, "'context'"),
    ],
)
def test_rehashed_tensors_of_the_wrong_name_shape_or_dtype_are_refused(model, artifact, change, message) -> None:
    data, metadata = artifact
    tensors = safetensors.torch.load(data)
    first_key = next(name for name in tensors if name.startswith("keys/"))
    with pytest.raises(InstructionIntegrityError, match=message):
        load_instruction(*_rehashed(change(tensors, first_key), metadata), model)


def test_rehashed_metadata_out_of_range_is_refused(model, artifact) -> None:
    data, metadata = artifact
    for bad in ({"num_tokens": 0}, {"num_tokens": 10_000}, {"space": "pixels"}, {"num_groups": 1}):
        changed = {**metadata, **bad}
        with pytest.raises(InstructionIntegrityError):
            load_instruction(data, {**changed, "content_sha256": _content_hash(data, changed)}, model)


def test_a_rehashed_value_change_of_the_right_shape_is_not_detected(model, artifact) -> None:
    """The documented limit: only write access control protects `instructions/` from this."""
    data, metadata = artifact
    tensors = safetensors.torch.load(data)
    name = next(n for n in tensors if n.startswith("values/"))
    loaded = load_instruction(*_rehashed({**tensors, name: tensors[name] * 2}, metadata), model)
    assert torch.equal(loaded.tensors[name], tensors[name] * 2)
    assert dataclasses.is_dataclass(loaded)
