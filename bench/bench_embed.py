"""Embedding throughput of the pipeline against the bare model, and peak RSS of a minilm run.

    .venv/bin/python -m bench.bench_embed [--input ../shared/corpus/text] [--out bench/results]

Runs `ragbeam run --embedder minilm --index-type none` over the input as a measured
subprocess (wall time, peak RSS of the process tree), then encodes the very same chunk texts
with the bare model in one loop (MiniLMEmbedder.embed in batches of 256, the pipeline's
batch size) in another subprocess, and runs the pipeline once more with `--entities spacy`
to show what entity extraction costs. `--embedder hash` measures the same without the model.
Targets (reported, not asserted): pipeline chunks/s at least 0.9x the bare model's; peak RSS
of the run at most 768 MB on CPU.
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


def bare(parquet_dir: str, embedder: str) -> None:
    """Encodes every chunk text of a run with the bare model; prints chunks and seconds."""
    import pyarrow.dataset as ds

    from transforms.embed import load_embedder

    texts = ds.dataset(parquet_dir).to_table(columns=['text']).column('text').to_pylist()
    model = load_embedder(embedder, device='cpu')
    model.embed(texts[:1])  # load outside the timing
    started = time.time()
    for i in range(0, len(texts), BATCH):
        model.embed(texts[i:i + BATCH])
    print(json.dumps({'chunks': len(texts), 'seconds': time.time() - started}))


def _pipeline(source: str, out: Path, embedder: str, *extra: str):
    """One measured `ragbeam run` and its report."""
    run = run_measured([str(Path(sys.executable).with_name('ragbeam')), 'run', '--input',
                        source, '--output', str(out), '--embedder', embedder,
                        '--device', 'cpu', '--index-type', 'none', *extra], cwd=REPO)
    if run.returncode:
        raise SystemExit(run.output[-3000:])
    return run, json.loads((out / 'report.json').read_text())


def bench(source: str, out: str, embedder: str) -> None:
    """Measures the pipeline, the pipeline with entities and the bare model on the same
    chunks; writes the report."""
    work = Path(tempfile.mkdtemp(prefix='ragbeam-bench-embed-'))
    try:
        run, report = _pipeline(source, work / 'out', embedder)
        with_entities, entities_report = _pipeline(source, work / 'entities', embedder,
                                                   '--entities', 'spacy')
        chunks = report['chunks']
        model = run_measured([sys.executable, '-m', 'bench.bench_embed', 'bare',
                              str(work / 'out' / 'chunks'), '--embedder', embedder], cwd=REPO)
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
                measured['chunks'] / measured['seconds'], model.peak_rss_mb),
            Run('pipeline + entities (report wall)', entities_report['chunks'],
                entities_report['wall_seconds'],
                entities_report['chunks'] / entities_report['wall_seconds'],
                with_entities.peak_rss_mb)]
    print(f"{'run':>34} {'chunks':>7} {'seconds':>8} {'chunks/s':>9} {'peak RSS MB':>12}")
    for r in runs:
        print(f'{r.name:>34} {r.chunks:7d} {r.wall_seconds:8.1f} {r.chunks_per_second:9.1f} '
              f'{r.peak_rss_mb:12.1f}')
    ratio = runs[1].chunks_per_second / runs[2].chunks_per_second
    summary = {'throughput_ratio': round(ratio, 3), 'peak_rss_mb': round(run.peak_rss_mb, 1),
               'throughput_target_met': ratio >= THROUGHPUT_RATIO,
               'rss_target_met': run.peak_rss_mb <= RSS_LIMIT_MB,
               'entities_chunks_per_second': round(runs[3].chunks_per_second, 1),
               'entities_peak_rss_mb': round(with_entities.peak_rss_mb, 1)}
    print(f'pipeline / bare model chunks/s: {ratio:.3f} (target >= {THROUGHPUT_RATIO}); '
          f'peak RSS {run.peak_rss_mb:.0f} MB (target <= {RSS_LIMIT_MB} MB); with --entities '
          f'spacy {runs[3].chunks_per_second:.1f} chunks/s, {with_entities.peak_rss_mb:.0f} MB')
    save_report(out, 'embed', runs, summary, _chart, source=source, batch=BATCH,
                embedder=embedder)


def _chart(runs: list[Run], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(11, 4))
    names = [r.name for r in runs]
    speed.bar(names, [r.chunks_per_second for r in runs])
    speed.set_title('chunks/s (CPU)')
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
    bare_cmd.add_argument('--embedder', default='minilm')
    parser.add_argument('--input', default=str(REPO.parent / 'shared' / 'corpus' / 'text'))
    parser.add_argument('--embedder', default='minilm', choices=('minilm', 'hash'))
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    if args.command == 'bare':
        bare(args.chunks, args.embedder)
    else:
        bench(args.input, args.out, args.embedder)


if __name__ == '__main__':
    main()
