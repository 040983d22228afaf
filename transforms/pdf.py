"""PDFs: opened over ranged reads, planned as page ranges, extracted page by page.

`ReadPdfs` hides two DoFns. `OpenPdfs` opens each PDF (trailer, cross-reference table, page
tree) to count its pages and to fail early on broken or password-protected files. It reads a
PDF under `--pdf-min-split-bytes` whole, and of a bigger one its first `--pdf-pages-per-split`
pages while it has the document open, and plans the rest as small `PdfRange` records. Those
cross a Reshuffle, so a runner spreads one big PDF's ranges, and a folder's, over all its
workers: the FnApiRunner, Flink and Dataflow never split a restriction while it runs. `ReadPdfChunks` is a splittable DoFn over one range (Prism may
split it further). The engine (PDFium by default, or pypdf) runs in a child process
(transforms.pdf_sandbox) that keeps the document open between the ranges a worker reads of
it, so each of its bytes is read about once.
"""
from __future__ import annotations

import atexit
import io
import itertools
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.metrics import Metrics

from transforms.chunk import ChunkerSettings, chunk_id, text_spans
from transforms.monitor import WORK, MonitorOptions, StageMonitor, read_slot
from transforms.pdf_engines import ENGINES
from transforms.pdf_sandbox import PdfError, PdfLimits, PdfSandbox
from transforms.progress import Progress
from transforms.ranged_file import BLOCK_BYTES, MAX_BLOCKS
from transforms.readers import (ERRORS, HANDED_OFF, STATS, OffsetRangeSplits, ReadResult,
                                count_dynamic_split, error_record, finish_restriction, is_blank,
                                is_pdf_name, read_failure_reason)
from transforms.store import StoreConfig, store_for
from transforms.textract import EXTRACTOR as TEXTRACT_EXTRACTOR
from transforms.textract import TextractOptions, TextractPages
from transforms.types import Chunk, ErrorRecord, ObjectRef, ObjectStats, record, typed

OCR_ENGINES = ('none', 'tesseract', 'textract')
RANGES = 'ranges'
# A planned range holds this many restrictions of --pdf-pages-per-split pages. The worker that
# gets it reads them one after the other with the document open; a range on another worker
# opens it again (the trailer, cross-reference data and resources its pages use).
SPAN_SPLITS = 4

WORK_LOG_ENV = 'RAGBEAM_TEST_WORK_LOG'  # tests: a file each worker appends its PDF work to

_log = logging.getLogger(__name__)


def _log_work(unit: str, ref: ObjectRef, start: int, stop: int) -> None:
    """Which worker process read which pages (RAGBEAM_TEST_WORK_LOG): the balance test's record."""
    path = os.environ.get(WORK_LOG_ENV)
    if path:
        with open(path, 'a') as f:
            f.write(json.dumps({'pid': os.getpid(), 'unit': unit, 'uri': ref.uri,
                                'start': start, 'stop': stop}) + '\n')


@dataclass(frozen=True)
class PdfOptions:
    """Which engine reads PDFs, how they are split and bounded, and how scans are OCR'd."""
    engine: str = field(default='pdfium', metadata={
        'flag': '--pdf-engine', 'choices': ENGINES,
        'help': 'pdfium (fast, C++, in a sandboxed process) or pypdf; a PDF that PDFium cannot '
                'load is tried with pypdf'})
    pages_per_split: int = field(default=16, metadata={
        'flag': '--pdf-pages-per-split',
        'help': 'pages per restriction: the unit of parallelism inside a big PDF'})
    min_split_bytes: int = field(default=BLOCK_BYTES * MAX_BLOCKS, metadata={
        'flag': '--pdf-min-split-bytes', 'size': True,
        'help': "smaller PDFs are read whole by the worker that opens them (they fit its "
                "engine's block cache, and another worker would read them again); larger "
                "ones are planned as page ranges for every worker"})
    ocr: str = field(default='none', metadata={
        'flag': '--ocr', 'choices': OCR_ENGINES,
        'help': 'OCR the pages that have images but no text layer: tesseract here, or '
                'textract: AWS Textract on the S3 object itself (s3:// inputs only)'})
    ocr_dpi: int = field(default=300, metadata={
        'flag': '--ocr-dpi', 'help': 'resolution a page is rendered at for OCR'})
    ocr_lang: str = field(default='eng', metadata={
        'flag': '--ocr-lang', 'help': "tesseract's languages, e.g. eng or eng+deu"})
    textract: TextractOptions = field(default_factory=TextractOptions)
    limits: PdfLimits = field(default_factory=PdfLimits)

    def validate(self) -> None:
        if self.pages_per_split < 1:
            raise ValueError('--pdf-pages-per-split must be at least 1')
        if self.min_split_bytes < 0:
            raise ValueError('--pdf-min-split-bytes must not be negative')
        if not 36 <= self.ocr_dpi <= 1200:
            raise ValueError('--ocr-dpi must be between 36 and 1200')
        self.textract.validate()
        self.limits.validate()


