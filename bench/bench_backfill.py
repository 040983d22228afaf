"""Scheduled backfills: what a nightly run costs when 1 % of a bucket changed, against a full
re-run; and an ivfpq index update against a full rebuild at 1M vectors.

    .venv/bin/python -m bench.bench_backfill [--objects 2000] [--object-bytes 100000]
                                             [--changed 0.01] [--index-vectors 1000000]
                                             [--work /tmp/ragbeam-bench-backfill]

Pipeline part: a generated bucket (a local folder) of OBJECTS text objects of about
OBJECT_BYTES each. Each step is `ragbeam run --embedder hash --index-type ivfpq` into one
output, as a measured subprocess (wall time, peak RSS of its process tree), with the numbers
of its report.json:
1. `full`: the first run;
2. `no-op`: the same bucket again: nothing to read, embed or commit. Its wall time is the
   fixed start-up (interpreter, imports, listing, the diff, Beam's pipeline set-up);
3. `incremental`: after CHANGED of the objects were rewritten;
4. `full re-run` (the peer: what a tool without incremental runs does): `--full` over the
   same final state.
Target: the incremental run's wall time, less the fixed start-up, at most 0.1 of the full
re-run's, less the same.

Index part: INDEX_VECTORS synthetic vectors (tests/test_index.py's `_clustered`) in a Delta
chunk table of 8 files; an ivfpq base built from it; then 1 % of the rows change: one
object's rows removed as ragbeam's commit removes them (`corpus.remove_objects`: every file
holding one is rewritten), and an append of those ids with new vectors. Measured subprocesses: the update (`build_index` with the default
--index-rebuild-fraction) against a full rebuild of the same table version, each with its
recall@10 against exact search over the final vectors.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.generate import paragraph
from bench.measure import run_measured, save_figure, save_report

REPO = Path(__file__).resolve().parent.parent
INDEX_FILES = 8
OBJECTS_PER_URI = 97          # index part: row i belongs to object i % 97
QUERIES = 200
RATIO_TARGET = 0.1


@dataclass
class Step:
    """One measured command and what its report says it did."""
    name: str
    returncode: int
    wall_seconds: float
    peak_rss_mb: float
    bytes_read: int = 0
    chunks_embedded: int = 0
    commit_seconds: float = 0.0
    index_seconds: float = 0.0
    index_built: str = ''
    recall_at_10: float = float('nan')


def write_bucket(folder: Path, objects: int, size: int, edition: int = 0,
                 only: range | None = None) -> int:
    """Text objects of about `size` bytes, drawn from one pool of paragraphs (fast), each with
    its own first line; returns the bytes written."""
    rng = random.Random(0)
    pool = [paragraph(rng) for _ in range(4000)]
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for n in (only if only is not None else range(objects)):
        pick = random.Random(n * 1000 + edition)
        parts, length = [f'Object {n}, edition {edition}.\n\n'], 0
        while length < size:
            parts.append(pool[pick.randrange(len(pool))])
            length += len(parts[-1])
        text = ''.join(parts)
        (folder / f'doc-{n:05d}.txt').write_text(text, encoding='ascii')
        written += len(text)
    return written


def run_step(name: str, bucket: Path, out: Path, *extra: str) -> Step:
    cmd = [sys.executable, '-m', 'pipeline', 'run', '--input', str(bucket), '--output',
           str(out), '--embedder', 'hash', '--index-type', 'ivfpq', *extra]
    m = run_measured(cmd, cwd=str(REPO))
    if m.returncode:
        print(m.output[-3000:], flush=True)
        return Step(name, m.returncode, m.wall_seconds, m.peak_rss_mb)
    report = json.loads((out / 'report.json').read_text())
    run, index = report['run'], report.get('index') or {}
    step = Step(name, 0, m.wall_seconds, m.peak_rss_mb, report['bytes_read'],
                report.get('chunks_embedded', 0), run.get('commit_seconds', 0.0),
                index.get('seconds', 0.0) if run['committed'] else 0.0,
                index.get('built', '') if run['committed'] else 'kept')
    print(f"{name}: {m.wall_seconds:.1f} s, {step.bytes_read / 2**20:.1f} MB read, "
          f"{step.chunks_embedded} chunks embedded, commit {step.commit_seconds:.2f} s, "
          f"index {step.index_built} {step.index_seconds:.1f} s, peak RSS "
          f"{m.peak_rss_mb:.0f} MB", flush=True)
    return step


def pipeline_part(work: Path, objects: int, size: int, changed: float) -> tuple[list, dict]:
    bucket, out = work / 'bucket', work / 'out'
    shutil.rmtree(work, ignore_errors=True)
    started = time.time()
    total = write_bucket(bucket, objects, size)
    print(f'bucket: {objects} objects, {total / 2**20:.1f} MB in {time.time() - started:.1f} s',
          flush=True)
    steps = [run_step('full', bucket, out), run_step('no-op', bucket, out)]
    count = max(1, round(objects * changed))
    changed_bytes = write_bucket(bucket, objects, size, edition=1,
                                 only=range(0, objects, objects // count)[:count])
    steps.append(run_step('incremental', bucket, out))
    steps.append(run_step('full re-run', bucket, out, '--full'))
    by = {s.name: s for s in steps}
    fixed = by['no-op'].wall_seconds
    ratio = ((by['incremental'].wall_seconds - fixed)
             / max(1e-9, by['full re-run'].wall_seconds - fixed))
    return steps, {
        'objects': objects, 'bucket_mb': round(total / 2**20, 1), 'objects_changed': count,
        'changed_mb': round(changed_bytes / 2**20, 2),
        'fixed_startup_s': round(fixed, 1),
        'incremental_over_full_rerun_wall': round(by['incremental'].wall_seconds
                                                  / by['full re-run'].wall_seconds, 3),
        'incremental_over_full_rerun_less_startup': round(ratio, 3),
        'ratio_target_met': ratio <= RATIO_TARGET,
        'incremental_bytes_read_over_changed': round(by['incremental'].bytes_read
                                                     / max(1, changed_bytes), 3),
        'noop_bytes_read': by['no-op'].bytes_read,
    }


def _rows(vectors: np.ndarray, ids: np.ndarray, rows: np.ndarray):
    """Synthetic chunk rows (object i % 97), built column-wise (fast at 1M)."""
    import pyarrow as pa

    from transforms.embed import HashEmbedder
    from transforms.types import chunk_schema

    schema = chunk_schema(vectors.shape[1])
    n, dim = len(rows), vectors.shape[1]
    values = {
        'chunk_id': pa.array([f'{i:016x}' for i in ids[rows].view(np.uint64)]),
        'id64': pa.array(ids[rows]),
        'uri': pa.array([f'file:///synthetic/{i % OBJECTS_PER_URI}.txt' for i in rows]),
        'version': pa.array(['v'] * n), 'kind': pa.array(['text'] * n),
        'start': pa.array(rows.astype(np.int64)), 'end': pa.array(rows.astype(np.int64) + 1),
        'text': pa.array(['x'] * n),
        'embedding': pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim,
                                                                 dtype=np.int32)),
                                              pa.array(vectors[rows].ravel())),
        'model': pa.array([HashEmbedder.name] * n), 'encoding': pa.array(['utf-8'] * n),
    }
    return pa.Table.from_arrays([values[f.name] if f.name in values else
                                 pa.nulls(n, f.type) for f in schema], schema=schema)


def index_part(work: Path, n: int) -> tuple[list, dict]:
    from deltalake import write_deltalake

    from bench.bench_index import _exact
    from tests.test_index import _clustered

    folder = work / 'index'
    shutil.rmtree(folder, ignore_errors=True)
    started = time.time()
    vectors, queries = np.split(_clustered(n + QUERIES, 1), [n])
    queries = queries.copy()
    ids = np.random.default_rng(2).integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    table = folder / 'chunks'
    for rows in np.array_split(np.arange(n), INDEX_FILES):
        write_deltalake(table, _rows(vectors, ids, rows), mode='append')
    print(f'index: {n} vectors in a Delta table of {INDEX_FILES} files in '
          f'{time.time() - started:.0f} s', flush=True)
    base = _index_step('base build', folder, 0.0)
    started = time.time()
    moved = np.flatnonzero(np.arange(n) % OBJECTS_PER_URI == 5)
    _remove(table, 'file:///synthetic/5.txt', vectors.shape[1])
    changed = vectors.copy()
    changed[moved] = np.roll(vectors, 1, axis=0)[moved]
    write_deltalake(table, _rows(changed, ids, moved), mode='append')
    print(f'index: {len(moved)} rows ({len(moved) / n:.1%}) changed in '
          f'{time.time() - started:.0f} s', flush=True)
    np.save(folder / 'queries.npy', queries)
    np.save(folder / 'truth.npy', ids[_exact(changed, queries)])
    update = _index_step('update', folder, 0.1)
    rebuild = _index_step('full rebuild', folder, 0.0)
    return [base, update, rebuild], {
        'index_vectors': n, 'index_rows_changed': int(len(moved)),
        'update_s': round(update.wall_seconds, 1), 'rebuild_s': round(rebuild.wall_seconds, 1),
        'update_over_rebuild': round(update.wall_seconds / rebuild.wall_seconds, 3),
        'update_built': update.index_built,
        'recall_update': round(update.recall_at_10, 4),
        'recall_rebuild': round(rebuild.recall_at_10, 4),
    }


def _remove(table: Path, uri: str, dim: int) -> None:
    """One object's rows removed as ragbeam's commit removes a replaced object's: each file
    holding one rewritten without them, the copies named in the commit's metadata."""
    from deltalake import CommitProperties, DeltaTable

    from transforms import corpus
    from transforms.types import chunk_schema

    removal = corpus.remove_objects(str(table), None, str(table / 'run-bench'), {uri})
    DeltaTable(table).create_write_transaction(
        removal.adds + removal.removes, 'append', chunk_schema(dim),
        commit_properties=CommitProperties(custom_metadata={
            corpus.COPIES_KEY: json.dumps(removal.copies)}))


