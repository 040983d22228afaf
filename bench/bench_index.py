"""Index build time, size on disk, recall@10, query latency and build peak RSS per index type;
then the lexical index and hybrid retrieval (`--part hybrid`, below).

    .venv/bin/python -m bench.bench_index [--part vectors,hybrid]
                                          [--sizes 100000,1000000] [--types flat,hnsw,ivfpq]
                                          [--workers 2] [--name index]
                                          [--work /tmp/ragbeam-bench-index] [--timeout 600]

For each size, writes synthetic clustered unit vectors (tests/test_index.py's `_clustered`,
384 dims, random id64s) as 8 chunk Parquet files into WORK/SIZE/chunks, plus 200 query
vectors from the same clusters, whose exact top-10 comes from a blockwise exact inner-product
search. Then, for each type, `python -m pipeline index --output WORK/SIZE --index-type TYPE`
runs as a measured subprocess (wall time, peak RSS of its process tree; killed after
--timeout seconds through coreutils `timeout`). Right after each build (the next one
overwrites the index folder): the size of WORK/SIZE/index, recall@10 of
`transforms.index.Searcher(...).search(queries, 10)` against the exact ids, and the p50/p95 of
100 single-vector searches (after one warm-up search).

Targets (reported, not asserted): ivfpq recall@10 >= 0.95; query p50 well under 1 s at 1M;
peak RSS of an ivfpq build of 2M chunks <= 1.5 GB (extrapolated from the measured bytes per
vector; the fixed part of the RSS, the interpreter and imports, is in the 100k numbers).

The hybrid part (`bench.hybrid`, report NAME-hybrid.json/.png) generates, for each size, text
objects of paragraphs drawn from the shared corpus's real words, runs `ragbeam run` over them
(hash embedder, ivfpq, no lexical index), then builds the lexical index in a measured
subprocess with each library (tantivy, what ragbeam ships; bm25s, the in-memory candidate),
and times 100 queries of each mode in-process. Last, known-item recall@10 of the three modes
on the shared text corpus with each embedder. Targets: lexical build peak RSS <= 1.5 GB and
hybrid p50 <= 50 ms at 1M chunks.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bench.measure import run_measured, save_report

REPO = Path(__file__).resolve().parent.parent
QUERIES = 200
LATENCY_QUERIES = 100
FILES = 8
K = 10
RECALL_TARGET = 0.95
LATENCY_TARGET_MS = 1000
IVFPQ_RSS_TARGET_MB = 1536
IVFPQ_TARGET_VECTORS = 2_000_000


@dataclass
class Run:
    """One index build of one type over one number of vectors, and how it searches."""
    index_type: str
    vectors: int
    status: str                 # ok, timeout or failed
    build_seconds: float
    peak_rss_mb: float
    index_mb: float
    index_bytes_per_vector: float
    recall_at_10: float
    p50_ms: float
    p95_ms: float
    load_seconds: float
    cli_query_seconds: float


def prepare(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Writes FOLDER/chunks with n vectors; returns (queries, exact top-10 id64s)."""
    from tests.test_index import _clustered, _write_chunks
    from transforms.embed import HashEmbedder

    shutil.rmtree(folder, ignore_errors=True)
    started = time.time()
    vectors, queries = np.split(_clustered(n + QUERIES, 1), [n])
    queries = queries.copy()
    ids = np.random.default_rng(2).integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    print(f'{n}: generated in {time.time() - started:.1f} s', flush=True)
    started = time.time()
    _write_chunks(folder / 'chunks', vectors, ids, FILES, model=HashEmbedder.name)
    print(f'{n}: wrote {FILES} Parquet files in {time.time() - started:.1f} s', flush=True)
    started = time.time()
    truth = _exact(vectors, queries)
    print(f'{n}: exact top-{K} in {time.time() - started:.1f} s', flush=True)
    return queries, ids[truth]


def _exact(vectors: np.ndarray, queries: np.ndarray, block: int = 100_000) -> np.ndarray:
    """Row numbers of the K largest inner products of each query, database block by block."""
    import faiss

    best_scores = np.full((len(queries), K), -np.inf, dtype=np.float32)
    best_rows = np.full((len(queries), K), -1, dtype=np.int64)
    for start in range(0, len(vectors), block):
        flat = faiss.IndexFlatIP(vectors.shape[1])
        flat.add(vectors[start:start + block])
        scores, rows = flat.search(queries, K)
        scores = np.concatenate([best_scores, scores], axis=1)
        rows = np.concatenate([best_rows, rows + start], axis=1)
        top = np.argsort(-scores, axis=1, kind='stable')[:, :K]
        best_scores = np.take_along_axis(scores, top, axis=1)
        best_rows = np.take_along_axis(rows, top, axis=1)
    return best_rows


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file())


