"""The metadata a framework's document carries for a ragbeam hit (the same in each)."""
from __future__ import annotations

from ragbeam.api import Hit


def hit_metadata(hit: Hit) -> dict:
    """uri, page, start, end, score, chunk_id and the ranks; the text is the document's."""
    return {'uri': hit.uri, 'page': hit.page, 'start': hit.start, 'end': hit.end,
            'score': hit.score, 'chunk_id': hit.chunk_id, 'dense_rank': hit.dense_rank,
            'lexical_rank': hit.lexical_rank}
