"""The splittable DoFn that turns a text object into chunks, one byte range at a time."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics
from apache_beam.transforms.core import RestrictionProvider

from transforms.chunk import ChunkerSettings, ChunkRule, chunk_id
from transforms.decode import DETECT_BYTES, TextEncoding, UndecodableError, detect_encoding
from transforms.progress import Progress
from transforms.store import ObjectChangedError, ObjectNotFoundError, StoreConfig, store_for
from transforms.types import Chunk, ErrorRecord, ObjectRef, ObjectStats

ERRORS = 'errors'
STATS = 'stats'
PDFS = 'pdfs'
PDF_MAGIC = b'%PDF-'

_log = logging.getLogger(__name__)


class ByteWindowReader:
    """Forward-only access to one object's bytes through ranged reads of at most window bytes.

    Reads are contiguous from the last `seek` (0 at first); the buffer holds only the bytes
    from the last `release` point onwards.
    """

    def __init__(self, read: Callable[[int, int], bytes], size: int, window_bytes: int,
                 limit: Optional[int] = None):
        """Past `limit` (the end of a restriction plus what its last chunk needs), reads
        fetch only the bytes asked for, not whole windows."""
        self._read = read
        self._size = size
        self._window = window_bytes
        self._limit = size if limit is None else min(limit, size)
        self._buf = bytearray()
        self._start = 0
        self.bytes_read = 0

    def seek(self, pos: int) -> None:
        """Drops the buffer and starts the next read at pos."""
        self._buf, self._start = bytearray(), pos

    def fetch(self, a: int, b: int) -> bytes:
        """Bytes [a, b) of the object, clipped at its end."""
        b = min(b, self._size)
        if a < self._start:
            raise ValueError(f'reader moved past {a} (buffer starts at {self._start})')
        end = self._start + len(self._buf)
        while end < b:
            piece = self._read(end, min(end + self._window, max(b, self._limit)))
            if not piece:
                raise IOError(f'object ended at byte {end}, listed size {self._size}')
            self._buf += piece
            self.bytes_read += len(piece)
            end += len(piece)
        return bytes(self._buf[a - self._start:b - self._start])

    def release(self, before: int) -> None:
        """Forgets the bytes before `before`."""
        drop = before - self._start
        if drop > 0:
            del self._buf[:drop]
            self._start = before


def is_blank(text: str) -> bool:
    """True for text with nothing to embed: whitespace, NULs, byte-order marks."""
    return not text.replace('\x00', '').replace('\ufeff', '').strip()


def looks_like_pdf(uri: str, head: bytes = b'') -> bool:
    """A PDF by extension (any case) or by the %PDF- magic in the first kilobyte."""
    return uri.lower().endswith('.pdf') or PDF_MAGIC in head[:1024]


class OffsetRangeSplits(RestrictionProvider):
    """Restrictions that are OffsetRanges, first split into pieces of `split_size` offsets."""
    split_size: int

    def create_tracker(self, restriction: OffsetRange) -> OffsetRestrictionTracker:
        return OffsetRestrictionTracker(restriction)

    def split(self, element, restriction: OffsetRange) -> Iterator[OffsetRange]:
        return restriction.split(self.split_size)


class ReadTextChunks(beam.DoFn, OffsetRangeSplits):
    """Splittable DoFn: ObjectRef -> Chunks, restricted to the byte range [start, stop).

    Outputs chunks on the main output, ErrorRecords on 'errors', (uri, ObjectStats) on
    'stats', and on 'pdfs' the refs of objects that turn out to be PDFs (by their magic bytes).
    Chunk k belongs to the restriction holding its nominal start k * chunk_size.
    """

    def __init__(self, settings: ChunkerSettings, window_bytes: int, split_bytes: int,
                 store_config: StoreConfig):
        self._settings = settings
        self._store_config = store_config
        self._window = window_bytes
        self.split_size = split_bytes
        self._bytes_read = Metrics.counter('ragbeam', 'bytes_read')
        self._chunks = Metrics.counter('ragbeam', 'chunks')

    # RestrictionProvider: the restriction is a byte range of the object.
    def initial_restriction(self, ref: ObjectRef) -> OffsetRange:
        return OffsetRange(0, ref.size)

    def restriction_size(self, ref: ObjectRef, restriction: OffsetRange) -> int:
        return restriction.size()

    def process(self, ref: ObjectRef, tracker=beam.DoFn.RestrictionParam()):
        rng = tracker.current_restriction()
        owns_head = rng.start == 0
        store = store_for(ref.uri, self._store_config)
        read = lambda a, b: store.read_range(ref, a, b)  # noqa: E731
        reader = ByteWindowReader(read, ref.size, self._window, limit=rng.stop + self._settings.reach())
        head_reader = reader if owns_head else ByteWindowReader(
            read, ref.size, self._window, limit=DETECT_BYTES)
        tally = Tally()
        try:
            head = head_reader.fetch(0, min(ref.size, DETECT_BYTES))
            if looks_like_pdf(ref.uri, head):
                finish_restriction(tracker)
                tally.kind = 'pdf'
                if owns_head:  # the PDF reader takes it from here
                    yield beam.pvalue.TaggedOutput(PDFS, ref)
            else:
                encoding = detect_encoding(head, ref.size)
                tally.encoding = encoding.codec
                yield from self._chunks_of(ref, tracker, reader, encoding, tally)
        except UndecodableError as e:
            finish_restriction(tracker)
            if owns_head:  # every restriction decides alike; one record per object
                yield beam.pvalue.TaggedOutput(ERRORS, _error(ref, 'decode', e, 0, ref.size))
                tally.fail('failed', f'undecodable: {e}')
        except (OSError, ValueError) as e:
            finish_restriction(tracker)
            _log.warning('read of %s [%d, %d) failed: %s', ref.uri, rng.start, rng.stop, e)
            yield beam.pvalue.TaggedOutput(ERRORS, _error(ref, 'read', e, rng.start, rng.stop))
            tally.fail('failed', read_failure_reason(e))
        tally.bytes_read = reader.bytes_read + (head_reader.bytes_read if not owns_head else 0)
        self._bytes_read.inc(tally.bytes_read)
        self._chunks.inc(tally.chunks)
        yield beam.pvalue.TaggedOutput(STATS, (ref.uri, tally.stats()))

    def _chunks_of(self, ref: ObjectRef, tracker, reader: ByteWindowReader,
                   encoding: TextEncoding, tally: 'Tally') -> Iterator:
        """Yields the restriction's chunks, and an ErrorRecord for each span that does not decode."""
        rule = ChunkRule(self._settings, encoding, ref.size)
        first = rule.first_chunk_at_or_after(tracker.current_restriction().start)
        keep = rule.bytes_to_keep()
        if first > 0:
            reader.seek(rule.first_byte_needed(first))
        tag = self._settings.tag()
        restriction = tracker.current_restriction()
        progress = Progress(ref.uri, restriction.start, restriction.stop, 'byte')
        for start, end in rule.spans(reader.fetch, tracker.try_claim, first):
            progress.update(end)
            raw = reader.fetch(start, end)
            reader.release(end - keep)
            try:
                text = raw.decode(encoding.codec)
            except UnicodeDecodeError as e:
                tally.errors += 1
                yield beam.pvalue.TaggedOutput(ERRORS, _error(ref, 'decode', e, start, end))
                continue
            if is_blank(text):
                continue
            cid, id64 = chunk_id(ref.uri, ref.version, None, start, end, tag)
            tally.chunks += 1
            yield Chunk(cid, id64, ref.uri, ref.version, 'text', None, start, end, text,
                        encoding.codec)


