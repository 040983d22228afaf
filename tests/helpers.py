"""Chunking an in-memory object restriction by restriction, as the SDF does."""
from __future__ import annotations

from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker

from transforms.chunk import ChunkerSettings, ChunkRule
from transforms.decode import TextEncoding
from transforms.read_text import ByteWindowReader


def chunk_spans(data: bytes, enc: TextEncoding, settings: ChunkerSettings,
                splits: list[int], window: int) -> list[tuple[int, int]]:
    """All chunk spans of `data`, with restrictions cut at `splits` and reads of `window` bytes."""
    cuts = sorted({0, len(data), *(s for s in splits if 0 < s < len(data))})
    spans = []
    for start, stop in zip(cuts, cuts[1:]):
        tracker = OffsetRestrictionTracker(OffsetRange(start, stop))
        rule = ChunkRule(settings, enc, len(data))
        reader = ByteWindowReader(lambda a, b: data[a:b], len(data), window,
                                  limit=stop + settings.reach())
        first = rule.first_chunk_at_or_after(start)
        reader.seek(rule.first_byte_needed(first))
        for s, e in rule.spans(reader.fetch, tracker.try_claim, first):
            reader.fetch(s, e)
            reader.release(e - rule.bytes_to_keep())
            spans.append((s, e))
        tracker.check_done()
    return spans
