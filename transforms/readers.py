"""What the text and PDF readers share: their result type, output tags, restriction helpers
and the reasons the manifest gives for objects that could not be read."""
from __future__ import annotations

import re
from typing import Iterator, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider

from transforms.store import ObjectChangedError, ObjectNotFoundError
from transforms.types import ErrorRecord, ObjectRef

ERRORS = 'errors'
STATS = 'stats'
DYNAMIC_SPLITS = Metrics.counter('ragbeam', 'dynamic_splits')
HANDED_OFF = 'handed_off'

# A PDF's header is its first line; readers accept up to 1 KB of junk before it, so it may
# also start a later line of the first kilobyte. "%PDF-" inside a sentence is not a header.
_PDF_HEADER = re.compile(rb'(?:\A|[\r\n])%PDF-\d\.\d')
PDF_HEADER_BYTES = 1024


class ReadResult(NamedTuple):
    """What a reader produced: chunks and (ObjectRef, ObjectStats) per restriction (each one
    PCollection per DoFn that makes them, each going its own fused way to a sink: a Flatten
    would hold them all at once on the FnApiRunner), error records, and the refs it hands to
    the other reader (the text reader's PDFs by content; the PDF reader's sniffed objects
    that do not open as PDFs)."""
    chunks: tuple[beam.PCollection, ...]
    errors: beam.PCollection
    stats: tuple[beam.PCollection, ...]
    handed_off: beam.PCollection


def is_pdf_name(uri: str) -> bool:
    """A PDF by its extension, in any case."""
    return uri.lower().endswith('.pdf')


def has_pdf_header(head: bytes) -> bool:
    """Whether an object's first bytes hold a PDF header where one can be."""
    return _PDF_HEADER.search(head[:PDF_HEADER_BYTES]) is not None


def is_blank(text: str) -> bool:
    """True for text with nothing to embed: whitespace, NULs, byte-order marks."""
    return not text.replace('\x00', '').replace('\ufeff', '').strip()


class OffsetRangeSplits(RestrictionProvider):
    """Restrictions that are OffsetRanges, first split into pieces of `split_size` offsets."""
    split_size: int

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def split(self, element, restriction: OffsetRange) -> Iterator[OffsetRange]:
        return restriction.split(self.split_size)


def count_dynamic_split(tracker, stop: int) -> None:
    """Counts a restriction that the runner split while it ran: its stop moved below the
    `stop` it started with (Prism does this; the FnApiRunner and Flink here never do)."""
    if tracker.current_restriction().stop < stop:
        DYNAMIC_SPLITS.inc()


def finish_restriction(tracker) -> None:
    """Marks the rest of the restriction as done, so the runner does not wait for it."""
    stop = tracker.current_restriction().stop
    try:
        tracker.try_claim(stop)
    except ValueError:
        pass  # already claimed past the end


def read_failure_reason(e: Exception) -> str:
    """The manifest reason of an object whose bytes could not be read."""
    if isinstance(e, ObjectChangedError):
        return 'changed during read: the object is no longer the listed version'
    if isinstance(e, ObjectNotFoundError):
        return 'not found: the object was deleted after listing'
    return f'unreadable: {type(e).__name__}: {e}'


def error_record(ref: ObjectRef, stage: str, e: Exception, start: Optional[int] = None,
                 end: Optional[int] = None, page: Optional[int] = None) -> ErrorRecord:
    """The error record of a failure of `ref` at one stage (and byte range or page)."""
    return ErrorRecord(uri=ref.uri, stage=stage, version=ref.version, start=start, end=end,
                       page=page, error_type=getattr(e, 'error_type', type(e).__name__),
                       message=str(e)[:2000])