def measure(folder: Path, n: int, kind: str, queries: np.ndarray, truth: np.ndarray,
            timeout: int, workers: int) -> Run:
    """Builds one index type in a measured subprocess, then its size, recall and latency."""
    from transforms.index import Searcher

    shutil.rmtree(folder / 'index', ignore_errors=True)
    cmd = ['timeout', str(timeout), sys.executable, '-m', 'pipeline', 'index',
           '--output', str(folder), '--index-type', kind, f'--direct_num_workers={workers}',
           '--direct_running_mode=multi_processing']
    build = run_measured(cmd, cwd=str(REPO))
    if build.returncode:
        status = 'timeout' if build.returncode in (124, 137) else 'failed'
        print(f'{kind} at {n}: {status} (rc {build.returncode}) after '
              f'{build.wall_seconds:.0f} s\n{build.output[-2000:]}', flush=True)
        nan = float('nan')
        return Run(kind, n, status, build.wall_seconds, build.peak_rss_mb, nan, nan, nan, nan,
                   nan, nan, nan)
    size = _dir_bytes(folder / 'index')
    started = time.time()
    searcher = Searcher(str(folder))
    load = time.time() - started
    _, found = searcher.search(queries, K)
    recall = float(np.mean([len(set(f) & set(t)) / K for f, t in zip(found, truth)]))
    searcher.search(queries[0], K)  # warm-up
    times = []
    for q in queries[:LATENCY_QUERIES]:
        started = time.perf_counter()
        searcher.search(q, K)
        times.append(time.perf_counter() - started)
    del searcher
    cli = run_measured([sys.executable, '-m', 'pipeline', 'query', '--output', str(folder),
                        '--json', 'what is the generic syntax of a URI'], cwd=str(REPO))
    return Run(kind, n, 'ok', build.wall_seconds, build.peak_rss_mb, size / 2**20, size / n,
               recall, 1000 * float(np.percentile(times, 50)),
               1000 * float(np.percentile(times, 95)), load,
               cli.wall_seconds if cli.returncode == 0 else float('nan'))


def _print(runs: list[Run]) -> None:
    print(f"\n{'type':>6} {'vectors':>8} {'status':>7} {'build s':>8} {'peak RSS MB':>11} "
          f"{'index MB':>9} {'B/vector':>9} {'recall@10':>9} {'p50 ms':>8} {'p95 ms':>8} "
          f"{'load s':>7} {'query cmd s':>11}")
    for r in runs:
        print(f'{r.index_type:>6} {r.vectors:8d} {r.status:>7} {r.build_seconds:8.1f} '
              f'{r.peak_rss_mb:11.1f} {r.index_mb:9.1f} {r.index_bytes_per_vector:9.1f} '
              f'{r.recall_at_10:9.4f} {r.p50_ms:8.3f} {r.p95_ms:8.3f} {r.load_seconds:7.2f} '
              f'{r.cli_query_seconds:11.2f}')


