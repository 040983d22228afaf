"""ragbeam on each engine, side by side in one run: the in-process FnApiRunner, Prism, Flink
embedded, and a standalone Flink cluster on 127.0.0.1 (one JobManager, one TaskManager with
two slots, an EXTERNAL worker pool: `pipeline.flink`, as the tests start it), where the
engine can be had (`pipeline.engines` says why not).

Used by `bench.bench_text engines` (one generated text object: MB/s) and
`bench.bench_pdf engines` (a PDF folder: pages/s). On every engine the same `ragbeam run
--embedder hash --index-type none` is a measured subprocess; its process tree's RSS is summed
per group: the Python processes (driver, LOOPBACK worker, PDF children), Prism's Go process,
a JVM (the cluster's JobManager and TaskManager, and its worker pool's Python processes,
are counted with the run's own). Start-up is the wall time of the same command on a tiny
input on that engine (the cluster is started before, and its start is not counted); the
rate divides by the wall time less it. Bytes read and dynamic splits come from report.json.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from bench.measure import run_measured, save_figure, save_report
from pipeline import engines

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
# the rate less start-up is reported only where the run outlasts its start-up by this share of
# its wall time: a difference of two noisy wall times says nothing on an input that the engine
# reads in less time than it takes to start (the dev PDFs on Flink: 40.4 s against 42.1)
BUSY_SHARE = 0.25
ENGINES = {
    'fnapi': (),
    'prism': ('--runner', 'PrismRunner'),
    'flink-embedded': ('--runner', 'FlinkRunner', '--flink_master', '[local]',
                       '--parallelism', '2', '--environment_type', 'LOOPBACK'),
    'flink-cluster': None,  # flags of the cluster `engine_flags` starts
}


@contextlib.contextmanager
def engine_flags(engine: str):
    """(ragbeam flags, pids of the engine's processes that are not the run's children)."""
    if ENGINES[engine] is not None:
        yield ENGINES[engine], ()
        return
    from pipeline.flink import ClusterSettings, LocalCluster, free_port, worker_pool
    with tempfile.TemporaryDirectory(prefix='bench-flink-') as folder, \
            LocalCluster(Path(folder), ClusterSettings(slots=2)) as flink:
        port = free_port()
        pool = worker_pool(port)
        try:
            yield (('--runner', 'FlinkRunner', f'--flink_master={flink.master}',
                    '--environment_type=EXTERNAL', f'--environment_config=localhost:{port}',
                    '--parallelism=2'),
                   [p.pid for p in (flink.jobmanager, *flink.taskmanagers, pool)])
        finally:
            pool.terminate()
            pool.wait(timeout=30)


@dataclass
class EngineRun:
    """One engine's measured run on one input (or why it could not run)."""
    engine: str
    input: str
    returncode: Optional[int]
    wall_seconds: float = 0.0
    startup_seconds: float = 0.0
    units: float = 0.0  # MB listed, or pages extracted
    unit: str = 'MB'
    rate: Optional[float] = 0.0  # units per second of wall time less start-up (see BUSY_SHARE)
    overall_rate: float = 0.0  # units per second of the whole wall time, start-up included
    python_peak_rss_mb: float = 0.0  # the Python processes' RSS, summed
    python_process_peak_rss_mb: float = 0.0  # the largest single Python process (a worker)
    engine_peak_rss_mb: Optional[float] = None  # Prism's Go process or the JVM
    bytes_listed: int = 0
    bytes_read: int = 0
    chunks: int = 0
    dynamic_splits: int = 0
    unavailable: Optional[str] = None


def unavailable(engine: str) -> Optional[str]:
    """Why `engine` cannot run on this machine, or None."""
    try:
        if engine == 'prism':
            engines.prism_binary()
        elif engine.startswith('flink'):
            engines.flink_job_server_jar(engines.default_flink_version())
        if engine == 'flink-cluster':
            from pipeline.flink import flink_home
            flink_home()
    except engines.UsageError as e:
        return str(e)
    return None


