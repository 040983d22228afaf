"""Embedding throughput of the pipeline against the bare model, and peak RSS of a minilm run.

    .venv/bin/python -m bench.bench_embed [--input ../shared/corpus/text] [--out bench/results]

Runs `ragbeam run --embedder minilm --index-type none` over the input as a measured
subprocess (wall time, peak RSS of the process tree), then encodes the very same chunk texts
with the bare model in one loop (MiniLMEmbedder.embed in batches of 256, the pipeline's
batch size) in another subprocess. Targets (reported, not asserted): pipeline chunks/s at
least 0.9x the bare model's; peak RSS of the run at most 768 MB on CPU.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.measure import run_measured, save_figure, save_report

REPO = Path(__file__).resolve().parent.parent
BATCH = 256
RSS_LIMIT_MB = 768
THROUGHPUT_RATIO = 0.9


@dataclass
class Run:
    """One measured run: what, how many chunks, how long, how much memory."""
    name: str
    chunks: int
    wall_seconds: float
    chunks_per_second: float
    peak_rss_mb: float


def bare(parquet_dir: str) -> None:
    """Encodes every chunk text of a run with the bare model; prints chunks and seconds."""
    import pyarrow.dataset as ds

    from transforms.embed import MiniLMEmbedder

    texts = ds.dataset(parquet_dir).to_table(columns=['text']).column('text').to_pylist()
    model = MiniLMEmbedder(device='cpu')
    model.embed(texts[:1])  # load outside the timing
    started = time.time()
    for i in range(0, len(texts), BATCH):
        model.embed(texts[i:i + BATCH])
    print(json.dumps({'chunks': len(texts), 'seconds': time.time() - started}))


def bench(source: str, out: str) -> None:
    """Measures the pipeline and the bare model on the same chunks; writes the report."""
    work = Path(tempfile.mkdtemp(prefix='ragbeam-bench-embed-'))
    try:
        run = run_measured([str(Path(sys.executable).with_name('ragbeam')), 'run', '--input',
                            source, '--output', str(work / 'out'), '--embedder', 'minilm',
                            '--device', 'cpu', '--index-type', 'none'], cwd=REPO)
        if run.returncode:
            raise SystemExit(run.output[-3000:])
        report = json.loads((work / 'out' / 'report.json').read_text())
        chunks = report['chunks']
        model = run_measured([sys.executable, '-m', 'bench.bench_embed', 'bare',
                              str(work / 'out' / 'chunks')], cwd=REPO)
        if model.returncode:
            raise SystemExit(model.output[-3000:])
        measured = json.loads(model.output.strip().splitlines()[-1])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    runs = [Run('pipeline (whole run)', chunks, run.wall_seconds, chunks / run.wall_seconds,
                run.peak_rss_mb),
            Run('pipeline (report wall)', chunks, report['wall_seconds'],
                chunks / report['wall_seconds'], run.peak_rss_mb),
            Run('bare model loop', measured['chunks'], measured['seconds'],
                measured['chunks'] / measured['seconds'], model.peak_rss_mb)]
    print(f"{'run':>24} {'chunks':>7} {'seconds':>8} {'chunks/s':>9} {'peak RSS MB':>12}")
    for r in runs:
        print(f'{r.name:>24} {r.chunks:7d} {r.wall_seconds:8.1f} {r.chunks_per_second:9.1f} '
              f'{r.peak_rss_mb:12.1f}')
    ratio = runs[1].chunks_per_second / runs[2].chunks_per_second
    summary = {'throughput_ratio': round(ratio, 3), 'peak_rss_mb': round(run.peak_rss_mb, 1),
               'throughput_target_met': ratio >= THROUGHPUT_RATIO,
               'rss_target_met': run.peak_rss_mb <= RSS_LIMIT_MB}
    print(f'pipeline / bare model chunks/s: {ratio:.3f} (target >= {THROUGHPUT_RATIO}); '
          f'peak RSS {run.peak_rss_mb:.0f} MB (target <= {RSS_LIMIT_MB} MB)')
    save_report(out, 'embed', runs, summary, _chart, source=source, batch=BATCH)


def _chart(runs: list[Run], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in runs]
    speed.bar(names, [r.chunks_per_second for r in runs])
    speed.set_title('chunks/s (minilm, CPU)')
    memory.bar(names, [r.peak_rss_mb for r in runs], color='C1')
    memory.axhline(RSS_LIMIT_MB, color='grey', linestyle='--', label=f'target {RSS_LIMIT_MB} MB')
    memory.set_title('peak RSS MB')
    memory.legend()
    for ax in (speed, memory):
        ax.tick_params(axis='x', labelsize=8)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    sub = parser.add_subparsers(dest='command')
    bare_cmd = sub.add_parser('bare', help='encode the chunk texts of a run with the bare model')
    bare_cmd.add_argument('chunks')
    parser.add_argument('--input', default=str(REPO.parent / 'shared' / 'corpus' / 'text'))
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    if args.command == 'bare':
        bare(args.chunks)
    else:
        bench(args.input, args.out)


if __name__ == '__main__':
    main()