def _summary(runs: list[Run]) -> dict:
    ok = [r for r in runs if r.status == 'ok']
    ivfpq = [r for r in ok if r.index_type == 'ivfpq']
    summary = {
        'not_ok': [f'{r.index_type}@{r.vectors}: {r.status}' for r in runs if r.status != 'ok'],
        'ivfpq_recall_at_10': {str(r.vectors): round(r.recall_at_10, 4) for r in ivfpq},
        'ivfpq_recall_target_met': bool(ivfpq) and all(r.recall_at_10 >= RECALL_TARGET
                                                       for r in ivfpq),
        'max_p50_ms': {str(n): round(max(r.p50_ms for r in ok if r.vectors == n), 3)
                       for n in sorted({r.vectors for r in ok})},
        'latency_target_met': all(r.p50_ms < LATENCY_TARGET_MS for r in ok),
        'max_query_command_s': {str(n): round(max(r.cli_query_seconds for r in ok
                                                  if r.vectors == n), 2)
                                for n in sorted({r.vectors for r in ok})},
    }
    if ivfpq:
        big = max(ivfpq, key=lambda r: r.vectors)
        summary['ivfpq_peak_rss_mb'] = {str(r.vectors): round(r.peak_rss_mb, 1) for r in ivfpq}
        summary['ivfpq_rss_bytes_per_vector'] = round(big.peak_rss_mb * 2**20 / big.vectors, 1)
        if big.vectors >= IVFPQ_TARGET_VECTORS:  # measured, not estimated
            summary['ivfpq_2m_rss_target_met'] = big.peak_rss_mb <= IVFPQ_RSS_TARGET_MB
            return summary
        if len(ivfpq) > 1:  # the slope between the two sizes drops the fixed part
            small = min(ivfpq, key=lambda r: r.vectors)
            slope = ((big.peak_rss_mb - small.peak_rss_mb) * 2**20
                     / (big.vectors - small.vectors))
            estimate = big.peak_rss_mb + slope * (IVFPQ_TARGET_VECTORS - big.vectors) / 2**20
            summary['ivfpq_rss_marginal_bytes_per_vector'] = round(slope, 1)
        else:
            estimate = big.peak_rss_mb * IVFPQ_TARGET_VECTORS / big.vectors
        summary['ivfpq_2m_rss_estimate_mb'] = round(estimate, 1)
        summary['ivfpq_2m_rss_target_met'] = estimate <= IVFPQ_RSS_TARGET_MB
    return summary


def _chart(runs: list[Run], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    types = list(dict.fromkeys(r.index_type for r in runs))
    sizes = sorted({r.vectors for r in runs})
    panels = [('build_seconds', 'build seconds', None), ('recall_at_10', 'recall@10',
              RECALL_TARGET), ('p50_ms', 'query p50 ms (1 vector, k=10)', None),
              ('peak_rss_mb', 'build peak RSS MB', IVFPQ_RSS_TARGET_MB)]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 4))
    width = 0.8 / max(1, len(sizes))
    for ax, (field, title, target) in zip(axes, panels):
        for j, n in enumerate(sizes):
            values = []
            for t in types:
                match = [r for r in runs if r.index_type == t and r.vectors == n]
                ok = match and (match[0].status == 'ok' or field in ('build_seconds',
                                                                        'peak_rss_mb'))
                values.append(getattr(match[0], field) if ok else 0.0)
            xs = np.arange(len(types)) + (j - (len(sizes) - 1) / 2) * width
            ax.bar(xs, values, width, label=f'{n:,} vectors')
        ax.set_xticks(np.arange(len(types)), types)
        if target is not None:
            ax.axhline(target, color='grey', linestyle='--', label=f'target {target}')
        if field == 'recall_at_10':
            ax.set_ylim(0.8, 1.0)
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    parser.add_argument('--sizes', default='100000,1000000')
    parser.add_argument('--types', default='flat,hnsw,ivfpq')
    parser.add_argument('--work', default='/tmp/ragbeam-bench-index')
    parser.add_argument('--timeout', type=int, default=600, help='seconds one build may take')
    parser.add_argument('--workers', type=int, default=2, help='Beam workers of a build')
    parser.add_argument('--name', default='index', help='report name: OUT/NAME.json and .png')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    parser.add_argument('--keep', action='store_true', help='keep the synthetic chunks')
    parser.add_argument('--part', default='vectors,hybrid', help='vectors, hybrid or both')
    parser.add_argument('--models', default='hash,minilm',
                        help='embedders of the hybrid part\'s known-item recall')
    args = parser.parse_args()
    if 'hybrid' in args.part.split(','):
        from bench import hybrid
        hybrid.main(args)
    if 'vectors' not in args.part.split(','):
        return
    sizes = [int(s) for s in args.sizes.split(',')]
    types = args.types.split(',')
    runs: list[Run] = []
    for n in sizes:
        folder = Path(args.work) / str(n)
        queries, truth = prepare(folder, n)
        for kind in types:
            runs.append(measure(folder, n, kind, queries, truth, args.timeout, args.workers))
            _print(runs[-1:])
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    _print(runs)
    summary = _summary(runs)
    for key, value in summary.items():
        print(f'{key}: {value}')
    save_report(args.out, args.name, runs, summary, _chart, sizes=sizes, types=types,
                workers=args.workers,
                queries=QUERIES, latency_queries=LATENCY_QUERIES, k=K, files=FILES,
                build_timeout_s=args.timeout, dim=384, omp_threads=os.cpu_count())


if __name__ == '__main__':
    main()
