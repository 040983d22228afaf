"""The runtimes of the real model side by side: pipeline and bare model loop, chunks/s, peak RSS,
cosine to the sentence-transformers reference and size of the install.

    .venv/bin/python -m bench.bench_embed [--input PATH ...] [--out bench/results]
        [--runtimes onnxruntime,numpy,torch] [--torch-python PATH] [--entities]

For each runtime R: `ragbeam run --embedder minilm --embed-runtime R --index-type none` over
the input as a measured subprocess (wall time, peak RSS of the whole process tree, as
bench/measure.py samples it), then the very same chunk texts encoded by the bare model
(MiniLMEmbedder.embed in batches of 256, the pipeline's batch size) in a loop in another
measured subprocess, which also scores the reference fixture (tests/fixtures/
minilm_reference.json). torch is not in ragbeam's default set-up: its rows run under
--torch-python, a Python with torch and ragbeam installed (`pip install -e '.[minilm,gpu]'`),
and are left out without it. `--entities` adds a run with `--entities spacy` (hash embedder)
to show what entity extraction costs. `--embedder hash` measures the pipeline without a model.

Targets (issue 12, reported, not asserted): peak RSS of the tree <= 512 MB; pipeline chunks/s
>= 33.8 (the torch pipeline before) and >= 0.9x the bare loop in the same runtime; min cosine
>= 0.9999.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from bench.measure import run_measured, save_figure, save_report

REPO = Path(__file__).resolve().parent.parent
REFERENCE = REPO / 'tests' / 'fixtures' / 'minilm_reference.json'
BATCH = 256
RSS_LIMIT_MB = 512
THROUGHPUT_FLOOR = 33.8  # chunks/s of the torch pipeline before this benchmark's runtime choice
THROUGHPUT_RATIO = 0.9
COSINE_FLOOR = 0.9999
# what each runtime adds to an install, beyond ragbeam's own requirements
RUNTIME_DISTRIBUTIONS = {'onnxruntime': ['onnxruntime', 'onnx'], 'numpy': [],
                         'torch': ['torch', 'triton', 'nvidia-*']}


@dataclass
class Run:
    """One measured run: what, how many chunks, how long, how much memory, how faithful."""
    name: str
    runtime: str
    chunks: int
    wall_seconds: float
    chunks_per_second: float
    peak_rss_mb: float
    min_cosine: Optional[float] = None
    install_mb: Optional[float] = None


def bare(parquet_dir: str, runtime: str) -> None:
    """Encodes every chunk text of a run with the bare model, then the reference texts; prints
    chunks, seconds, the min cosine to the reference and the runtime's install size."""
    import numpy as np
    import pyarrow.dataset as ds

    from transforms.minilm import MiniLMEmbedder

    texts = ds.dataset(parquet_dir).to_table(columns=['text']).column('text').to_pylist()
    model = MiniLMEmbedder(device='cpu', runtime=runtime)
    model.embed(texts[:1])  # load outside the timing
    started = time.time()
    for i in range(0, len(texts), BATCH):
        model.embed(texts[i:i + BATCH])
    seconds = time.time() - started
    ref = json.loads(REFERENCE.read_text())
    got = model.embed(ref['texts'])
    cosine = float((got * np.asarray(ref['embeddings'], dtype=np.float32)).sum(axis=1).min())
    print(json.dumps({'chunks': len(texts), 'seconds': seconds, 'min_cosine': cosine,
                      'install_mb': install_mb(RUNTIME_DISTRIBUTIONS[runtime])}))


def install_mb(patterns: list[str]) -> float:
    """Installed size (MB) of the distributions matching the patterns, in this Python."""
    import fnmatch
    from importlib import metadata

    total = 0
    for dist in metadata.distributions():
        name = (dist.metadata['Name'] or '').lower()
        if any(fnmatch.fnmatch(name, p) for p in patterns):
            for f in dist.files or ():
                try:
                    total += os.path.getsize(dist.locate_file(f))
                except OSError:
                    continue
    return round(total / 2**20, 1)


def _python_for(runtime: str, torch_python: Optional[str]) -> str:
    return torch_python if runtime == 'torch' else sys.executable


def _pipeline(python: str, sources: list[str], out: Path, *extra: str):
    """One measured `ragbeam run` and its report."""
    inputs = [a for source in sources for a in ('--input', source)]
    run = run_measured([python, '-m', 'pipeline', 'run', *inputs, '--output', str(out), '--device', 'cpu', '--index-type', 'none', *extra], cwd=REPO)
    if run.returncode:
        raise SystemExit(run.output[-3000:])
    return run, json.loads((out / 'report.json').read_text())


