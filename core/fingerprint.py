"""The one fingerprint of the project: of model configs, data streams, run settings and result tables."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(obj: Any, **dump_kwargs) -> str:
    """16 hex digits of the sha256 of ``obj`` as JSON: the one fingerprint of configs, data streams and
    result tables (``dump_kwargs`` to json.dumps, e.g. ``sort_keys=True``). Changing how it is computed
    changes every recorded fingerprint: checkpoints would refuse to resume."""
    return hashlib.sha256(json.dumps(obj, **dump_kwargs).encode()).hexdigest()[:16]