def process_group(p) -> str:
    name = p.name()
    if name.startswith('prism'):
        return 'engine'
    if name.startswith('java'):
        return 'engine'
    return 'python'


def run_once(engine: str, path: str, workdir: str, extra=(), flags=(), also=()):
    """(Measurement, report.json) of `ragbeam run` on `path` on `engine` (its `flags`)."""
    out = os.path.join(workdir, f'out-{engine}')
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, '-m', 'pipeline', 'run', '--input', path, '--output', out,
           '--embedder', 'hash', '--index-type', 'none', *extra, *flags]
    m = run_measured(cmd, group=process_group, also=also, cwd=REPO)
    report = {}
    if m.returncode == 0:
        with open(os.path.join(out, 'report.json')) as f:
            report = json.load(f)
    else:
        print(f'{engine} on {path} exited with {m.returncode}:\n{m.output[-3000:]}', flush=True)
    shutil.rmtree(out, ignore_errors=True)
    return m, report


def measure(engine: str, label: str, path: str, tiny: str, unit: str, workdir: str,
            extra=()) -> EngineRun:
    """One engine on `path`, with its start-up measured on `tiny`."""
    why = unavailable(engine)
    if why:
        print(f'{engine}: not run: {why}', flush=True)
        return EngineRun(engine, label, None, unit=unit, unavailable=why)
    with engine_flags(engine) as (flags, also):
        startup, _ = run_once(engine, tiny, workdir, extra, flags, also)
        m, report = run_once(engine, path, workdir, extra, flags, also)
    counters = report.get('counters', {})
    units = (report.get('bytes_listed', 0) / MB if unit == 'MB'
             else counters.get('pdf_pages', 0))
    busy = m.wall_seconds - startup.wall_seconds
    rate = round(units / busy, 2) if busy >= BUSY_SHARE * m.wall_seconds else None
    return EngineRun(engine, label, m.returncode, round(m.wall_seconds, 2),
                     round(startup.wall_seconds, 2), round(units, 1), unit, rate,
                     round(units / m.wall_seconds, 2), m.peak_rss_mb_by.get('python', 0.0),
                     m.peak_process_rss_mb_by.get('python', 0.0),
                     m.peak_rss_mb_by.get('engine'), report.get('bytes_listed', 0),
                     report.get('bytes_read', 0), report.get('chunks', 0),
                     counters.get('dynamic_splits', 0))


def summary(runs: list[EngineRun]) -> dict:
    base = next((r for r in runs if r.engine == 'fnapi' and r.returncode == 0), None)
    out = {'all_runs_ok': all(r.returncode in (0, None) for r in runs),
           'not_run': {r.engine: r.unavailable for r in runs if r.unavailable}}
    for r in runs:
        if base and r.returncode == 0:
            rates = (r.rate, base.rate) if r.rate and base.rate else (r.overall_rate,
                                                                      base.overall_rate)
            out[r.engine] = {'rate_over_fnapi': round(rates[0] / rates[1], 3),
                             'chunks_equal_fnapi': r.chunks == base.chunks,
                             'python_rss_within_512_mb': r.python_peak_rss_mb <= 512,
                             'each_python_process_within_512_mb':
                                 r.python_process_peak_rss_mb <= 512}
    return out


