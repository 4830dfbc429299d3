"""`python -m tests.flows.reliability_driver CONFIG_JSON SLOW_S`: run catalogue_refresh in a process
the test can SIGKILL.

Every edited image write is followed by a pause of SLOW_S seconds, so the test can reliably kill the
process in the middle of a partition (after its first output, before its completion marker).
"""

from __future__ import annotations

import json
import sys
import time

from flows.config import RefreshConfig
from flows.refresh import catalogue_refresh
from storage.store import LocalStore, S3Store


def slow_edited_writes(seconds: float) -> None:
    for cls in (LocalStore, S3Store):
        original = cls.put_bytes

        def put_bytes(self, key, data, content_type=None, _original=original):
            _original(self, key, data, content_type)
            if key.startswith("edited/") and "/contact-sheets/" not in key and key.endswith(".png"):
                time.sleep(seconds)

        cls.put_bytes = put_bytes


if __name__ == "__main__":
    slow_edited_writes(float(sys.argv[2]))
    print(json.dumps(catalogue_refresh(RefreshConfig.model_validate_json(sys.argv[1]))["review"]))
