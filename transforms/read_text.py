"""Reading text objects: a splittable DoFn over byte ranges, inside the `ReadText` transform.

Each object is first planned as `TextRange`s of `--split-bytes`. The ranges of an object
bigger than that are small records that cross a shuffle (`Spread`), so a runner spreads one
big object's ranges over its workers: Flink runs a restriction's initial splits where its
element is and never splits one while it runs, so without it all of one object's ranges
would be read by one task. An object of one range is read where it was listed (the listing
ranges were spread already): its chunks follow the listing's URI order into the chunk
files, which a commit then finds by their URI range, and no per-object record is held at a
shuffle.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker
from apache_beam.metrics import Metrics

from transforms.chunk import ChunkerSettings, ChunkRule, chunk_id
from transforms.decode import DETECT_BYTES, TextEncoding, UndecodableError, detect_encoding
from transforms.monitor import WORK, MonitorOptions, StageMonitor, read_slot
from transforms.progress import Progress
from transforms.readers import (ERRORS, HANDED_OFF, STATS, OffsetRangeSplits, ReadResult,
                                count_dynamic_split, error_record, finish_restriction,
                                has_pdf_header, is_blank, read_failure_reason)
from transforms.store import StoreConfig, StoreError, store_for
from transforms.types import Chunk, ErrorRecord, ObjectRef, ObjectStats, record, typed

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextReadOptions:
    """How text objects are read: the largest single read and the initial split."""
    window_bytes: int = field(default=8 << 20, metadata={
        'flag': '--window-bytes', 'size': True,
        'help': 'largest single read (at least 4096 and 4 x chunk size)'})
    split_bytes: int = field(default=64 << 20, metadata={
        'flag': '--split-bytes', 'size': True,
        'help': 'initial split of one object: the unit of parallelism inside a big object'})

    def validate(self, chunker: ChunkerSettings) -> None:
        if self.window_bytes < 4096:
            raise ValueError('--window-bytes must be at least 4096')
        if self.window_bytes < 4 * chunker.size:
            raise ValueError('--window-bytes must be at least 4 x --chunk-size')
        if self.split_bytes < chunker.size:
            raise ValueError('--split-bytes must be at least --chunk-size')


@record
@dataclass(frozen=True)
class TextRange:
    """Bytes [start, stop) of a text object: the planned unit of work."""
    ref: ObjectRef
    start: int
    stop: int


def plan_ranges(ref: ObjectRef, split_bytes: int) -> Iterator[TextRange]:
    """An object's ranges of `split_bytes` (none for an empty object, as for Beam's
    OffsetRange.split)."""
    for piece in OffsetRange(0, ref.size).split(split_bytes):
        yield TextRange(ref, piece.start, piece.stop)



class Spread(beam.PTransform):
    """Sends each range to a worker chosen by a hash of its URI and offset, through a
    GroupByKey: a runner hash-partitions its keys over its workers (on Flink, Beam's
    Reshuffle here left all of one object's ranges in one subtask)."""

    def expand(self, ranges):
        return (ranges
                | 'Key' >> beam.Map(lambda r: (zlib.crc32(f'{r.ref.uri}@{r.start}'.encode()), r))
                .with_output_types(tuple[int, TextRange])
                | 'Group' >> beam.GroupByKey()
                | 'Ranges' >> beam.FlatMap(lambda kv: kv[1]).with_output_types(TextRange))


class ReadText(beam.PTransform):
    """ObjectRefs of text objects -> ReadResult: chunks, errors, stats, and (with
    `sniff_pdfs`) the refs of objects whose content turns out to be a PDF."""

    def __init__(self, chunker: ChunkerSettings, options: TextReadOptions, store: StoreConfig,
                 sniff_pdfs: bool = True, monitor: MonitorOptions = MonitorOptions()):
        super().__init__()
        self._fn = ReadTextChunks(chunker, options, store, sniff_pdfs, monitor)

    def expand(self, refs) -> ReadResult:
        split, window = self._fn.split_size, self._fn.window
        whole = refs | 'PlanWhole' >> beam.FlatMap(  # an empty object has no range
            lambda ref: [TextRange(ref, 0, ref.size)] if 0 < ref.size <= window else ()
        ).with_output_types(TextRange)
        spread = (refs
                  | 'Plan' >> beam.FlatMap(
                      lambda ref: plan_ranges(ref, split) if ref.size > window else ())
                  .with_output_types(TextRange)
                  | 'Spread' >> Spread())
        outs = [typed(ranges | name >> beam.ParDo(fn).with_output_types(
            Chunk).with_outputs(ERRORS, STATS, HANDED_OFF, main='chunks'),
            errors=ErrorRecord, stats=tuple[ObjectRef, ObjectStats], handed_off=ObjectRef)
            for name, ranges, fn in (('ReadWhole', whole, ReadWhole(self._fn)),
                                     ('Read', spread, self._fn))]
        errors, handed_off = (tuple(o[tag] for o in outs) | f'All{tag.title()}' >> beam.Flatten()
                              for tag in (ERRORS, HANDED_OFF))
        return ReadResult(tuple(o.chunks for o in outs), errors, tuple(o[STATS] for o in outs),
                          handed_off)



class ReadWhole(beam.DoFn):
    """TextRange of a small object -> what ReadTextChunks gives for it, read as one
    restriction by a plain DoFn: the FnApiRunner runs a splittable DoFn's processing in a
    stage of its own and holds all of its input in memory before it starts (about 800 bytes
    an object: 240 MB before the first read of 300,000 objects), and an object read in one
    window gains nothing from a split."""

    def __init__(self, reader: 'ReadTextChunks'):
        self._reader = reader

    def process(self, part: TextRange):
        tracker = OffsetRestrictionTracker(OffsetRange(part.start, part.stop))
        with read_slot(self._reader.slots):
            yield from self._reader.read_restriction(part.ref, tracker)

    def finish_bundle(self):
        WORK.bundle_done()


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
        self.window = window_bytes
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
            piece = self._read(end, min(end + self.window, max(b, self._limit)))
            if not piece:
                raise StoreError(f'object ended at byte {end}, listed size {self._size}')
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


class ReadTextChunks(beam.DoFn, OffsetRangeSplits):
    """Splittable DoFn: TextRange -> Chunks, restricted to a byte range within it.

    Outputs chunks on the main output, ErrorRecords on 'errors', (uri, ObjectStats) on
    'stats', and on 'handed_off' the refs of objects whose first bytes hold a PDF header.
    Chunk k belongs to the restriction holding its nominal start k * chunk_size.
    Only the store's and the decoder's errors make an object fail; any other exception is
    a bug and fails the run.
    """

    def __init__(self, settings: ChunkerSettings, options: TextReadOptions,
                 store_config: StoreConfig, sniff_pdfs: bool = True,
                 monitor: MonitorOptions = MonitorOptions()):
        self._settings = settings
        self._store_config = store_config
        self.window = options.window_bytes
        self._sniff_pdfs = sniff_pdfs
        self.split_size = options.split_bytes
        self._bytes_read = Metrics.counter('ragbeam', 'bytes_read')
        self._chunks = Metrics.counter('ragbeam', 'chunks')
        self._monitor = StageMonitor('read', monitor.memory_warn_mb)
        self.slots = monitor.reads_per_worker

    # RestrictionProvider: the restriction is a byte range of the object.
    def initial_restriction(self, part: TextRange) -> OffsetRange:
        return OffsetRange(part.start, part.stop)

    def restriction_size(self, part: TextRange, restriction: OffsetRange) -> int:
        return restriction.size()

    def process(self, part: TextRange, tracker=beam.DoFn.RestrictionParam()):
        with read_slot(self.slots):
            yield from self.read_restriction(part.ref, tracker)

    def finish_bundle(self):
        WORK.bundle_done()

    def read_restriction(self, ref: ObjectRef, tracker) -> Iterator:
        """What one restriction of an object gives: its chunks, errors, stats."""
        rng = tracker.current_restriction()
        owns_head = rng.start == 0
        store = store_for(ref.uri, self._store_config)
        read = lambda a, b: store.read_range(ref, a, b)  # noqa: E731
        reader = ByteWindowReader(read, ref.size, self.window, limit=rng.stop + self._settings.reach())
        head_reader = reader if owns_head else ByteWindowReader(
            read, ref.size, self.window, limit=DETECT_BYTES)
        stats = ObjectStats(kind='text')
        try:
            with self._monitor.timed(ref.uri):
                head = head_reader.fetch(0, min(ref.size, DETECT_BYTES))
            if self._sniff_pdfs and has_pdf_header(head):
                finish_restriction(tracker)
                stats.kind = None  # the PDF reader decides
                if owns_head:  # the PDF reader takes it from here
                    yield beam.pvalue.TaggedOutput(HANDED_OFF, ref)
            else:
                encoding = detect_encoding(head, ref.size)
                stats.encoding = encoding.codec
                yield from self._chunks_of(ref, tracker, reader, encoding, stats)
        except UndecodableError as e:
            finish_restriction(tracker)
            if owns_head:  # every restriction decides alike; one record per object
                yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'decode', e, 0, ref.size))
                stats.fail(f'undecodable: {e}')
        except OSError as e:  # the store's errors (StoreError is one), local I/O errors
            finish_restriction(tracker)
            _log.warning('read of %s [%d, %d) failed: %s', ref.uri, rng.start, rng.stop, e)
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'read', e, rng.start, rng.stop))
            stats.fail(read_failure_reason(e))
        stats.bytes_read = reader.bytes_read + (head_reader.bytes_read if not owns_head else 0)
        self._bytes_read.inc(stats.bytes_read)
        self._chunks.inc(stats.chunks)
        self._monitor.sample(ref.uri)
        count_dynamic_split(tracker, rng.stop)
        WORK.add(bytes_read=stats.bytes_read,
                 objects_done=int(tracker.current_restriction().stop >= ref.size
                                  and stats.kind is not None))
        yield beam.pvalue.TaggedOutput(STATS, (ref, stats))

    def _chunks_of(self, ref: ObjectRef, tracker, reader: ByteWindowReader,
                   encoding: TextEncoding, stats: ObjectStats) -> Iterator:
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
            try:
                with self._monitor.timed(ref.uri):  # the store's reads and the decoding
                    raw = reader.fetch(start, end)
                    reader.release(end - keep)
                    text = raw.decode(encoding.codec)
            except UnicodeDecodeError as e:
                stats.errors += 1
                yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'decode', e, start, end))
                continue
            if is_blank(text):
                continue
            cid, id64 = chunk_id(ref.uri, ref.version, None, start, end, tag)
            stats.chunks += 1
            yield Chunk(cid, id64, ref.uri, ref.version, 'text', None, start, end, text,
                        encoding=encoding.codec)
