"""Small records that flow through the pipeline."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class ObjectRef:
    """One listed object: where it is, how big, and the version every read is pinned to."""
    uri: str
    size: int
    version: str


@dataclass(frozen=True)
class Chunk:
    """One chunk of an object's text, before embedding."""
    chunk_id: str
    id64: int
    uri: str
    version: str
    kind: str
    page: Optional[int]
    start: int
    end: int
    text: str
    encoding: Optional[str]


@dataclass(frozen=True)
class ErrorRecord:
    """Why an object, a byte range or a page could not be ingested."""
    uri: str
    stage: str
    error_type: str
    message: str
    version: Optional[str] = None
    start: Optional[int] = None
    end: Optional[int] = None
    page: Optional[int] = None


@dataclass(frozen=True)
class ObjectStats:
    """What one restriction of an object produced; combined per object for the manifest."""
    chunks: int = 0
    bytes_read: int = 0
    errors: int = 0
    encoding: Optional[str] = None
    status: Optional[str] = None  # 'failed' or 'skipped' when the object as a whole is
    reason: Optional[str] = None
    kind: Optional[str] = None
    pages: Optional[int] = None
    ocr_needed: int = 0

    def merge(self, other: 'ObjectStats') -> 'ObjectStats':
        """Adds counts; keeps the object-level status of whichever side has one (failed wins)."""
        first, second = sorted((self, other), key=_status_rank)
        return ObjectStats(
            chunks=self.chunks + other.chunks,
            bytes_read=self.bytes_read + other.bytes_read,
            errors=self.errors + other.errors,
            encoding=self.encoding or other.encoding,
            status=first.status or second.status,
            reason=first.reason or second.reason,
            kind=self.kind or other.kind,
            pages=self.pages if self.pages is not None else other.pages,
            ocr_needed=self.ocr_needed + other.ocr_needed)


def _status_rank(s: ObjectStats) -> tuple:
    return ({'failed': 0, 'skipped': 1}.get(s.status or '', 2), s.reason or '')


@dataclass(frozen=True)
class ManifestRow:
    """One listed object and how it ended: ok, failed or skipped (with a reason)."""
    uri: str
    size: int
    version: str
    status: str
    chunks: int
    bytes_read: int
    reason: Optional[str]
    kind: Optional[str]
    encoding: Optional[str]
    errors: int = field(default=0)
    pages: Optional[int] = None
    ocr_needed_pages: int = 0
