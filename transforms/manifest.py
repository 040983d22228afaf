"""Accounting: one manifest row per listed object, from its listing and its read stats."""
from __future__ import annotations

from functools import reduce
from typing import Iterable, Optional

import apache_beam as beam

from transforms.types import ManifestRow, ObjectRef, ObjectStats


def manifest_row(ref: ObjectRef, stats: Iterable[ObjectStats], skipped: Optional[str]) -> ManifestRow:
    """The row of one object: skipped (reason from the listing), failed or ok."""
    total = reduce(ObjectStats.merge, stats, ObjectStats())
    if skipped:
        status, reason = 'skipped', skipped
    else:
        status, reason = total.status or 'ok', total.reason
    return ManifestRow(uri=ref.uri, size=ref.size, version=ref.version, status=status,
                       chunks=total.chunks, bytes_read=total.bytes_read, reason=reason,
                       kind=total.kind, encoding=total.encoding, errors=total.errors,
                       pages=total.pages, ocr_needed_pages=total.ocr_needed,
                       extractor=total.extractor)


class BuildManifest(beam.PTransform):
    """Joins (uri, ObjectRef) with (uri, ObjectStats) and (uri, skip reason) into ManifestRows."""

    def expand(self, inputs):
        refs, stats, skipped = inputs
        return ({'ref': refs, 'stats': stats, 'skipped': skipped}
                | 'Join' >> beam.CoGroupByKey()
                | 'Row' >> beam.MapTuple(lambda uri, g: manifest_row(
                    g['ref'][0], g['stats'], g['skipped'][0] if g['skipped'] else None)))
