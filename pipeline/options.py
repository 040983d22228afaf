"""Typed options of a ragbeam run, separate from Beam's own pipeline options.

Each transform declares its settings as a frozen dataclass beside it (ChunkerSettings,
TextReadOptions, PdfOptions, EmbedOptions, ...). A field that is a command-line flag says
so in its metadata: `flag`, `help`, and optionally `choices`, `size` (parsed by
`parse_size`) and `default_text` (how --help and the README describe a computed default).
The argparse flags, their defaults and their help are built from those fields alone
(`add_flags`, `from_args`): a default is written once, in its dataclass.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shutil
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator

from apache_beam.options.pipeline_options import PipelineOptions, _BeamArgumentParser

from transforms.chunk import ChunkerSettings
from transforms.corpus import BackfillOptions
from transforms.embed import EmbedOptions
from transforms.entities import EntityOptions
from transforms.index import IndexOptions
from transforms.monitor import MonitorOptions
from transforms.pdf import PdfOptions
from transforms.read_text import TextReadOptions
from transforms.route import RouteOptions
from transforms.store import StoreConfig


class UsageError(ValueError):
    """A mistake in the command line or the environment, reported in one line."""


class JobFailed(RuntimeError):
    """The runner lost the job, or reported it failed; nothing of the run was committed."""


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


def format_size(n: int) -> str:
    """8388608 -> '8 MiB': how --help and the README write a byte-size default."""
    for unit, scale in (('GiB', 1 << 30), ('MiB', 1 << 20), ('KiB', 1 << 10)):
        if n >= scale and n % scale == 0:
            return f'{n // scale} {unit}'
    return str(n)


def size_arg(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flag_fields(cls, prefix: str = '') -> Iterator[tuple[str, dataclasses.Field, Any]]:
    """(dest, field, type) of every flag field of `cls` and of the dataclasses it holds."""
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from flag_fields(hint, f'{prefix}{f.name}.')
        elif 'flag' in f.metadata:
            yield f'{prefix}{f.name}', f, hint


def flags_by_name(cls) -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Each flag of `cls` by the Python name of its option (`chunk_size` for --chunk-size):
    (flag, field, type). Keyword arguments and template parameters use these names."""
    return {f.metadata['flag'][2:].replace('-', '_'): (f.metadata['flag'], f, hint)
            for _, f, hint in flag_fields(cls)}


def field_default(f: dataclasses.Field):
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def default_text(f: dataclasses.Field) -> str:
    """A flag's default as --help and the README's option table write it."""
    if 'default_text' in f.metadata:
        return f.metadata['default_text']
    value = field_default(f)
    if f.metadata.get('size') and value is not None:
        return format_size(value)
    if isinstance(value, bool):
        return 'off' if not value else 'on'
    return 'none' if value is None else str(value)


_METAVARS = {int: 'N', float: 'SECONDS', str: 'TEXT'}


def add_flags(parser: argparse.ArgumentParser, cls) -> None:
    """One argparse flag per flag field of `cls` (recursively), default and help from it."""
    for dest, f, hint in flag_fields(cls):
        m = f.metadata
        kwargs: dict[str, Any] = {'dest': dest, 'default': field_default(f),
                                  'help': f"{m['help']} (default: {default_text(f)})"}
        base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
        if base is bool:
            kwargs['action'] = 'store_true'
        else:
            kwargs['type'] = size_arg if m.get('size') else base
            kwargs['metavar'] = m.get('metavar') or ('BYTES' if m.get('size') else
                                                     _METAVARS.get(base, 'VALUE'))
            if 'choices' in m:
                kwargs['choices'] = m['choices']
                kwargs['metavar'] = '|'.join(m['choices'])
        parser.add_argument(m['flag'], **kwargs)


def from_args(cls, args: argparse.Namespace, prefix: str = '', **given):
    """An instance of `cls` from parsed flags (nested dataclasses too); `given` fills the
    fields that are not flags."""
    values = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.name in given:
            values[f.name] = given[f.name]
        elif dataclasses.is_dataclass(hint):
            values[f.name] = from_args(hint, args, f'{prefix}{f.name}.')
        elif 'flag' in f.metadata:
            values[f.name] = getattr(args, f'{prefix}{f.name}')
    return cls(**values)


