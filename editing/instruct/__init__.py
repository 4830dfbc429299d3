"""InstructBrush: learn one instruction per edit category from exemplar pairs, then apply it.

`learn_instruction` (learn.py) initialises from a phrase bank (init.py), then optimises the
instruction's keys/values in every cross-attention layer of the frozen InstructPix2Pix UNet (kv.py),
or its text embedding for the VISII baseline. `apply_instruction` (apply.py) runs batched IP2P dual
guidance and returns outputs at the input's resolution. `save_instruction` / `load_instruction`
(artifact.py) store it as safetensors + JSON metadata, bound to the model's content hash.
"""

from editing.instruct.apply import ApplyConfig, apply_instruction, choose_guidance, edit_native
from editing.instruct.artifact import (
    ARTIFACT_FORMAT,
    ARTIFACT_VERSION,
    InstructionIntegrityError,
    InstructionModelMismatch,
    LearnedInstruction,
    load_instruction,
    pair_sha256,
    phrase_instruction,
    save_instruction,
)
from editing.instruct.learn import InstructionPair, LearnConfig, learn_instruction

__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "ApplyConfig",
    "InstructionIntegrityError",
    "InstructionModelMismatch",
    "InstructionPair",
    "LearnConfig",
    "LearnedInstruction",
    "apply_instruction",
    "choose_guidance",
    "edit_native",
    "learn_instruction",
    "load_instruction",
    "pair_sha256",
    "phrase_instruction",
    "save_instruction",
]
