"""report.json: what a run listed, read, produced and skipped, from its manifest."""
from __future__ import annotations

from collections import Counter
from typing import Optional

import pyarrow.compute as pc

from pipeline.options import RunOptions
from transforms import outputs


def summarise(opts: RunOptions, index_meta: Optional[dict], counters: dict[str, int],
              wall_seconds: float, peak_rss_mb: float) -> dict:
    """The run summary (README, "Output layout"), read back from the written manifest."""
    manifest = outputs.ParquetFolder(outputs.path(opts.output, 'manifest'), opts.store)
    table = manifest.table(['status', 'size', 'bytes_read', 'chunks', 'reason'])
    status = Counter(table.column('status').to_pylist())
    skipped_bytes = pc.sum(pc.filter(table.column('size'),
                                     pc.equal(table.column('status'), 'skipped'))).as_py() or 0
    return {
        'objects_listed': table.num_rows,
        'objects_ok': status.get('ok', 0),
        'objects_failed': status.get('failed', 0),
        'objects_skipped': status.get('skipped', 0),
        'bytes_listed': pc.sum(table.column('size')).as_py() or 0,
        'bytes_read': pc.sum(table.column('bytes_read')).as_py() or 0,
        'bytes_skipped': skipped_bytes,
        'chunks': pc.sum(table.column('chunks')).as_py() or 0,
        'failure_reasons': dict(Counter(
            r.split(':', 1)[0] for r, s in zip(table.column('reason').to_pylist(),
                                               table.column('status').to_pylist())
            if s != 'ok' and r)),
        'embedder': opts.embed.embedder,
        'index': index_meta,
        'counters': counters,
        'wall_seconds': round(wall_seconds, 2),
        'peak_rss_mb': peak_rss_mb,
        'options': opts.summary(),
    }


def one_line(report: dict) -> str:
    """The summary a person reads at the end of a run."""
    return (f"ragbeam: {report['objects_listed']} objects listed: {report['objects_ok']} ok, "
            f"{report['objects_failed']} failed, {report['objects_skipped']} skipped; "
            f"{report['chunks']} chunks from {report['bytes_read']} bytes read in "
            f"{report['wall_seconds']} s, peak RSS {report['peak_rss_mb']} MB")