@dataclass(frozen=True)
class RunOptions:
    """What to ingest, where to write it, and how each stage reads, cuts, enriches and embeds."""
    inputs: list[str]
    output: str
    chunker: ChunkerSettings = field(default_factory=ChunkerSettings)
    text: TextReadOptions = field(default_factory=TextReadOptions)
    pdf: PdfOptions = field(default_factory=PdfOptions)
    route: RouteOptions = field(default_factory=RouteOptions)
    entities: EntityOptions = field(default_factory=EntityOptions)
    embed: EmbedOptions = field(default_factory=EmbedOptions)
    index: IndexOptions = field(default_factory=IndexOptions)
    store: StoreConfig = field(default_factory=StoreConfig)
    monitor: MonitorOptions = field(default_factory=MonitorOptions)
    backfill: BackfillOptions = field(default_factory=BackfillOptions)
    beam_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        """Raises UsageError for values no run can use."""
        try:
            self.chunker.validate()
            self.text.validate(self.chunker)
            self.pdf.validate()
            self.route.validate()
            self.entities.validate()
            self.embed.validate()
            self.index.validate()
            self.store.validate()
            self.monitor.validate()
            self.backfill.validate()
        except ValueError as e:
            raise UsageError(str(e))
        if self.pdf.ocr == 'tesseract':
            _check_tesseract(self.pdf.ocr_lang)
        if self.pdf.ocr == 'textract':
            elsewhere = [i for i in self.inputs if not i.startswith('s3://')]
            if elsewhere:
                raise UsageError(f'--ocr textract reads scans where they lie, on S3: '
                                 f'{elsewhere[0]} is not an s3:// input (use --ocr tesseract)')

    def summary(self) -> dict:
        """The options as written to report.json."""
        return asdict(self)


def _check_tesseract(languages: str) -> None:
    """--ocr tesseract needs the program and the --ocr-lang language packs."""
    if not shutil.which('tesseract'):
        raise UsageError('--ocr tesseract needs the tesseract program '
                         '(Debian/Ubuntu: apt-get install tesseract-ocr) and pytesseract')
    import pytesseract

    have = set(pytesseract.get_languages(config=''))
    missing = [lang for lang in languages.split('+') if lang not in have]
    if missing:
        raise UsageError(f"--ocr-lang {languages}: tesseract has no {', '.join(missing)} "
                         f"(installed: {', '.join(sorted(have))}; Debian/Ubuntu: apt-get install "
                         f"{' '.join('tesseract-ocr-' + m for m in missing)})")


class _OneLineParser(_BeamArgumentParser):
    def error(self, message: str):
        raise UsageError(message)


def _bare_dry_run(args: list[str]) -> list[str]:
    """Beam's --dry_run takes a value; a bare --dry_run means --dry_run=True."""
    return ['--dry_run=True' if a == '--dry_run' and (i + 1 == len(args) or args[i + 1].startswith('-'))
            else a for i, a in enumerate(args)]


def quiet_beam_logs() -> None:
    """Beam's log lines that say nothing wrong, kept out of a run's output."""
    # "No shards found to finalize": Beam's way of saying there were no error records
    logging.getLogger('apache_beam.io.filebasedsink').setLevel(logging.ERROR)
    # "Really destroying service ...": Beam stopping the engine process it started
    logging.getLogger('apache_beam.utils.subprocess_server').setLevel(logging.ERROR)


def store_beam_args(config: StoreConfig, args: list[str]) -> list[str]:
    """Beam's own S3 flags (its FileSystems write the outputs) from ragbeam's, unless given."""
    extra = []
    for flag, value in (('--s3_endpoint_url', config.s3_endpoint_url),
                        ('--s3_region_name', config.s3_region)):
        if value and not any(a == flag or a.startswith(flag + '=') for a in args):
            extra.append(f'{flag}={value}')
    return args + extra


# GCS bucket names: 3-63 characters of lower-case letters, digits, '-', '_' and '.', starting
# and ending with a letter or digit (dotted names may be longer, up to 222).
_GCS_BUCKET = re.compile(r'[a-z0-9](?:[a-z0-9_.-]{1,220})[a-z0-9]')
_GCS_LOCATIONS = ('--temp_location', '--staging_location', '--gcp_temp_location')


def check_gcs_locations(options: PipelineOptions) -> None:
    """A gs:// temp or staging location with an impossible bucket name is a one-line error
    (Beam would try for minutes to create a default bucket over the network instead)."""
    values = options.get_all_options(drop_default=True)
    for flag in _GCS_LOCATIONS:
        location = values.get(flag.lstrip('-'))
        if not location or not str(location).startswith('gs://'):
            continue
        bucket = str(location)[5:].split('/', 1)[0]
        if not _GCS_BUCKET.fullmatch(bucket) or ('.' not in bucket and len(bucket) > 63) \
                or '..' in bucket:
            raise UsageError(f'{flag} {location}: {bucket!r} is not a valid GCS bucket name '
                             '(3-63 lower-case letters, digits, - and _)')


class FlinkRestartOptions(PipelineOptions):
    """The restart strategy of a job on Flink: options of Beam's Java Flink runner that its
    Python SDK does not declare (without them Beam's job server gives a batch job none)."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument('--number_of_execution_retries', type=int, default=None,
                            help='Flink: restart a failed job this many times (fixed delay)')
        parser.add_argument('--execution_retry_delay', type=int, default=None,
                            help='Flink: milliseconds between those restarts')


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
    options = PipelineOptions(args)
    check_gcs_locations(options)
    return options
