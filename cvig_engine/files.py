"""File helpers shared by every stage: hashing and atomic writes."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path, text: str) -> None:
    """Write text so that readers (and a killed writer) never see a half-written file."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    temporary.replace(path)


def atomic_write_json(path, document) -> None:
    """``atomic_write_text`` of an indented JSON document."""
    atomic_write_text(path, json.dumps(document, indent=2) + "\n")
