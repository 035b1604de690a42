"""Where the shared real data lives: ``$GMPQ_DATA``, else ``../shared/data`` beside the project checkout.

Recipes may write ``${GMPQ_DATA}/cifar10/...``; ``expand_path`` resolves it.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_data_dir() -> Path:
    return Path(os.environ.get("GMPQ_DATA") or DEFAULT_SHARED_DATA)


def expand_path(path: str | os.PathLike) -> Path:
    """Expand ``~`` and ``$VARS``; ``$GMPQ_DATA`` falls back to the default shared-data folder."""
    text = str(path)
    if "GMPQ_DATA" in text and not os.environ.get("GMPQ_DATA"):
        text = text.replace("${GMPQ_DATA}", str(DEFAULT_SHARED_DATA)).replace("$GMPQ_DATA", str(DEFAULT_SHARED_DATA))
    return Path(os.path.expanduser(os.path.expandvars(text)))