def _index_step(name: str, folder: Path, fraction: float) -> Step:
    cmd = [sys.executable, '-m', 'bench.bench_backfill', '_index', str(folder), str(fraction)]
    m = run_measured(cmd, cwd=str(REPO))
    if m.returncode:
        print(m.output[-3000:], flush=True)
        return Step(name, m.returncode, m.wall_seconds, m.peak_rss_mb)
    result = json.loads(m.output.strip().splitlines()[-1])
    step = Step(name, 0, m.wall_seconds, m.peak_rss_mb, index_seconds=result['seconds'],
                index_built=result['built'], recall_at_10=result.get('recall', float('nan')))
    print(f'{name}: {m.wall_seconds:.1f} s ({step.index_built}, build {step.index_seconds:.1f}'
          f' s), recall@10 {step.recall_at_10:.4f}, peak RSS {m.peak_rss_mb:.0f} MB', flush=True)
    return step


def _index_main(folder: str, fraction: float) -> None:
    """(A measured subprocess.) Builds or updates the index of the table's last version and
    prints its meta's built and seconds, and recall@10 when the queries are there."""
    from deltalake import DeltaTable

    from transforms.index import Searcher, build_index

    version = DeltaTable(str(Path(folder) / 'chunks')).version()
    meta = build_index(folder, 'ivfpq', table_version=version, rebuild_fraction=fraction)
    result = {'built': meta['built'], 'seconds': meta['seconds']}
    if (Path(folder) / 'queries.npy').exists():
        queries, truth = np.load(Path(folder) / 'queries.npy'), np.load(Path(folder) / 'truth.npy')
        _, found = Searcher(folder).search(queries, 10)
        result['recall'] = float(np.mean([len(set(f) & set(t)) / 10
                                          for f, t in zip(found, truth)]))
    print(json.dumps(result))


