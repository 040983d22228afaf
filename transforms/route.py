"""Routing listed objects: skipped before any read (with a reason), or to the PDF or text reader.

The manifest row of each object is merged from its stats records alone (transforms.manifest):
the readers give one per restriction they read, and Route gives one to each object that no
reader reports on, a skipped or an empty one."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple, Optional

import apache_beam as beam

from transforms.monitor import WORK
from transforms.readers import is_pdf_name
from transforms.types import ObjectRef, ObjectStats, typed


@dataclass(frozen=True)
class RouteOptions:
    """Which listed objects are skipped before any read."""
    max_object_bytes: Optional[int] = field(default=None, metadata={
        'flag': '--max-object-bytes', 'size': True, 'default_text': 'none',
        'help': 'larger objects are skipped with a reason, before any read'})

    def validate(self) -> None:
        if self.max_object_bytes is not None and self.max_object_bytes < 0:
            raise ValueError('--max-object-bytes must not be negative')

    def skip_reason(self, ref: ObjectRef) -> Optional[str]:
        """Why an object is skipped, from its listing alone (None: read it)."""
        if self.max_object_bytes is not None and ref.size > self.max_object_bytes:
            return f'too large: {ref.size} bytes > --max-object-bytes {self.max_object_bytes}'
        return None


class Routes(NamedTuple):
    """Where the listed objects go: refs for the text and PDF readers, and (ref, stats) of
    the skipped objects (with the reason) and of the empty ones."""
    text: beam.PCollection
    pdf: beam.PCollection
    stats: beam.PCollection


class Route(beam.PTransform):
    """(uri, ObjectRef) -> Routes. PDFs by name go to the PDF reader; everything else to the
    text reader, which hands on what turns out to be a PDF by its header."""

    def __init__(self, options: RouteOptions):
        super().__init__()
        self._options = options

    def expand(self, refs) -> Routes:
        routed = typed(refs | 'Route' >> beam.ParDo(_RouteFn(self._options)).with_output_types(
            ObjectRef).with_outputs('pdf', 'stats', main='text'),
            pdf=ObjectRef, stats=tuple[ObjectRef, ObjectStats])
        return Routes(routed.text, routed.pdf, routed.stats)


class _RouteFn(beam.DoFn):
    def __init__(self, options: RouteOptions):
        self._options = options

    def process(self, element):
        uri, ref = element
        reason = self._options.skip_reason(ref)
        if reason or not ref.size:  # no reader reports on these (an empty object: no range)
            yield beam.pvalue.TaggedOutput('stats', (ref, ObjectStats(
                status='skipped' if reason else None, reason=reason)))
        if reason:
            WORK.add(objects_done=1)
        elif is_pdf_name(uri):
            yield beam.pvalue.TaggedOutput('pdf', ref)
        else:
            yield ref
