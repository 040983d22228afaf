"""Outputs on S3: ragbeam's shared boto3 client against Beam's client per call, through moto.

    .venv/bin/python -m bench.bench_s3_outputs [--objects 4] [--object-bytes 100KiB]
                                               [--workdir DIR] [--out DIR]

moto's S3 server runs inside this process, on 127.0.0.1, with the generated input objects in
s3://bench/src/. Each variant is two measured `ragbeam run`s with input and output in the
bucket (`--index-type ivfpq --chunk-size 300 --chunk-overlap 30`, hash embedder, FnApiRunner):
a first run, then a rerun of the unchanged input (which lists, diffs and commits nothing).

- shared: ragbeam as installed: Beam's S3IOs of one setting share one boto3 client
  (`transforms.store.share_beam_s3_clients`).
- beam: the same command with that function replaced by a no-op before ragbeam is imported,
  so Beam's S3FileSystem builds a new boto3 session and client for every call, as Beam does.

Prints a table, writes OUT/s3_outputs.json and OUT/s3_outputs.png.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from bench.generate import write_text
from bench.measure import run_measured, save_figure, save_report
from pipeline.options import parse_size

REPO = Path(__file__).resolve().parent.parent
BUCKET = 'bench'
SHARED, BEAM = 'shared', 'beam'
STEPS = ('first run', 'unchanged rerun')
RUN_FLAGS = ('--embedder', 'hash', '--index-type', 'ivfpq', '--chunk-size', '300',
             '--chunk-overlap', '30')
BEAM_PER_CALL = """
import os, sys
os.environ.setdefault('ARROW_DEFAULT_MEMORY_POOL', 'system')
import transforms.store
transforms.store.share_beam_s3_clients = lambda: None  # before any module imports it
from pipeline.cli import main
sys.exit(main(sys.argv[1:]))
"""


@dataclass
class Result:
    """One measured `ragbeam run` of one variant."""
    variant: str
    step: str
    wall_seconds: float
    peak_rss_mb: float
    returncode: int


def command(variant: str, endpoint: str, output: str) -> list[str]:
    start = ([sys.executable, '-m', 'pipeline'] if variant == SHARED
             else [sys.executable, '-c', BEAM_PER_CALL])
    return [*start, 'run', '--input', f's3://{BUCKET}/src/**', '--output',
            f's3://{BUCKET}/{output}', '--s3-endpoint-url', endpoint, *RUN_FLAGS]


def measure(variant: str, endpoint: str) -> list[Result]:
    results = []
    for step in STEPS:
        m = run_measured(command(variant, endpoint, f'out-{variant}'), cwd=str(REPO))
        if m.returncode != 0:
            print(m.output[-3000:], file=sys.stderr)
        results.append(Result(variant, step, m.wall_seconds, m.peak_rss_mb, m.returncode))
        print(f'{variant:>6} {step:<16} {m.wall_seconds:6.1f} s  {m.peak_rss_mb:5.0f} MB',
              flush=True)
    return results


def summary(results: list[Result]) -> dict:
    by = {(r.variant, r.step): r for r in results}
    return {'all_runs_ok': all(r.returncode == 0 for r in results),
            'speedup': {step: round(by[(BEAM, step)].wall_seconds /
                                    by[(SHARED, step)].wall_seconds, 2) for step in STEPS}}


def print_table(results: list[Result], summ: dict) -> None:
    by = {(r.variant, r.step): r for r in results}
    print('\n| run | Beam: a client per call (s) | ragbeam: one shared client (s) | speed-up | '
          'peak RSS, Beam / ragbeam (MB) |')
    print('|---|---:|---:|---:|---:|')
    for step in STEPS:
        beam, ours = by[(BEAM, step)], by[(SHARED, step)]
        print(f'| {step} | {beam.wall_seconds:.1f} | {ours.wall_seconds:.1f} | '
              f'{summ["speedup"][step]:.2f}x | {beam.peak_rss_mb:.0f} / {ours.peak_rss_mb:.0f} |')


def write_chart(results: list[Result], path: str) -> None:
    """Wall seconds of each run, Beam's client per call beside the shared client."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    by = {(r.variant, r.step): r for r in results}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, (variant, label) in enumerate(((BEAM, 'Beam: a boto3 client per call'),
                                          (SHARED, 'ragbeam: one shared client'))):
        xs = [j + (i - 0.5) * 0.38 for j in range(len(STEPS))]
        bars = ax.bar(xs, [by[(variant, s)].wall_seconds for s in STEPS], 0.38, label=label)
        ax.bar_label(bars, fmt='%.1f s', fontsize=8)
    ax.set_xticks(range(len(STEPS)), STEPS)
    ax.set_ylabel('wall seconds (whole `ragbeam run`)')
    ax.legend()
    save_figure(fig, path, 'Input and output in a moto bucket (ivfpq, hash embedder)')


def bench(objects: int, object_bytes: int, workdir: str, out: str) -> int:
    from tests.servers import S3_ENV, MotoS3

    os.environ.update(S3_ENV)  # before moto starts, so that the runs inherit them
    os.makedirs(workdir, exist_ok=True)
    moto = MotoS3()
    try:
        client = moto.client()
        client.create_bucket(Bucket=BUCKET)
        for i in range(objects):
            path = os.path.join(workdir, f'object-{i}.txt')
            write_text(path, object_bytes, seed=i)
            client.upload_file(path, BUCKET, f'src/object-{i}.txt')
        results = measure(BEAM, moto.endpoint) + measure(SHARED, moto.endpoint)
    finally:
        moto.stop()
    summ = summary(results)
    print_table(results, summ)
    save_report(out, 's3_outputs', results, summ, write_chart, objects=objects,
                object_bytes=object_bytes, run_flags=list(RUN_FLAGS),
                moto=importlib.metadata.version('moto'))
    return 0 if summ['all_runs_ok'] else 1


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog='bench.bench_s3_outputs', description=__doc__.split('\n')[0])
    p.add_argument('--objects', type=int, default=4, help='generated input objects')
    p.add_argument('--object-bytes', default='100KiB', help='size of each input object')
    p.add_argument('--workdir', default='/tmp/ragbeam-bench-s3-outputs',
                   help='where the inputs are generated')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'),
                   help='folder for s3_outputs.json and s3_outputs.png')
    args = p.parse_args(argv)
    return bench(args.objects, parse_size(args.object_bytes), args.workdir, args.out)


if __name__ == '__main__':
    sys.exit(main())