@record
@dataclass(frozen=True)
class PdfRange:
    """Pages [start, stop) of an opened PDF of `pages` pages: the planned unit of work."""
    ref: ObjectRef
    pages: int
    start: int
    stop: int


class ReadPdfs(beam.PTransform):
    """ObjectRefs of PDFs -> ReadResult: chunks of every page, errors, stats, and the refs of
    objects that were sent here for a PDF header in their content but do not open as PDFs
    (the text reader tries them again)."""

    def __init__(self, chunker: ChunkerSettings, options: PdfOptions, store: StoreConfig,
                 monitor: MonitorOptions = MonitorOptions()):
        super().__init__()
        self._chunker, self._options, self._store = chunker, options, store
        self._monitor = monitor

    def expand(self, refs) -> ReadResult:
        args = (self._chunker, self._options, self._store, self._monitor)
        opened = typed(refs | 'Open' >> beam.ParDo(OpenPdfs(*args)).with_output_types(
            Chunk).with_outputs(ERRORS, STATS, HANDED_OFF, RANGES, main='chunks'),
            errors=ErrorRecord, stats=tuple[ObjectRef, ObjectStats], handed_off=ObjectRef,
            ranges=PdfRange)
        pages = typed(opened[RANGES]
                      | 'Spread' >> beam.Reshuffle()
                      | 'ReadPages' >> beam.ParDo(ReadPdfChunks(*args)).with_output_types(
                          Chunk).with_outputs(ERRORS, STATS, main='chunks'),
                      errors=ErrorRecord, stats=tuple[ObjectRef, ObjectStats])
        errors = (opened[ERRORS], pages[ERRORS]) | 'Errors' >> beam.Flatten()
        return ReadResult((opened.chunks, pages.chunks), errors, (opened[STATS], pages[STATS]),
                          opened[HANDED_OFF])


class _Pool:
    """The engine processes of this worker process, shared by its PDF DoFns and lent out one
    element at a time; a process that holds the asked-for document is lent first. The idle
    ones end with each bundle (`close`): the sinks downstream flush their last row groups
    then, with the model loaded the run's peak of memory, and an idle engine would sit
    beside them with its last document open. A child whose parent is gone reads the end of
    its pipe and exits."""

    def __init__(self):
        self._lock = threading.Lock()
        self._idle: dict[tuple, list[PdfSandbox]] = {}

    def take(self, settings: tuple, key) -> PdfSandbox:
        with self._lock:
            idle = self._idle.setdefault(settings, [])
            for n, sandbox in enumerate(idle):
                if sandbox.holds(key):
                    return idle.pop(n)
            if idle:
                return idle.pop()
        return PdfSandbox(*settings)

    def give(self, settings: tuple, sandbox: PdfSandbox) -> None:
        with self._lock:
            self._idle.setdefault(settings, []).append(sandbox)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, {}
        for sandboxes in idle.values():
            for sandbox in sandboxes:
                sandbox.close()


_POOL = _Pool()
atexit.register(_POOL.close)