def _chart(steps: list[Step], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    names = [s.name for s in steps]
    axes[0].bar(names, [s.wall_seconds for s in steps],
                color=['tab:blue' if s.name in ('incremental', 'update') else 'tab:grey'
                       for s in steps])
    axes[0].set_title('wall seconds')
    axes[1].bar(names, [s.bytes_read / 2**20 for s in steps])
    axes[1].set_title('MB read')
    axes[2].bar(names, [s.peak_rss_mb for s in steps])
    axes[2].set_title('peak RSS MB (process tree)')
    for ax in axes:
        ax.tick_params(axis='x', rotation=30)
    save_figure(fig, path, 'ragbeam backfill: incremental against full')


def main() -> None:
    if sys.argv[1:2] == ['_index']:
        return _index_main(sys.argv[2], float(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--objects', type=int, default=2000)
    parser.add_argument('--object-bytes', type=int, default=100_000)
    parser.add_argument('--changed', type=float, default=0.01)
    parser.add_argument('--index-vectors', type=int, default=1_000_000,
                        help='0 skips the index part')
    parser.add_argument('--work', default='/tmp/ragbeam-bench-backfill')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    work = Path(args.work)
    steps, summary = pipeline_part(work, args.objects, args.object_bytes, args.changed)
    if args.index_vectors:
        more, index_summary = index_part(work, args.index_vectors)
        steps += more
        summary.update(index_summary)
    shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'step':>14} {'rc':>3} {'wall s':>8} {'MB read':>9} {'embedded':>9} "
          f"{'commit s':>9} {'index':>8} {'index s':>8} {'RSS MB':>7}")
    for s in steps:
        print(f'{s.name:>14} {s.returncode:3d} {s.wall_seconds:8.1f} {s.bytes_read / 2**20:9.1f} '
              f'{s.chunks_embedded:9d} {s.commit_seconds:9.2f} {s.index_built:>8} '
              f'{s.index_seconds:8.1f} {s.peak_rss_mb:7.0f}')
    for key, value in summary.items():
        print(f'{key}: {value}')
    save_report(args.out, 'backfill', steps, summary, _chart, objects=args.objects,
                object_bytes=args.object_bytes, changed=args.changed)


if __name__ == '__main__':
    main()
