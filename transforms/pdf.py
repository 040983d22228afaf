"""PDFs: opened over ranged reads, split into page ranges, extracted page by page.

`ReadPdfs` hides two DoFns. `OpenPdfs` opens each PDF once (trailer, cross-reference table,
page tree) to count its pages and to fail early on broken or password-protected files.
`ReadPdfChunks` is a splittable DoFn whose restriction is a page range: each worker re-opens
the PDF over the same ranged reads and extracts only its pages, so one big PDF is spread
over many workers and no worker holds more than its block cache and one page. pypdf runs in
a child process (transforms.pdf_sandbox), so a page that takes too long or too much memory
is cut off without harm to the worker.
"""
from __future__ import annotations

import io
import itertools
import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.restriction_trackers import OffsetRange
from apache_beam.metrics import Metrics

from transforms.chunk import ChunkerSettings, chunk_id, text_spans
from transforms.pdf_sandbox import PdfError, PdfLimits, PdfSandbox
from transforms.monitor import WORK, MonitorOptions, StageMonitor
from transforms.progress import Progress
from transforms.readers import (ERRORS, HANDED_OFF, STATS, OffsetRangeSplits, ReadResult,
                                error_record, finish_restriction, is_blank, is_pdf_name,
                                read_failure_reason)
from transforms.store import StoreConfig, store_for
from transforms.types import Chunk, ErrorRecord, ObjectRef, ObjectStats, record

OCR_ENGINES = ('none', 'tesseract')

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PdfOptions:
    """How PDFs are split, bounded and OCR'd."""
    pages_per_split: int = field(default=16, metadata={
        'flag': '--pdf-pages-per-split',
        'help': 'initial split of one PDF: the unit of parallelism inside a big PDF'})
    ocr: str = field(default='none', metadata={
        'flag': '--ocr', 'choices': OCR_ENGINES,
        'help': 'tesseract: OCR pages that have images but no text layer'})
    limits: PdfLimits = field(default_factory=PdfLimits)

    def validate(self) -> None:
        if self.pages_per_split < 1:
            raise ValueError('--pdf-pages-per-split must be at least 1')
        self.limits.validate()


@record
@dataclass(frozen=True)
class PdfDocument:
    """A PDF that opened, and its page count: the element of the page-range SDF."""
    ref: ObjectRef
    pages: int


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
        opened = refs | 'Open' >> beam.ParDo(OpenPdfs(self._options, self._store, self._monitor)).with_output_types(
            PdfDocument, errors=ErrorRecord, stats=tuple[str, ObjectStats], handed_off=ObjectRef
        ).with_outputs(ERRORS, STATS, HANDED_OFF, main='documents')
        pages = opened.documents | 'ReadPages' >> beam.ParDo(
            ReadPdfChunks(self._chunker, self._options, self._store, self._monitor)).with_output_types(
            Chunk, errors=ErrorRecord, stats=tuple[str, ObjectStats]
        ).with_outputs(ERRORS, STATS, main='chunks')
        errors = (opened[ERRORS], pages[ERRORS]) | 'Errors' >> beam.Flatten()
        stats = (opened[STATS], pages[STATS]) | 'Stats' >> beam.Flatten()
        return ReadResult(pages.chunks, errors, stats, opened[HANDED_OFF])


class _SandboxDoFn(beam.DoFn):
    """A DoFn with one pypdf sandbox process per instance, started on first use."""

    def __init__(self, options: PdfOptions, store_config: StoreConfig, monitor: MonitorOptions):
        self._options = options
        self._store_config = store_config
        self._sandbox: Optional[PdfSandbox] = None
        self._read = StageMonitor('read', monitor.memory_warn_mb)
        self._child = StageMonitor('pdf_child', monitor.memory_warn_mb)

    def setup(self) -> None:
        self._sandbox = PdfSandbox(self._options.limits)

    def teardown(self) -> None:
        if self._sandbox is not None:
            self._sandbox.close()

    def _open(self, ref: ObjectRef) -> int:
        store = store_for(ref.uri, self._store_config)
        self._sandbox.bytes_read = 0
        try:
            with self._read.timed(ref.uri):
                return self._sandbox.open(lambda a, b: store.read_range(ref, a, b), ref.size)
        finally:
            self._sample(ref)

    def _sample(self, ref: ObjectRef) -> None:
        """The memory of this worker and of its pypdf process."""
        self._read.sample(ref.uri)
        self._child.sample(ref.uri, rss=self._sandbox.child_rss_mb())


def open_failure_reason(e: Exception) -> str:
    """The manifest reason of a PDF that could not be opened."""
    if isinstance(e, PdfError):
        if e.error_type == 'PasswordRequired':
            return 'password required'
        return f'unreadable pdf: {e.error_type}: {e}'
    return read_failure_reason(e)


