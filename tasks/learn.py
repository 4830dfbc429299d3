"""Learn one instruction per category, or reuse the one learned from the same inputs.

The cache key is a content hash of everything the result depends on (the usable pairs' pixels, the
model's weights, the learning config), so an unchanged nightly run learns nothing, and a changed
pair, model or setting relearns exactly the categories it affects.
"""

from __future__ import annotations

import hashlib
import json

from prefect import get_run_logger, task

from editing.instruct import save_instruction
from editing.photometric import cube_bytes
from storage.layout import ExemplarPair, load_pair
from storage.run_layout import instruction_cube_key, instruction_keys
from storage.store import open_store
from tasks.models import cached_model, model_step
from tasks.params import LearnParams


def instruction_cache_key(pair_hashes: list[str], model_sha256: str, learn_config: dict) -> str:
    """sha256 over the sorted pair hashes, the model hash and the canonical JSON of the config."""
    payload = json.dumps(
        {"pairs": sorted(pair_hashes), "model": model_sha256, "config": learn_config}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@task(retries=1, retry_delay_seconds=[10])
def learn_or_reuse(
    store_uri: str, output_uri: str, exemplars: dict, model_uri: str | None, device: str,
    learn: LearnParams, model_slot: str | None,
) -> dict:
    """The category's instruction record: where it is, its hashes, and whether it was just learned."""
    category = exemplars["category"]
    get_run_logger().info("%s: loading the model", category)
    model = cached_model(model_uri, device)
    cache_key = instruction_cache_key([p["sha256"] for p in exemplars["pairs"]], model.sha256, learn.cache_fields())
    weights_key, metadata_key = instruction_keys(category, cache_key)
    out = open_store(output_uri)
    learned = not out.exists(metadata_key)
    if learned:
        # Imported here: the learning code needs torch, which a partition run on the LUT route, importing
        # this module through the refresh flow, never loads.
        from editing.instruct import InstructionPair, learn_routed

        store = open_store(store_uri)
        pairs = [InstructionPair(p["pair_id"], *load_pair(store, ExemplarPair(category, p["pair_id"], p["before_key"],
                                                                              p["after_key"])), p["sha256"])
                 for p in exemplars["pairs"]]
        get_run_logger().info("%s: learning from %d pairs (route %s)", category, len(pairs), learn.route)
        with model_step(model_slot):
            instruction = learn_routed(model, pairs, learn.for_method(), learn.for_route(), category=category)
        get_run_logger().info("%s: route %s chosen; saving the instruction", category, instruction.route)
        data, metadata = save_instruction(instruction)
        # The .cube first and the metadata last: the metadata's presence is what marks the cache entry done.
        out.put_bytes(instruction_cube_key(category, cache_key), cube_bytes(instruction.lut, title=category),
                      content_type="text/plain")
        out.put_bytes(weights_key, data, content_type="application/octet-stream")
        out.put_bytes(metadata_key, json.dumps(metadata, sort_keys=True).encode(), content_type="application/json")
    metadata = json.loads(out.get_bytes(metadata_key))
    route = metadata.get("route", "instructbrush")
    get_run_logger().info("%s: instruction %s, route %s (%s)", category, cache_key[:12], route,
                          "learned" if learned else "cache hit")
    weights_sha = hashlib.sha256(out.get_bytes(weights_key)).hexdigest()
    choice = metadata.get("route_choice") or {}
    return {"category": category, "status": "ok", "cache_key": cache_key, "learned": learned,
            "weights_key": weights_key, "metadata_key": metadata_key, "sha256": weights_sha,
            "cube_key": instruction_cube_key(category, cache_key), "route": route,
            "route_scores": choice.get("scores", {}), "lut_size": metadata.get("lut_size"),
            "light_field_grid": metadata.get("light_field_grid"),
            "reference_shift": exemplars["reference_shift"], "pairs": len(exemplars["pairs"])}
