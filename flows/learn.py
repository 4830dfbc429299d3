"""learn_instructions: one instruction per edit category, learned only when its inputs changed."""

from __future__ import annotations

from prefect import flow, get_run_logger, unmapped

from tasks.ingest import exemplar_categories, validate_exemplars
from tasks.learn import learn_or_reuse
from tasks.params import RefreshConfig
from tasks.report import report_exemplar_problems


@flow(name="learn-instructions")
def learn_instructions(config: RefreshConfig) -> dict[str, dict]:
    """Validate each category's exemplar pairs, then learn (or reuse) its instruction.

    Categories are learned one after another: learning is bound by the model step, which a process
    runs one at a time anyway.
    """
    categories = exemplar_categories(config.store_uri, config.categories)
    exemplars = validate_exemplars.map(unmapped(config.store_uri), categories).result()
    report_exemplar_problems(exemplars)
    records = {}
    logger = get_run_logger()
    for number, category in enumerate(exemplars, start=1):
        name = category["category"]
        logger.info("learning %d/%d: %s (%d usable pairs)", number, len(exemplars), name, len(category["pairs"]))
        if len(category["pairs"]) < config.learn.min_pairs:
            records[name] = too_few_pairs(category, config.learn.min_pairs)
            continue
        records[name] = learn_or_reuse(
            config.store_uri, config.output_uri, category, config.model_uri, config.device,
            config.learn, config.model_slot,
        )
        logger.info("learning %d/%d: %s done", number, len(exemplars), name)
    return records


def too_few_pairs(exemplars: dict, min_pairs: int) -> dict:
    """The record of a category that cannot be learned; its catalogue items get error rows."""
    reason = (f"{len(exemplars['pairs'])} usable exemplar pairs, need {min_pairs} "
              f"({len(exemplars['problems'])} problems reported)")
    get_run_logger().error("%s: not learned: %s", exemplars["category"], reason)
    return {"category": exemplars["category"], "status": "too_few_pairs", "reason": reason}
