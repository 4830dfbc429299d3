"""`python -m tests.flows.reliability_driver CONFIG_JSON SLOW_S [PREFIX]`: run catalogue_refresh in a
process the test can SIGKILL.

Every image write under PREFIX (default `edited/`; `published/` to catch publishing) is followed by
a pause of SLOW_S seconds, so the test can reliably kill the process in the middle of that step:
after its first object, before the last one and before the manifest records them.
"""

from __future__ import annotations

import json
import sys
import time

from flows.refresh import catalogue_refresh
from storage.store import LocalStore, S3Store
from tasks.params import RefreshConfig


def slow_image_writes(seconds: float, prefix: str) -> None:
    def slowed(key: str) -> bool:
        return key.startswith(prefix) and "/contact-sheets/" not in key and key.endswith(".png")

    for cls in (LocalStore, S3Store):
        put_bytes, create_if_absent = cls.put_bytes, cls.create_if_absent

        def slow_put(self, key, data, content_type=None, _original=put_bytes):
            _original(self, key, data, content_type)
            if slowed(key):
                time.sleep(seconds)

        def slow_create(self, key, data, _original=create_if_absent):
            created = _original(self, key, data)
            if slowed(key):
                time.sleep(seconds)
            return created

        cls.put_bytes, cls.create_if_absent = slow_put, slow_create


if __name__ == "__main__":
    slow_image_writes(float(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "edited/")
    print(json.dumps(catalogue_refresh(RefreshConfig.model_validate_json(sys.argv[1]))["review"]))