class _PdfDoFn(beam.DoFn):
    """What both PDF DoFns share: the engine processes, the monitors, and the page reader."""

    def __init__(self, settings: ChunkerSettings, options: PdfOptions, store_config: StoreConfig,
                 monitor: MonitorOptions = MonitorOptions()):
        self._settings = settings
        self._options = options
        self._store_config = store_config
        self._engine_settings = (options.limits, options.engine)
        self._read = StageMonitor('read', monitor.memory_warn_mb)
        self._child = StageMonitor('pdf_child', monitor.memory_warn_mb)
        self._slots = monitor.reads_per_worker
        self._pages = Metrics.counter('ragbeam', 'pdf_pages')
        self._restarts = Metrics.counter('ragbeam', 'pdf_engine_restarts')
        self._tesseract: Optional[str] = None
        self._textract: Optional[TextractPages] = None

    def finish_bundle(self) -> None:
        _POOL.close()

    def _take(self, ref: ObjectRef) -> PdfSandbox:
        return _POOL.take(self._engine_settings, (ref.uri, ref.version))

    def _give(self, sandbox: PdfSandbox) -> None:
        if sandbox.restarts:
            self._restarts.inc(sandbox.restarts)
            sandbox.restarts = 0
        _POOL.give(self._engine_settings, sandbox)

    def _open(self, sandbox: PdfSandbox, ref: ObjectRef) -> tuple[int, str]:
        """(pages, extractor) of the PDF, opened in the engine process unless it holds it."""
        store = store_for(ref.uri, self._store_config)
        try:
            with self._read.timed(ref.uri):
                return sandbox.open(lambda a, b: store.read_range(ref, a, b), ref.size,
                                    key=(ref.uri, ref.version))
        finally:
            self._sample(sandbox, ref)

    def _sample(self, sandbox: PdfSandbox, ref: ObjectRef) -> None:
        """The memory of this worker and of its engine process."""
        self._read.sample(ref.uri)
        self._child.sample(ref.uri, rss=sandbox.child_rss_mb())

    def _page_chunks(self, sandbox: PdfSandbox, ref: ObjectRef, pages: int, index: int,
                     extractor: str, stats: ObjectStats) -> Iterator:
        """The chunks of page `index` (0-based), or its error record."""
        page = index + 1
        try:
            with self._read.timed(ref.uri):  # the engine's extraction is the read's time
                text, has_images = sandbox.page(index)
            if is_blank(text) and has_images:
                if self._options.ocr == 'none':
                    stats.ocr_needed += 1
                    yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                        uri=ref.uri, stage='ocr', error_type='ocr_needed', version=ref.version,
                        page=page, message='the page has images but no text layer; run with '
                                           '--ocr tesseract (or textract, on S3)'))
                    return
                with self._read.timed(ref.uri):
                    text, extractor = self._ocr(sandbox, ref, pages, index)
        except (PdfError, OSError) as e:
            stats.errors += 1
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'extract', e, page=page))
            return
        finally:
            self._sample(sandbox, ref)
        tag = self._settings.tag()
        for start, end in text_spans(text, self._settings):
            piece = text[start:end]
            if is_blank(piece):
                continue
            cid, id64 = chunk_id(ref.uri, ref.version, page, start, end, tag)
            stats.chunks += 1
            yield Chunk(cid, id64, ref.uri, ref.version, 'pdf', page, start, end, piece,
                        extractor=extractor)

    def _ocr(self, sandbox: PdfSandbox, ref: ObjectRef, pages: int,
             index: int) -> tuple[str, str]:
        """(text, extractor) of a scanned page: Textract's for the object, or PDFium renders
        the page at --ocr-dpi and tesseract reads it (with pypdf, the page's embedded images
        are read instead)."""
        if self._options.ocr == 'textract':
            if self._textract is None:
                self._textract = TextractPages(self._options.textract, self._textract_client)
            return self._textract.page(ref, pages, index), TEXTRACT_EXTRACTOR
        import pytesseract
        from PIL import Image

        try:
            if self._tesseract is None:
                self._tesseract = f'tesseract-{pytesseract.get_tesseract_version()}'
            text = '\n'.join(
                pytesseract.image_to_string(Image.open(io.BytesIO(png)), lang=self._options.ocr_lang)
                for png in sandbox.page_images(index, self._options.ocr_dpi))
        except (pytesseract.TesseractError, pytesseract.TesseractNotFoundError) as e:
            raise PdfError(type(e).__name__, str(e))
        return text, self._tesseract


    def _textract_client(self):
        import boto3

        config = self._store_config
        return boto3.client('textract', endpoint_url=self._options.textract.endpoint_url,
                            region_name=config.s3_region or None)


def open_failure_reason(e: Exception) -> str:
    """The manifest reason of a PDF that could not be opened."""
    if isinstance(e, PdfError):
        if e.error_type == 'PasswordRequired':
            return 'password required'
        return f'unreadable pdf: {e.error_type}: {e}'
    return read_failure_reason(e)


