"""Small records that flow through the pipeline, and the Arrow schemas derived from them.

Each record is a small dataclass. Beam 2.62 (the version ragbeam pins, README "Runners") has
no schema rows for dataclasses, so a record crossing a shuffle is pickled; no record is ever a
shuffle key (keys are URIs), so no coder needs to be deterministic. The Parquet schemas of the chunk and
manifest tables are derived from the same definitions (`arrow_schema`), so a column is
declared in one place. No `from __future__ import annotations` here: Beam reads these
annotations to build the row schemas.
"""
import collections.abc
import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Optional, Sequence

import pyarrow as pa
from apache_beam.typehints.native_type_compatibility import convert_to_beam_type


def record(cls):
    """Marks a record type; the one place to give records a coder of their own."""
    return cls


def typed(outputs, **tagged_types):
    """The outputs of `ParDo(...).with_outputs(...)`, with the given element types on its
    tagged PCollections: Beam 2.62's `with_output_types` types only the main output, and a
    tagged output left as Any gets a pickled coder that Prism cannot key or split on."""
    for tag, hint in tagged_types.items():
        outputs[tag].element_type = convert_to_beam_type(hint)
    return outputs


def _arrow(arrow_type: pa.DataType, **kwargs):
    """A dataclass field whose Arrow column type is not the default for its Python type."""
    return field(metadata={'arrow': arrow_type}, **kwargs)


@record
@dataclass(frozen=True)
class ObjectRef:
    """One listed object: where it is, how big, and the version every read is pinned to."""
    uri: str
    size: int
    version: str
    modified: float = 0.0  # last-modified time, seconds since the epoch (0: not known)


@record
@dataclass(frozen=True)
class Entity:
    """A named entity in a chunk's text: its text, label and [start, end) character offsets."""
    text: str
    label: str
    start: int = _arrow(pa.int32())
    end: int = _arrow(pa.int32())


@record
@dataclass(frozen=True)
class Chunk:
    """One chunk of an object's text, from the reader to the sink; enrichment and embedding
    return it with more fields filled in."""
    chunk_id: str
    id64: int
    uri: str
    version: str
    kind: str
    page: Optional[int] = _arrow(pa.int32())
    start: int = 0
    end: int = 0
    text: str = ''
    embedding: Optional[bytes] = None   # float32, native byte order; a list column in Parquet
    model: Optional[str] = None
    encoding: Optional[str] = None
    extractor: Optional[str] = None  # what gave a pdf page's text: pdfium-<build>, pypdf-<ver>, tesseract-<ver>
    entities: Optional[Sequence[Entity]] = None


@record
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


STATUS_RANK = {'failed': 0, 'skipped': 1}  # an object's status: the first that any record has


@record
@dataclass
class ObjectStats:
    """What one restriction of an object produced, counted while it is read; the stats of an
    object's restrictions are merged into its manifest row."""
    chunks: int = 0
    bytes_read: int = 0
    errors: int = 0
    ocr_needed: int = 0
    encoding: Optional[str] = None
    kind: Optional[str] = None
    pages: Optional[int] = None
    extractor: Optional[str] = None
    status: Optional[str] = None  # 'failed' or 'skipped' when the object as a whole is
    reason: Optional[str] = None

    def fail(self, reason: str) -> None:
        """Marks the whole object failed, with the manifest's reason; counts as one error."""
        self.status, self.reason = 'failed', reason
        self.errors += 1

    def merge(self, other: 'ObjectStats') -> 'ObjectStats':
        """Adds counts; keeps the object-level status of whichever side has one (failed wins)."""
        first, second = sorted((self, other), key=lambda s: (
            STATUS_RANK.get(s.status or '', 2), s.reason or ''))
        return ObjectStats(
            chunks=self.chunks + other.chunks,
            bytes_read=self.bytes_read + other.bytes_read,
            errors=self.errors + other.errors,
            ocr_needed=self.ocr_needed + other.ocr_needed,
            encoding=self.encoding or other.encoding,
            kind=self.kind or other.kind,
            pages=self.pages if self.pages is not None else other.pages,
            extractor=self.extractor or other.extractor,
            status=first.status or second.status,
            reason=first.reason or second.reason)


@record
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
    errors: int = 0
    pages: Optional[int] = None
    ocr_needed_pages: int = 0
    fingerprint: Optional[str] = None  # the settings it was read with (transforms.corpus)
    extractor: Optional[str] = None  # the PDF engine that opened it: pdfium-<build> or pypdf-<ver>


@record
@dataclass(frozen=True)
class CommittedObject:
    """An object of the committed manifest, as much of it as the diff needs."""
    uri: str
    version: str
    status: str
    fingerprint: Optional[str] = None


_PLAIN = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_(),
          bytes: pa.binary()}


def _arrow_type(hint, metadata) -> pa.DataType:
    if 'arrow' in metadata:
        return metadata['arrow']
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union:  # Optional[X]
        return _arrow_type(args[0], {})
    if dataclasses.is_dataclass(hint):
        return pa.struct([pa.field(f.name, _arrow_type(t, f.metadata))
                          for f, t in _fields(hint)])
    if typing.get_origin(hint) in (list, tuple, collections.abc.Sequence):
        return pa.list_(_arrow_type(args[0], {}))
    return _PLAIN[hint]


def _fields(cls) -> list[tuple[dataclasses.Field, type]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def arrow_schema(cls, **overrides: pa.DataType) -> pa.Schema:
    """The Arrow schema of a record's table: one column per field, in field order; `overrides`
    give some columns other types (the chunk embedding's list size, say)."""
    return pa.schema([(f.name, overrides.get(f.name) or _arrow_type(t, f.metadata))
                      for f, t in _fields(cls)])


def chunk_schema(dim: int) -> pa.Schema:
    """The chunk table (README, "Chunk schema"): embeddings as lists of `dim` float32, the
    size in the field's metadata (`dim`): Delta Lake has no fixed-size lists."""
    schema = arrow_schema(Chunk)
    at = schema.get_field_index('embedding')
    return schema.set(at, pa.field('embedding', pa.list_(pa.float32()),
                                   metadata={'dim': str(dim)}))


def embedding_dim(schema: pa.Schema) -> int:
    """The embedding size of a chunk table's schema (metadata, or a fixed-size list's size)."""
    f = schema.field('embedding')
    if f.metadata and b'dim' in f.metadata:
        return int(f.metadata[b'dim'])
    return getattr(f.type, 'list_size', -1)


MANIFEST_SCHEMA = arrow_schema(ManifestRow)