def bench(sources: list[str], out: str, embedder: str, runtimes: list[str],
          torch_python: Optional[str], entities: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix='ragbeam-bench-embed-'))
    runs: list[Run] = []
    try:
        if embedder == 'hash':
            run, report = _pipeline(sys.executable, sources, work / 'hash', '--embedder', 'hash')
            runs.append(Run('pipeline hash', 'hash', report['chunks'], report['wall_seconds'],
                            report['chunks'] / report['wall_seconds'], run.peak_rss_mb))
            runtimes = []
        for runtime in runtimes:
            python = _python_for(runtime, torch_python)
            if python is None:
                print(f'{runtime}: left out (no --torch-python)')
                continue
            folder = work / runtime
            run, report = _pipeline(python, sources, folder, '--embedder', 'minilm',
                                    '--embed-runtime', runtime)
            loop = run_measured([python, '-m', 'bench.bench_embed', 'bare',
                                 str(folder / 'chunks'), '--runtime', runtime], cwd=REPO)
            if loop.returncode:
                raise SystemExit(loop.output[-3000:])
            measured = json.loads(loop.output.strip().splitlines()[-1])
            runs.append(Run(f'pipeline {runtime}', runtime, report['chunks'],
                            report['wall_seconds'], report['chunks'] / report['wall_seconds'],
                            run.peak_rss_mb, measured['min_cosine'], measured['install_mb']))
            runs.append(Run(f'bare loop {runtime}', runtime, measured['chunks'],
                            measured['seconds'], measured['chunks'] / measured['seconds'],
                            loop.peak_rss_mb, measured['min_cosine'], measured['install_mb']))
            shutil.rmtree(folder, ignore_errors=True)
        if entities:
            run, report = _pipeline(sys.executable, sources, work / 'entities', '--embedder',
                                    'hash', '--entities', 'spacy')
            runs.append(Run('pipeline hash + entities', 'hash', report['chunks'],
                            report['wall_seconds'], report['chunks'] / report['wall_seconds'],
                            run.peak_rss_mb))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'run':>26} {'chunks':>7} {'seconds':>8} {'chunks/s':>9} {'peak RSS MB':>12} "
          f"{'min cos':>10} {'install MB':>11}")
    for r in runs:
        cos = '-' if r.min_cosine is None else f'{r.min_cosine:.7f}'
        size = '-' if r.install_mb is None else f'{r.install_mb:.0f}'
        print(f'{r.name:>26} {r.chunks:7d} {r.wall_seconds:8.1f} {r.chunks_per_second:9.1f} '
              f'{r.peak_rss_mb:12.1f} {cos:>10} {size:>11}')
    summary = {}
    for runtime in {r.runtime for r in runs if r.min_cosine is not None}:
        pipe, loop = (next(r for r in runs if r.name == f'{kind} {runtime}')
                      for kind in ('pipeline', 'bare loop'))
        ratio = pipe.chunks_per_second / loop.chunks_per_second
        summary[runtime] = {
            'throughput_ratio': round(ratio, 3),
            'targets_met': {'rss': pipe.peak_rss_mb <= RSS_LIMIT_MB,
                            'chunks_per_second': pipe.chunks_per_second >= THROUGHPUT_FLOOR,
                            'ratio': ratio >= THROUGHPUT_RATIO,
                            'cosine': pipe.min_cosine >= COSINE_FLOOR}}
        print(f'{runtime}: pipeline/bare {ratio:.3f}; targets {summary[runtime]["targets_met"]}')
    save_report(out, 'embed' if embedder == 'minilm' else f'embed_{embedder}', runs, summary,
                _chart, inputs=sources, batch=BATCH, embedder=embedder)


def _chart(runs: list[Run], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (speed, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r.name for r in runs]
    colors = [{'onnxruntime': 'C0', 'numpy': 'C1', 'torch': 'C3'}.get(r.runtime, 'C7')
              for r in runs]
    speed.bar(names, [r.chunks_per_second for r in runs], color=colors)
    speed.axhline(THROUGHPUT_FLOOR, color='grey', linestyle='--',
                  label=f'torch pipeline before: {THROUGHPUT_FLOOR}')
    speed.set_title('chunks/s (CPU, 2 cores)')
    speed.legend(fontsize=8)
    memory.bar(names, [r.peak_rss_mb for r in runs], color=colors)
    memory.axhline(RSS_LIMIT_MB, color='grey', linestyle='--', label=f'worker {RSS_LIMIT_MB} MB')
    memory.set_title('peak RSS of the process tree, MB')
    memory.legend(fontsize=8)
    for ax in (speed, memory):
        ax.tick_params(axis='x', labelsize=8, rotation=30)
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    sub = parser.add_subparsers(dest='command')
    bare_cmd = sub.add_parser('bare', help='encode the chunk texts of a run with the bare model')
    bare_cmd.add_argument('chunks')
    bare_cmd.add_argument('--runtime', default='onnxruntime')
    parser.add_argument('--input', action='append', default=None,
                        help='repeatable (default: ../shared/corpus/text)')
    parser.add_argument('--embedder', default='minilm', choices=('minilm', 'hash'))
    parser.add_argument('--runtimes', default='onnxruntime,numpy,torch')
    parser.add_argument('--torch-python', default=None,
                        help='a Python with torch and ragbeam installed, for the torch rows')
    parser.add_argument('--entities', action='store_true', help='add a --entities spacy run')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = parser.parse_args()
    if args.command == 'bare':
        bare(args.chunks, args.runtime)
    else:
        bench(args.input or [str(REPO.parent / 'shared' / 'corpus' / 'text')], args.out, args.embedder, args.runtimes.split(','),
              args.torch_python, args.entities)


if __name__ == '__main__':
    main()
