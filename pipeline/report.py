"""report.json: what a run listed, read, produced and skipped, from its manifest."""
from __future__ import annotations

import json
import time
from collections import Counter
from typing import Optional

import pyarrow.compute as pc

from pipeline.options import RunOptions
from transforms import outputs
from transforms.corpus.staged import Totals
from transforms.monitor import STAGES


def stages(found: dict) -> dict:
    """Per stage (read, pdf_child, entities, embed, write): peak RSS MB and seconds spent,
    from the rss_mb_* distributions and stage_ms_* counters."""
    result = {}
    for stage in STAGES:
        peak = found['maxima'].get(f'rss_mb_{stage}')
        ms = found['counters'].get(f'stage_ms_{stage}')
        if peak is not None or ms is not None:
            result[stage] = {'peak_rss_mb': peak, 'seconds': None if ms is None else round(ms / 1000, 2)}
    return result


CHANGES = ('new', 'changed', 'retried', 'unchanged', 'deleted', 'outside')


def run_counts(ranges: list[dict], deleted: int, read: Totals) -> dict:
    """What the diff decided, summed over its listing ranges, and what the run read: objects
    new, changed, retried (failed before), unchanged (not read), deleted (`deleted`: after
    the guards); of those read, how many failed; and the ranges whose listing failed."""
    found = {f'objects_{c}': sum(r[c] for r in ranges) for c in CHANGES}
    found['objects_deleted'] = deleted
    found['objects_read'] = read.rows
    found['objects_read_failed'] = read.failed
    found['list_ranges'] = len(ranges)
    found['list_ranges_failed'] = sum(1 for r in ranges if r['error'])
    return found


def summarise(opts: RunOptions, index_meta: Optional[dict], counters: dict[str, int],
              wall_seconds: float, peak_rss_mb: float, stages: Optional[dict] = None,
              rss_series: Optional[list] = None, run: Optional[dict] = None,
              read: Optional[Totals] = None, peak_anon_mb: float = 0.0) -> dict:
    """The run summary (README, "Output layout"): the committed corpus's objects from its
    manifest table; bytes read and the diff's counts from this run (`read`: the totals of
    the manifest rows of the objects it read; `run`: the diff and the commit)."""
    totals = _manifest_totals(outputs.ParquetFolder(outputs.path(opts.output, 'manifest'),
                                                    opts.store))
    read_bytes = read.bytes_read if read is not None else totals['bytes_read']
    read_chunks = read.chunks if read is not None else totals['chunks']
    return {
        'objects_listed': totals['rows'],
        'objects_ok': totals['status'].get('ok', 0),
        'objects_failed': totals['status'].get('failed', 0),
        'objects_skipped': totals['status'].get('skipped', 0),
        'bytes_listed': totals['size'],
        'bytes_read': read_bytes,
        'bytes_skipped': totals['skipped_bytes'],
        'chunks': totals['chunks'],
        'chunks_embedded': counters.get('chunks_embedded', read_chunks),
        'run': run or {},
        'failure_reasons': dict(totals['reasons']),
        'embedder': opts.embed.embedder,
        'index': index_meta,
        'counters': counters,
        'wall_seconds': round(wall_seconds, 2),
        'peak_rss_mb': round(peak_rss_mb, 1),
        'peak_anon_mb': round(peak_anon_mb, 1),
        'stages': stages or {},
        'rss_series': rss_series or [],
        'options': opts.summary(),
    }


def _manifest_totals(manifest: outputs.ParquetFolder) -> dict:
    """The committed manifest's counts, summed batch by batch (the Python objects made are
    those of the rows that are not ok)."""
    totals = {'rows': 0, 'size': 0, 'bytes_read': 0, 'chunks': 0, 'skipped_bytes': 0,
              'status': Counter(), 'reasons': Counter()}
    for batch in manifest.batches(['status', 'size', 'bytes_read', 'chunks', 'reason'], 65536):
        status = batch.column('status')
        totals['rows'] += batch.num_rows
        for name in ('size', 'bytes_read', 'chunks'):
            totals[name] += pc.sum(batch.column(name)).as_py() or 0
        skipped = pc.equal(status, 'skipped')
        totals['skipped_bytes'] += pc.sum(pc.filter(batch.column('size'), skipped)).as_py() or 0
        for item in pc.value_counts(status).to_pylist():
            totals['status'][item['values']] += item['counts']
        not_ok = pc.not_equal(status, 'ok')
        for reason in pc.filter(batch.column('reason'), not_ok).to_pylist():
            if reason:
                totals['reasons'][reason.split(':', 1)[0]] += 1
    return totals