def markdown(runs: list[EngineRun]) -> str:
    """The README table."""
    unit = runs[0].unit
    lines = [f'| engine | {unit}/s less start-up | {unit}/s overall | wall s | start-up s '
             '| Python peak RSS MB (summed) | largest Python process MB | engine RSS MB '
             '| bytes read / listed | dynamic splits |',
             '|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|']
    for r in runs:
        if r.unavailable:
            lines.append(f'| {r.engine} | not run: {r.unavailable} | | | | | | | | |')
            continue
        ratio = r.bytes_read / r.bytes_listed if r.bytes_listed else 0
        engine_rss = '-' if r.engine_peak_rss_mb is None else f'{r.engine_peak_rss_mb:.0f}'
        rate = '- (start-up is most of the run)' if r.rate is None else f'{r.rate:.2f}'
        lines.append(f'| {r.engine} | {rate} | {r.overall_rate:.2f} | {r.wall_seconds:.1f} | '
                     f'{r.startup_seconds:.1f} | {r.python_peak_rss_mb:.0f} | '
                     f'{r.python_process_peak_rss_mb:.0f} | {engine_rss} | '
                     f'{ratio:.2f} | {r.dynamic_splits} |')
    return '\n'.join(lines)


def chart(runs: list[EngineRun], path: str) -> None:
    """Four panels, bars per engine: the two rates, the Python RSS (summed and the largest
    process), the engine's RSS, start-up."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    ran = [r for r in runs if r.returncode == 0]
    names = [r.engine for r in ran]
    unit = runs[0].unit
    fig, axes = plt.subplots(1, 4, figsize=(16, 4.5))
    panels = ((f'{unit}/s', (('less start-up (none: start-up is most of the run)',
                              lambda r: r.rate or 0), ('overall', lambda r: r.overall_rate))),
              ('Python peak RSS MB', (('summed', lambda r: r.python_peak_rss_mb),
                                      ('largest process', lambda r: r.python_process_peak_rss_mb))),
              ('engine processes peak RSS MB', (('', lambda r: r.engine_peak_rss_mb or 0),)),
              ('start-up s', (('', lambda r: r.startup_seconds),)))
    for ax, (title, series) in zip(axes, panels):
        width = 0.8 / len(series)
        top = max((value(r) for _, value in series for r in ran), default=0) or 1
        ax.set_ylim(0, top * (1.35 if len(series) > 1 else 1.1))  # room for the legend
        for i, (label, value) in enumerate(series):
            values = [value(r) for r in ran]
            bars = ax.bar([x + (i - (len(series) - 1) / 2) * width for x in range(len(ran))],
                          values, width, label=label or None, color=f'C{i}')
            ax.bar_label(bars, [f'{v:.0f}' if v >= 100 else f'{v:.3g}' for v in values],
                         fontsize=7)
        ax.set_xticks(range(len(ran)), names, rotation=20, fontsize=8)
        ax.set_title(title, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=7, loc='upper left')
    axes[1].axhline(512, color='grey', linestyle='--', linewidth=1)
    skipped = ', '.join(r.engine for r in runs if r.unavailable)
    save_figure(fig, path, f'ragbeam on each engine: {runs[0].input}'
                + (f' (not run: {skipped})' if skipped else ''))


def redraw(report: str) -> None:
    """Draws the PNG of a saved NAME.json again, beside it."""
    with open(report) as f:
        runs = [EngineRun(**r) for r in json.load(f)['runs']]
    chart(runs, report[:-len('.json')] + '.png')


def bench(name: str, label: str, path: str, tiny: str, unit: str, workdir: str, out: str,
          extra=(), only: Sequence[str] = ()) -> int:
    """Every engine (or those in `only`) on `path`; prints the table, writes OUT/NAME.json and
    .png (NAME-ENGINE-...json and .png for a subset)."""
    unknown = set(only) - set(ENGINES)
    if unknown:
        raise SystemExit(f'unknown engines {sorted(unknown)}; known: {", ".join(ENGINES)}')
    if only:
        name = '-'.join((name, *only))
    os.makedirs(workdir, exist_ok=True)
    runs = []
    for engine in only or ENGINES:
        print(f'{label}: {engine} ...', flush=True)
        runs.append(measure(engine, label, path, tiny, unit, workdir, extra))
    summ = summary(runs)
    print('\n' + markdown(runs))
    save_report(out, name, runs, summ, chart)
    return 0 if summ['all_runs_ok'] else 1