class OpenPdfs(_SandboxDoFn):
    """ObjectRef -> PdfDocument, or a failed object with the reason it does not open.

    An object without a .pdf name (sent for the PDF header in its content) that does not
    open as a PDF is handed back to the text reader, with the PDF error on record.
    Its pypdf process ends with each bundle: opening is one short stage, and the idle child
    would otherwise hold ~45 MB beside the page reader's for the rest of the run.
    """

    def finish_bundle(self) -> None:
        self._sandbox.close()

    def process(self, ref: ObjectRef) -> Iterator:
        try:
            pages = self._open(ref)
        except (PdfError, OSError) as e:
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'open', e))
            stats = ObjectStats(bytes_read=self._sandbox.bytes_read, errors=1)
            if (isinstance(e, PdfError) and e.error_type != 'PasswordRequired'
                    and not is_pdf_name(ref.uri)):
                _log.info('ragbeam: %s has a PDF header but does not open as a PDF (%s); '
                          'reading it as text', ref.uri, e)
                yield beam.pvalue.TaggedOutput(HANDED_OFF, ref)
            else:
                stats = ObjectStats(bytes_read=stats.bytes_read, kind='pdf')
                stats.fail(open_failure_reason(e))
            WORK.add(bytes_read=stats.bytes_read, objects_done=int(stats.status == 'failed'))
            yield beam.pvalue.TaggedOutput(STATS, (ref.uri, stats))
            return
        WORK.add(bytes_read=self._sandbox.bytes_read)
        yield beam.pvalue.TaggedOutput(STATS, (ref.uri, ObjectStats(
            kind='pdf', pages=pages, bytes_read=self._sandbox.bytes_read)))
        yield PdfDocument(ref, pages)


class ReadPdfChunks(_SandboxDoFn, OffsetRangeSplits):
    """Splittable DoFn: PdfDocument -> Chunks of the pages in [start, stop).

    Chunk offsets are characters of the page's extracted text, pages are 1-based. A page that
    fails is an error record with its page number; the other pages are still ingested. An
    image-only page is OCR'd with --ocr tesseract, else recorded as `ocr_needed`.
    Its pypdf process ends with each bundle too, before the sinks downstream flush their last
    row groups: with the model loaded, that flush is the run's peak of memory.
    """

    def __init__(self, settings: ChunkerSettings, options: PdfOptions, store_config: StoreConfig,
                 monitor: MonitorOptions = MonitorOptions()):
        super().__init__(options, store_config, monitor)
        self._settings = settings
        self.split_size = options.pages_per_split
        self._pages = Metrics.counter('ragbeam', 'pdf_pages')

    def finish_bundle(self) -> None:
        self._sandbox.close()

    def initial_restriction(self, doc: PdfDocument) -> OffsetRange:
        return OffsetRange(0, doc.pages)

    def restriction_size(self, doc: PdfDocument, restriction: OffsetRange) -> int:
        """Remaining pages, weighted by the object's bytes per page (what autoscaling reads)."""
        return restriction.size() * max(1, doc.ref.size // max(1, doc.pages))

    def process(self, doc: PdfDocument, tracker=beam.DoFn.RestrictionParam()):
        ref = doc.ref
        stats = ObjectStats(kind='pdf')
        try:
            self._open(ref)
        except (PdfError, OSError) as e:
            finish_restriction(tracker)
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'open', e))
            stats.fail(open_failure_reason(e))
        else:
            first = tracker.current_restriction().start
            progress = Progress(ref.uri, first, tracker.current_restriction().stop, 'page')
            for index in itertools.count(first):
                if not tracker.try_claim(index):
                    break
                progress.update(index)
                yield from self._page_chunks(ref, index, stats)
                self._sample(ref)
            self._pages.inc(tracker.current_restriction().stop - first)
        stats.bytes_read = self._sandbox.bytes_read
        WORK.add(bytes_read=stats.bytes_read,
                 objects_done=int(tracker.current_restriction().stop >= doc.pages))
        yield beam.pvalue.TaggedOutput(STATS, (ref.uri, stats))

    def _page_chunks(self, ref: ObjectRef, index: int, stats: ObjectStats) -> Iterator:
        page = index + 1
        try:
            with self._read.timed(ref.uri):  # the child's extraction is the read's time
                text, has_images = self._sandbox.page(index)
            if is_blank(text) and has_images:
                if self._options.ocr != 'tesseract':
                    stats.ocr_needed += 1
                    yield beam.pvalue.TaggedOutput(ERRORS, ErrorRecord(
                        uri=ref.uri, stage='ocr', error_type='ocr_needed', version=ref.version,
                        page=page, message='the page has images but no text layer; run with --ocr tesseract'))
                    return
                with self._read.timed(ref.uri):
                    text = self._ocr(index)
        except (PdfError, OSError) as e:
            stats.errors += 1
            yield beam.pvalue.TaggedOutput(ERRORS, error_record(ref, 'extract', e, page=page))
            return
        tag = self._settings.tag()
        for start, end in text_spans(text, self._settings):
            piece = text[start:end]
            if is_blank(piece):
                continue
            cid, id64 = chunk_id(ref.uri, ref.version, page, start, end, tag)
            stats.chunks += 1
            yield Chunk(cid, id64, ref.uri, ref.version, 'pdf', page, start, end, piece)

    def _ocr(self, index: int) -> str:
        """Text of a scanned page: each image of the page through tesseract."""
        import pytesseract
        from PIL import Image

        try:
            return '\n'.join(pytesseract.image_to_string(Image.open(io.BytesIO(png)))
                             for png in self._sandbox.page_images(index))
        except (pytesseract.TesseractError, pytesseract.TesseractNotFoundError) as e:
            raise PdfError(type(e).__name__, str(e))