def one_line(report: dict) -> str:
    """The summary a person reads at the end of a run."""
    run = report.get('run') or {}
    diff = ''
    if run:
        diff = (f" (new {run.get('objects_new', 0)}, changed {run.get('objects_changed', 0)}, "
                f"retried {run.get('objects_retried', 0)}, unchanged "
                f"{run.get('objects_unchanged', 0)}, deleted {run.get('objects_deleted', 0)}"
                + (f", outside the window {run['objects_outside']}"
                   if run.get('objects_outside') else '') + ')')
        commit = (f"table version {run.get('table_version')}" if run.get('committed')
                  else f"nothing to commit, table version {run.get('table_version')}")
    return (f"ragbeam: {report['objects_listed']} objects{diff}: {report['objects_ok']} ok, "
            f"{report['objects_failed']} failed, {report['objects_skipped']} skipped; "
            f"{report['chunks']} chunks ({run.get('chunks_added', 0)} added, "
            f"{run.get('chunks_removed', 0)} removed) from {report['bytes_read']} bytes read in "
            f"{report['wall_seconds']} s, peak RSS {report['peak_rss_mb']} MB "
            f"({report.get('peak_anon_mb', 0)} MB anonymous)"
            + (f'; {commit}' if run else ''))


def table(report: dict) -> str:
    """`ragbeam report`: the run's summary as a table a person reads."""
    rows = [('objects listed', f"{report['objects_listed']:,}"),
            ('  ok / failed / skipped', f"{report['objects_ok']:,} / {report['objects_failed']:,}"
                                        f" / {report['objects_skipped']:,}"),
            ('bytes listed', f"{report['bytes_listed']:,}"),
            ('bytes read', f"{report['bytes_read']:,}"),
            ('bytes skipped', f"{report.get('bytes_skipped', 0):,}"),
            ('chunks', f"{report['chunks']:,}"),
            ('embedder', str(report.get('embedder', ''))),
            ('wall time', f"{report['wall_seconds']:.1f} s"),
            ('peak RSS (process tree)', f"{report['peak_rss_mb']:.0f} MB"),
            ('  anonymous (less library pages)', f"{report.get('peak_anon_mb', 0):.0f} MB")]
    for reason, count in sorted(report.get('failure_reasons', {}).items(),
                                key=lambda kv: (-kv[1], kv[0])):
        rows.append((f'  not ok: {reason}', f'{count:,}'))
    width = max(len(k) for k, _ in rows)
    lines = [f'{k:<{width}}  {v}' for k, v in rows]
    stage_rows = report.get('stages') or {}
    if stage_rows:
        lines += ['', f"{'stage':<10} {'peak RSS MB':>12} {'seconds':>10}"]
        for stage in STAGES:
            if stage in stage_rows:
                peak, seconds = stage_rows[stage]['peak_rss_mb'], stage_rows[stage]['seconds']
                lines.append(f"{stage:<10} {'-' if peak is None else f'{peak:.0f}':>12} "
                             f"{'-' if seconds is None else f'{seconds:.1f}':>10}")
        lines.append('(seconds: summed over the workers\' threads; peak RSS: the largest '
                     'worker process)')
    return '\n'.join(lines)


PNG_SIZE = (1000, 700)  # pixels: 10 x 7 inches at 100 dpi


def draw(report: dict, path: str) -> None:
    """RSS of the process tree over time, and throughput (MB/s read, chunks/s) over time, as a
    PNG of PNG_SIZE pixels. Needs matplotlib (`pip install 'ragbeam[report]'`)."""
    try:
        import matplotlib
    except ImportError:
        raise outputs.OutputError("--png needs matplotlib: pip install 'ragbeam[report]'")
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    series = report.get('rss_series') or []
    if len(series) < 2:
        raise outputs.OutputError('this report has no memory series (a run older than the '
                                  'monitor, or one shorter than a second)')
    t = [s[0] for s in series]
    rates = [(b[0], (b[2] - a[2]) / 1e6 / max(b[0] - a[0], 1e-6),
              (b[3] - a[3]) / max(b[0] - a[0], 1e-6)) for a, b in zip(series, series[1:])]
    fig, (mem, speed) = plt.subplots(2, 1, figsize=(PNG_SIZE[0] / 100, PNG_SIZE[1] / 100),
                                     dpi=100, sharex=True)
    mem.plot(t, [s[1] for s in series], color='C0')
    mem.set_ylabel('RSS of the process tree (MB)')
    mem.set_title(f"ragbeam run: {report['objects_listed']} objects, {report['chunks']:,} chunks,"
                  f" peak {report['peak_rss_mb']:.0f} MB")
    speed.plot([r[0] for r in rates], [r[1] for r in rates], color='C1', label='MB/s read')
    speed.set_ylabel('MB/s read')
    speed.set_xlabel('seconds')
    chunks = speed.twinx()
    chunks.plot([r[0] for r in rates], [r[2] for r in rates], color='C2', label='chunks/s')
    chunks.set_ylabel('chunks/s written')
    fig.legend(loc='lower right')
    fig.savefig(path, dpi=100)
    plt.close(fig)


def history_rows(commits: list[dict]) -> list[dict]:
    """One row per commit of the chunk table, newest first: version, time (UTC), run,
    settings fingerprint and the run's counts (`ragbeam history`)."""
    rows = []
    for c in commits:
        summary = json.loads(c.get('ragbeam_summary') or '{}')
        rows.append({'version': c['version'], 'time': time.strftime(
            '%Y-%m-%dT%H:%M:%SZ', time.gmtime(c['timestamp'] / 1000)), 'run': c.get('ragbeam_run'),
            'fingerprint': c.get('ragbeam_fingerprint'), **summary})
    return rows
