"""Memory over the run of one large text object: is it flat in the chunks processed?

    .venv/bin/python -m bench.bench_one_object [--sizes 10MiB,1GiB,2GiB] [--workdir DIR] [--out DIR]

For each size, one generated text object (bench.generate.write_text, kept in --workdir and
reused) is ingested by `ragbeam run --embedder hash --index-type none --lexical-index none`
in a measured subprocess (bench.measure.run_measured: peak RSS and anonymous memory of the
process tree). The run's own RSS series (report.json `rss_series`, one sample a second)
gives RSS at 10 % of the run and at its end. Reported against the targets of issue 27: RSS at
the end / RSS at 10 % <= 1.1 at 1 GiB, and the 2 GiB run's peak <= 1.2 x the 10 MiB run's and
<= 512 MB. Prints a table, writes OUT/one_object.json and OUT/one_object.png (RSS over the
run's progress, per size).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.generate import write_text
from bench.measure import run_measured, save_report
from pipeline.options import format_size, parse_size

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    size: str
    wall_seconds: float
    peak_rss_mb: float
    peak_anon_mb: float
    rss_at_10pct_mb: float
    rss_end_mb: float
    series: list = field(repr=False)  # (seconds, RSS MB) of the run's own samples

    @property
    def end_over_10pct(self) -> float:
        return self.rss_end_mb / self.rss_at_10pct_mb


def measure(size: int, workdir: Path) -> Run:
    source = workdir / f'text-{size}.txt'
    if not source.exists():
        write_text(str(source), size)
    out = workdir / f'out-{size}'
    shutil.rmtree(out, ignore_errors=True)
    m = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(source),
                      '--output', str(out), '--embedder', 'hash', '--index-type', 'none',
                      '--lexical-index', 'none'], cwd=str(REPO))
    if m.returncode:
        raise SystemExit(f'the {format_size(size)} run failed:\n{m.output[-3000:]}')
    series = [(s[0], s[1]) for s in json.loads((out / 'report.json').read_text())['rss_series']]
    shutil.rmtree(out, ignore_errors=True)
    first, last = series[0][0], series[-1][0]
    at_10 = min(series, key=lambda s: abs(s[0] - (first + 0.1 * (last - first))))
    return Run(format_size(size), round(m.wall_seconds, 1), round(m.peak_rss_mb, 1),
               round(m.peak_anon_mb, 1), at_10[1], series[-1][1], series)


def chart(runs: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for run in runs:
        start, end = run.series[0][0], run.series[-1][0]
        ax.plot([100 * (t - start) / max(end - start, 1e-9) for t, _ in run.series],
                [rss for _, rss in run.series], label=run.size)
    ax.set_xlabel('% of the run')
    ax.set_ylabel('RSS of the run, MB')
    ax.set_ylim(bottom=0)
    ax.legend()
    ax.set_title('One text object: RSS through the run')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--sizes', default='10MiB,1GiB,2GiB')
    p.add_argument('--workdir', default='/tmp/ragbeam-bench-one-object')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = p.parse_args()
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    runs = []
    for size in [parse_size(s) for s in args.sizes.split(',')]:
        run = measure(size, workdir)
        runs.append(run)
        print(f'{run.size}: {run.wall_seconds} s, peak RSS {run.peak_rss_mb:.0f} MB '
              f'({run.peak_anon_mb:.0f} MB anonymous), RSS at 10 % {run.rss_at_10pct_mb:.0f} MB, '
              f'at the end {run.rss_end_mb:.0f} MB', flush=True)
    smallest = runs[0]
    print('\n| object | wall s | peak RSS MB | peak anonymous MB | RSS at 10 % | RSS at end | end / 10 % '
          '| peak / smallest |\n|---|---:|---:|---:|---:|---:|---:|---:|')
    for run in runs:
        print(f'| {run.size} | {run.wall_seconds} | {run.peak_rss_mb:.0f} | {run.peak_anon_mb:.0f} '
              f'| {run.rss_at_10pct_mb:.0f} | {run.rss_end_mb:.0f} | {run.end_over_10pct:.2f} '
              f'| {run.peak_rss_mb / smallest.peak_rss_mb:.2f} |')
    summary = {r.size: {'end_over_10pct': round(r.end_over_10pct, 3),
                        'peak_over_smallest': round(r.peak_rss_mb / smallest.peak_rss_mb, 3)}
               for r in runs}
    save_report(args.out, 'one_object', runs, summary, chart)


if __name__ == '__main__':
    main()
