"""Where the firmware corpus is: real firmware images for the delta tests and `bench delta`.

The corpus (esp8266/*.bin, thumb/*.bin) is not in the repository. It is looked for in this order:
the directory `FOTA_CORPUS` names, then `shared/corpus` beside the checkout (or beside any folder
above it: a worktree in /work/wt/NAME finds /work/shared/corpus).
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "FOTA_CORPUS"
CHECKOUT = Path(__file__).resolve().parents[3]   # src/fota/testkit/corpus.py -> the checkout


def corpus_dir(start: Path = CHECKOUT) -> Path | None:
    """The corpus directory, or None when there is none. A `FOTA_CORPUS` that names no directory
    is returned as it is (the caller reports it missing) rather than silently replaced."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    return next((d / "shared" / "corpus" for d in Path(start).resolve().parents
                 if (d / "shared" / "corpus").is_dir()), None)


def corpus_images(kind: str = "esp8266", start: Path = CHECKOUT) -> list[Path]:
    """The corpus's `kind`/*.bin images sorted by name (version order); [] when missing."""
    root = corpus_dir(start)
    return sorted((root / kind).glob("*.bin")) if root is not None and (root / kind).is_dir() else []


def where() -> str:
    """Where the corpus was looked for, for a message saying it is missing."""
    if os.environ.get(ENV):
        return f"{ENV}={os.environ[ENV]}"
    return f"${ENV} unset, no shared/corpus beside {CHECKOUT} or a folder above it"
