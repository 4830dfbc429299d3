"""`python -m tests.deployments.serve_driver CONFIG_JSON`: serve catalogue_refresh as the deployment
`catalogue-refresh/review-e2e` (parameters: that config), the way `flow.serve` runs it in production.

The deployment's entrypoint is this file, so the runner's flow-run processes (`python -m
prefect.engine`, one per execution) import it too. With RETOUCH_TEST_CALLS set to a file, every
process that imports it appends `<pid> <event>` lines: `start <module name>` once (`__main__` in the
serving process, a loader name in flow-run processes), then one line per model load, instruction
learning and model application. The test can tell which process did which work, and that a resumed
run did none.
"""

from __future__ import annotations

import os
import sys


def count_calls(path: str) -> None:
    import editing.instruct
    import tasks.edit
    import tasks.models

    if getattr(tasks.models, "_calls_counted", False):  # this file imported twice in one process
        return
    tasks.models._calls_counted = True

    def record(event: str) -> None:
        with open(path, "a") as f:
            f.write(f"{os.getpid()} {event}\n")

    def counted(event, fn):
        def wrapper(*args, **kwargs):
            record(event)
            return fn(*args, **kwargs)

        return wrapper

    tasks.models.load_model = counted("load_model", tasks.models.load_model)
    # tasks.learn imports learn_routed from the package when it learns, so the package holds the counter
    editing.instruct.learn_routed = counted("learn_routed", editing.instruct.learn_routed)
    tasks.edit.apply_instruction = counted("apply_instruction", tasks.edit.apply_instruction)
    record(f"start {__name__}")


if os.environ.get("RETOUCH_TEST_CALLS"):
    count_calls(os.environ["RETOUCH_TEST_CALLS"])


from flows.refresh import catalogue_refresh  # the entrypoint's flow, imported after the counters

__all__ = ["catalogue_refresh"]

if __name__ == "__main__":
    from prefect import serve
    from prefect.deployments.runner import RunnerDeployment

    from tasks.params import RefreshConfig

    config = RefreshConfig.model_validate_json(sys.argv[1])
    serve(RunnerDeployment.from_entrypoint("tests/deployments/serve_driver.py:catalogue_refresh", name="review-e2e",
                                           parameters={"config": config.model_dump(mode="json")}))
