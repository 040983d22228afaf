"""A re-run with one change over a big committed corpus of small objects, on Flink embedded
beside the FnApiRunner: the memory of each Python process and of the JVM.

    .venv/bin/python -m bench.bench_flink_scale [--objects 300000] [--workdir DIR] [--out DIR]

N objects of 650 bytes, 100 to a folder (bench.generate.write_small_objects, kept and reused),
committed by a first run on the FnApiRunner; then one object is changed and the re-run is made
on a copy of that corpus on each runner (`--embedder hash --index-type none --lexical-index
none`), each a measured subprocess: wall time, the summed RSS of the Python processes
(the driver and its LOOPBACK workers) and of the engine (Flink's JVM), and the largest Python
process. Target (issue 27): every Python process <= 512 MB on Flink. Prints a table, writes
OUT/flink_scale.json and OUT/flink_scale.png.
"""
from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.engines import process_group
from bench.generate import edit_small_objects, write_small_objects
from bench.measure import run_measured, save_report

REPO = Path(__file__).resolve().parents[1]
LEAN = ('--embedder', 'hash', '--index-type', 'none', '--lexical-index', 'none')
FLINK = ('--runner', 'FlinkRunner', '--flink_master=[local]', '--parallelism=2')


@dataclass
class Step:
    step: str
    runner: str
    wall_seconds: float
    peak_rss_mb: float
    python_mb: float          # the Python processes' RSS, summed
    largest_python_mb: float  # the largest single Python process
    engine_mb: float          # Flink's JVM (0 on the FnApiRunner)


def measure(step: str, runner: str, src: Path, out: Path, extra=()) -> Step:
    m = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(src), '--output',
                      str(out), *LEAN, *extra], group=process_group, cwd=str(REPO))
    if m.returncode:
        raise SystemExit(f'{step} on {runner} failed:\n{m.output[-3000:]}')
    found = Step(step, runner, round(m.wall_seconds, 1), round(m.peak_rss_mb),
                 m.peak_rss_mb_by.get('python', 0), m.peak_process_rss_mb_by.get('python', 0),
                 m.peak_rss_mb_by.get('engine', 0))
    print(found, flush=True)
    return found


def chart(steps: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [f'{s.step}\n{s.runner}' for s in steps]
    ax.bar(labels, [s.largest_python_mb for s in steps], label='largest Python process')
    ax.bar(labels, [s.engine_mb for s in steps], bottom=[s.largest_python_mb for s in steps],
           label="Flink's JVM", alpha=0.6)
    ax.axhline(512, color='red', linestyle='--', label='512 MB')
    ax.set_ylabel('peak RSS, MB')
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--objects', type=int, default=300_000)
    p.add_argument('--workdir', default='/tmp/ragbeam-bench-flink-scale')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    args = p.parse_args()
    from pipeline import engines
    engines.flink_job_server_jar(engines.default_flink_version())  # fetched before any timing

    work = Path(args.workdir)
    src, committed = work / f'src-{args.objects}', work / f'committed-{args.objects}'
    if not (work / f'src-{args.objects}.done').exists():
        shutil.rmtree(src, ignore_errors=True)
        write_small_objects(src, args.objects)
        (work / f'src-{args.objects}.done').touch()
    edit_small_objects(src, [args.objects // 2], edit=0)  # as written: the first run's state
    shutil.rmtree(committed, ignore_errors=True)
    steps = [measure('first run', 'FnApiRunner', src, committed)]
    edit_small_objects(src, [args.objects // 2], edit=1)  # one object changed
    for runner, extra in (('FnApiRunner', ()), ('Flink embedded', FLINK)):
        out = work / f'rerun-{runner.split()[0]}'
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(committed, out)
        steps.append(measure('1 changed', runner, src, out, extra))
        shutil.rmtree(out, ignore_errors=True)
    print('\n| step | runner | wall s | tree peak MB | Python, summed MB | largest Python process MB '
          "| Flink's JVM MB |\n|---|---|---:|---:|---:|---:|---:|")
    for s in steps:
        print(f'| {s.step} | {s.runner} | {s.wall_seconds} | {s.peak_rss_mb:,} | '
              f'{s.python_mb:,.0f} | {s.largest_python_mb:,.0f} | {s.engine_mb:,.0f} |')
    flink = steps[-1]
    print(f'\ntarget: every Python process <= 512 MB on Flink embedded with {args.objects:,} '
          f"objects: {'met' if flink.largest_python_mb <= 512 else 'NOT met'} "
          f'({flink.largest_python_mb:.0f} MB)')
    save_report(args.out, 'flink_scale', steps, {
        'objects': args.objects, 'flink_largest_python_mb': flink.largest_python_mb}, chart)


if __name__ == '__main__':
    main()