class OpenPdfs(_PdfDoFn):
    """ObjectRef -> the chunks of its first range and PdfRanges of the rest, or a failed
    object with the reason it does not open.

    An object without a .pdf name (sent for the PDF header in its content) that does not
    open as a PDF is handed back to the text reader, with the PDF error on record.
    """

    def process(self, ref: ObjectRef) -> Iterator:
        with read_slot(self._slots):
            yield from self._open_object(ref)

    def _open_object(self, ref: ObjectRef) -> Iterator:
        sandbox = self._take(ref)
        before = sandbox.bytes_read
        try:
            try:
                pages, extractor = self._open(sandbox, ref)
            except (PdfError, OSError) as e:
                yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'open', e))
                stats = ObjectStats(bytes_read=sandbox.bytes_read - before, errors=1)
                if (isinstance(e, PdfError) and e.error_type != 'PasswordRequired'
                        and not is_pdf_name(ref.uri)):
                    _log.info('ragbeam: %s has a PDF header but does not open as a PDF (%s); '
                              'reading it as text', ref.uri, e)
                    yield beam.pvalue.TaggedOutput(HANDED_OFF, ref)
                else:
                    stats = ObjectStats(bytes_read=stats.bytes_read, kind='pdf')
                    stats.fail(open_failure_reason(e))
                WORK.add(bytes_read=stats.bytes_read, objects_done=int(stats.status == 'failed'))
                yield beam.pvalue.TaggedOutput(STATS, (ref, stats))
                return
            split = self._options.pages_per_split
            first = pages if ref.size < self._options.min_split_bytes else min(pages, split)
            stats = ObjectStats(kind='pdf', pages=pages, extractor=extractor)
            for index in range(first):
                yield from self._page_chunks(sandbox, ref, pages, index, extractor, stats)
            self._pages.inc(first)
            _log_work('open', ref, 0, first)
            span = split * SPAN_SPLITS
            for start in range(first, pages, span):
                yield beam.pvalue.TaggedOutput(RANGES, PdfRange(
                    ref, pages, start, min(pages, start + span)))
            stats.bytes_read = sandbox.bytes_read - before
            WORK.add(bytes_read=stats.bytes_read, objects_done=int(first == pages))
            yield beam.pvalue.TaggedOutput(STATS, (ref, stats))
        finally:
            self._give(sandbox)


class ReadPdfChunks(_PdfDoFn, OffsetRangeSplits):
    """Splittable DoFn: PdfRange -> Chunks of the pages in [start, stop).

    Chunk offsets are characters of the page's extracted text, pages are 1-based. A page that
    fails is an error record with its page number; the other pages are still ingested. An
    image-only page is OCR'd with --ocr tesseract or textract, else recorded as `ocr_needed`.
    """

    def __init__(self, settings: ChunkerSettings, options: PdfOptions, store_config: StoreConfig,
                 monitor: MonitorOptions = MonitorOptions()):
        super().__init__(settings, options, store_config, monitor)
        self.split_size = options.pages_per_split

    def initial_restriction(self, planned: PdfRange) -> OffsetRange:
        return OffsetRange(planned.start, planned.stop)

    def restriction_size(self, planned: PdfRange, restriction: OffsetRange) -> int:
        """Remaining pages, weighted by the object's bytes per page (what autoscaling reads)."""
        return restriction.size() * max(1, planned.ref.size // max(1, planned.pages))

    def process(self, planned: PdfRange, tracker=beam.DoFn.RestrictionParam()):
        with read_slot(self._slots):
            yield from self._read_range(planned, tracker)

    def _read_range(self, planned: PdfRange, tracker) -> Iterator:
        ref = planned.ref
        stop = tracker.current_restriction().stop
        stats = ObjectStats(kind='pdf')
        sandbox = self._take(ref)
        before = sandbox.bytes_read
        try:
            try:
                pages, extractor = self._open(sandbox, ref)
            except (PdfError, OSError) as e:
                finish_restriction(tracker)
                yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'open', e))
                stats.fail(open_failure_reason(e))
            else:
                first = tracker.current_restriction().start
                _log_work('range', ref, first, tracker.current_restriction().stop)
                progress = Progress(ref.uri, first, tracker.current_restriction().stop, 'page')
                for index in itertools.count(first):
                    if not tracker.try_claim(index):
                        break
                    progress.update(index)
                    yield from self._page_chunks(sandbox, ref, pages, index, extractor, stats)
                self._pages.inc(tracker.current_restriction().stop - first)
                count_dynamic_split(tracker, stop)
            stats.bytes_read = sandbox.bytes_read - before
            WORK.add(bytes_read=stats.bytes_read,
                     objects_done=int(tracker.current_restriction().stop >= planned.pages))
            yield beam.pvalue.TaggedOutput(STATS, (ref, stats))
        finally:
            self._give(sandbox)
