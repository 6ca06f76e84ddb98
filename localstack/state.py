"""Where a running local stack leaves its state (light to import: the CLI reads it on every call)."""

import os
from pathlib import Path

STATE_FILE = "stack.json"


def default_state_dir() -> Path:
    """``$NLPFLEET_LOCAL_DIR``, else ``~/.nlpfleet/local``."""
    return Path(os.environ.get("NLPFLEET_LOCAL_DIR", Path.home() / ".nlpfleet" / "local"))
