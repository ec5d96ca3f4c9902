"""Crash-safe result files: atomic whole-file writes and an append-only per-sample JSONL that resumes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; results are ordinary files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n")


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class ResumableJsonl:
    """Per-sample results that survive a kill: complete lines are kept, a torn last line is dropped on open."""

    def __init__(self, path: str | os.PathLike, key: str = "qid"):
        self.path = Path(path)
        self.key = key
        self._records: list[dict[str, Any]] = []
        self._done: set[str] = set()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        good_end = 0
        for line in raw.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # the write of this line was cut off
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break
            if record[self.key] in self._done:
                raise ValueError(f"{self.path} holds {self.key}={record[self.key]!r} twice; remove the file")
            self._records.append(record)
            self._done.add(record[self.key])
            good_end += len(line)
        if good_end != len(raw):
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)

    def done(self) -> set[str]:
        return set(self._done)

    def records(self) -> list[dict[str, Any]]:
        return list(self._records)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append a batch with one write and fsync; a key seen before is an error, never a duplicate."""
        if not records:
            return
        keys = [r[self.key] for r in records]
        if len(set(keys)) != len(keys) or self._done.intersection(keys):
            raise ValueError(f"duplicate {self.key} in appended records")
        payload = "".join(json.dumps(r, default=_jsonable) + "\n" for r in records)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self._records.extend(records)
        self._done.update(keys)