@dataclass
class Tally:
    """Mutable counts of one restriction, turned into ObjectStats at its end."""
    chunks: int = 0
    errors: int = 0
    ocr_needed: int = 0
    bytes_read: int = 0
    encoding: Optional[str] = None
    kind: str = 'text'
    status: Optional[str] = None
    reason: Optional[str] = None

    def fail(self, status: str, reason: str) -> None:
        self.status, self.reason = status, reason
        self.errors += status == 'failed'

    def stats(self) -> ObjectStats:
        return ObjectStats(chunks=self.chunks, bytes_read=self.bytes_read, errors=self.errors,
                           encoding=self.encoding, status=self.status, reason=self.reason,
                           kind=self.kind, ocr_needed=self.ocr_needed)


def read_failure_reason(e: Exception) -> str:
    """The manifest reason of an object whose bytes could not be read."""
    if isinstance(e, ObjectChangedError):
        return 'changed during read: the object is no longer the listed version'
    if isinstance(e, ObjectNotFoundError):
        return 'not found: the object was deleted after listing'
    return f'unreadable: {type(e).__name__}: {e}'


def finish_restriction(tracker) -> None:
    """Marks the rest of the restriction as done, so the runner does not wait for it."""
    stop = tracker.current_restriction().stop
    try:
        tracker.try_claim(stop)
    except ValueError:
        pass  # already claimed past the end


def _error(ref: ObjectRef, stage: str, e: Exception, start: int, end: int) -> ErrorRecord:
    return ErrorRecord(uri=ref.uri, stage=stage, error_type=type(e).__name__,
                       message=str(e)[:2000], version=ref.version, start=start, end=end)
