"""Crash-safe result files: an append-only per-sample JSONL that resumes (whole-file writes: `mmkit.atomic`)."""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from mmkit.atomic import _jsonable, atomic_write_bytes, atomic_write_json, atomic_write_text  # noqa: F401 - re-exported

logger = logging.getLogger(__name__)


class ResumableJsonl:
    """Per-sample results in a JSONL file that survives being killed mid-run.

    Each `append` writes a batch of records (one JSON object per line) in one write, then flushes and fsyncs, so
    after a kill the file holds every earlier batch plus at most one torn line at the end. Opening the file
    again keeps the complete lines and cuts the torn one off, and `done()` tells the caller which keys to skip.

    Args:
        path: the .jsonl file; created on the first append.
        key: the field that identifies a sample. Keys are unique: appending a key already present raises.
    """

    def __init__(self, path: str | os.PathLike, key: str = "qid"):
        self.path = Path(path)
        self.key = key
        self._records: list[dict[str, Any]] = []
        self._done: set = set()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        raw = self.path.read_bytes()
        lines = raw.splitlines(keepends=True)
        good_end = 0
        for lineno, line in enumerate(lines, start=1):
            last = lineno == len(lines)
            if not line.strip():
                good_end += len(line)
                continue
            try:
                record = json.loads(line) if line.endswith(b"\n") else None
            except json.JSONDecodeError:
                record = None
            if record is None:
                if last:
                    break  # the write of this line was cut off by a kill: drop it, it is recomputed
                raise ValueError(f"{self.path}:{lineno} is not a complete JSON record but more records follow; "
                                 f"the file is damaged, remove it to start the run again")
            if not isinstance(record, dict) or self.key not in record:
                raise ValueError(f"{self.path}:{lineno} has no {self.key!r} field; is it a results file of this run?")
            value = record[self.key]
            if value in self._done:
                raise ValueError(f"{self.path} holds {self.key}={value!r} twice; remove the file to start again")
            self._records.append(record)
            self._done.add(value)
            good_end += len(line)
        if good_end != len(raw):
            logger.warning("%s: dropping %d bytes of a torn last line (a killed run); resuming after %d records",
                           self.path, len(raw) - good_end, len(self._records))
            with open(self.path, "r+b") as handle:
                handle.truncate(good_end)
                handle.flush()
                os.fsync(handle.fileno())

    def done(self) -> set:
        """Keys of the records stored so far."""
        return set(self._done)

    def records(self) -> list[dict[str, Any]]:
        """The stored records, in file order (copies of the list, not of the records)."""
        return list(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def append(self, records: list[dict[str, Any]]) -> None:
        """Append a batch with one write, flush and fsync. A record without the key, or whose key is already stored
        or repeated in the batch, raises ValueError and nothing is written."""
        if not records:
            return
        missing = next((r for r in records if not isinstance(r, dict) or self.key not in r), None)
        if missing is not None:
            raise ValueError(f"every record needs a {self.key!r} field; got {missing!r}")
        keys = [r[self.key] for r in records]
        repeated = sorted({str(k) for k, c in Counter(keys).items() if c > 1 or k in self._done})
        if repeated:
            raise ValueError(f"{self.key} already stored or repeated in the batch: {', '.join(repeated[:5])}")
        payload = "".join(json.dumps(r, default=_jsonable) + "\n" for r in records).encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        self._records.extend(records)
        self._done.update(keys)
