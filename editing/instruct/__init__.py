"""InstructBrush: learn one instruction per edit category from exemplar pairs, then apply it.

`learn_routed` (route.py) fits the category's 3D LUT and chooses its route (the LUT alone, the LUT
then a learned stage, or the learned stage alone) on held-out pairs. `learn_instruction` (learn.py)
initialises from a phrase bank (init.py), then optimises the
instruction's keys/values in every cross-attention layer of the frozen InstructPix2Pix UNet (kv.py),
or its text embedding for the VISII baseline. `apply_instruction` (apply.py) runs batched IP2P dual
guidance and returns outputs at the input's resolution. `save_instruction` / `load_instruction`
(artifact.py) store it as safetensors + JSON metadata, bound to the model's content hash.
"""

import importlib

# Each name is imported from its module on first use (PEP 562), so `from editing.instruct import
# load_instruction` does not pull in torch, diffusers and the learning code: a partition run on the
# LUT route loads and applies its instruction without them.
_EXPORTS = {
    "editing.instruct.apply": ("apply_instruction", "choose_guidance", "edit_native"),
    "editing.instruct.artifact": (
        "ARTIFACT_FORMAT", "ARTIFACT_VERSION", "ROUTES", "InstructionIntegrityError", "InstructionModelMismatch",
        "LearnedInstruction", "load_instruction", "pair_sha256", "phrase_instruction", "save_instruction",
    ),
    "editing.instruct.config": ("ApplyConfig", "LearnConfig", "RouteConfig"),
    "editing.instruct.learn": ("InstructionPair", "learn_instruction"),
    "editing.instruct.route": ("choose_route", "learn_routed", "lut_instruction"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str):
    if name not in _MODULE_OF:
        raise AttributeError(f"module 'editing.instruct' has no attribute {name!r}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "ARTIFACT_FORMAT",
    "ARTIFACT_VERSION",
    "ROUTES",
    "ApplyConfig",
    "InstructionIntegrityError",
    "InstructionModelMismatch",
    "InstructionPair",
    "LearnConfig",
    "LearnedInstruction",
    "RouteConfig",
    "apply_instruction",
    "choose_guidance",
    "choose_route",
    "edit_native",
    "learn_instruction",
    "learn_routed",
    "load_instruction",
    "lut_instruction",
    "pair_sha256",
    "phrase_instruction",
    "save_instruction",
]
