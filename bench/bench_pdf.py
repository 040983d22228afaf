"""PDF pages per second of ragbeam against a plain pypdf loop, and ragbeam's peak RSS by PDF size.

    .venv/bin/python -m bench.bench_pdf [--pages 600] [--rss-pages 100,300,900]
                                        [--corpus /work/shared/corpus/pdf] [--wait-idle SECONDS]
                                        [--workdir DIR] [--out DIR]

Every run is a measured subprocess (wall time, peak RSS summed over its process tree):

- throughput, on one generated PDF of --pages pages (bench.generate.write_pdf: one line of
  text and an incompressible ~400 KB image per page) and on the --corpus folder as it is
  (broken and encrypted PDFs, and the slow pdfjs-issue6961.pdf, included), by
  - ragbeam, 2 workers: `ragbeam run --input PATH --output DIR --embedder hash --index-type none
    --pdf-page-timeout 300 --direct_num_workers 2 --direct_running_mode multi_processing`,
  - ragbeam, 1 worker: the same without the two --direct_* flags,
  - plain pypdf: the `plain` sub-command of this script, one process, one file after another:
    PdfReader, decrypt('') when encrypted (the file is skipped when that fails), then
    page.extract_text() for every page in try/except.
  Pages/s is pages / wall seconds of the whole process; ragbeam's pages are the sum of the
  manifest's `pages` column over objects with status ok, the plain loop's the pages whose
  extract_text() returned.
- peak RSS, ragbeam with its default flags (1 worker) on generated PDFs of --rss-pages pages.

Before each run the machine's CPU use is sampled for a second (the `busy%` column): other
processes share the cores with the run, and a warning is printed when they were more than
10% busy (--wait-idle S first waits up to S seconds for them to be idle).

Prints a table, then the targets (reported, never asserted): ragbeam with 2 workers >= 1.7x
the plain loop's pages/s on the generated PDF; ragbeam's peak RSS flat across PDF sizes
(largest / smallest <= 1.3) and <= 512 MB. Writes OUT/pdf.json and OUT/pdf.png.

    .venv/bin/python -m bench.bench_pdf plain --input FILE_OR_DIR

runs the plain loop alone and prints {"pages": N, ...} as JSON.
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from bench.generate import write_pdf
from bench.measure import run_measured, save_figure, save_report, warm_cache

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
CORPUS = '/work/shared/corpus/pdf'
PAGE_TIMEOUT = 300  # seconds: high enough that no page of the corpus is cut off

# Targets (reported, not asserted)
SPEEDUP_TARGET = 1.7
RSS_LIMIT_MB = 512.0
RSS_GROWTH_LIMIT = 1.3
BUSY_WARNING_PCT = 10.0  # cores busier than this before a run: its numbers are suspect

RAGBEAM_2 = 'ragbeam 2 workers'
RAGBEAM_1 = 'ragbeam 1 worker'
PLAIN = 'plain pypdf'
RUNNERS = (RAGBEAM_2, RAGBEAM_1, PLAIN)
THROUGHPUT = 'throughput'
RSS = 'rss'


@dataclass
class Result:
    """One measured run of one runner on one input (a PDF or a folder of PDFs).

    `pages` is what pages/s is computed from (see the module docstring). `page_errors` are
    ragbeam's extract error records, or the plain loop's extract_text() exceptions; those
    pages are in ragbeam's `pages` but not in the plain loop's. `pipeline_seconds` is the
    wall time ragbeam writes to its report.json, `extract_seconds` the plain loop's own timing
    of its work (after imports). `busy_before_pct` is how busy the machine's cores were
    (0-100) in the second before the run, when only other processes ran: those share the cores
    with the run.
    """
    experiment: str
    input_label: str
    size_bytes: int
    files: int
    runner: str
    returncode: int
    wall_seconds: float
    pages: int
    pages_per_s: float
    peak_rss_mb: float
    page_errors: int
    files_ok: int
    files_failed: int
    chunks: Optional[int] = None
    bytes_read: Optional[int] = None
    pipeline_seconds: Optional[float] = None
    extract_seconds: Optional[float] = None
    busy_before_pct: Optional[float] = None


# ---------------------------------------------------------------- the plain loop

def pdf_files(path: str) -> list[str]:
    """The PDF at `path`, or the PDFs in the folder `path`, sorted."""
    if os.path.isdir(path):
        return sorted(glob.glob(os.path.join(path, '*.pdf')))
    return [path]


def plain_file(path: str) -> tuple[int, int, bool]:
    """(pages extracted, pages whose extract_text raised, whether the file opened) of one PDF."""
    from pypdf import PdfReader

    pages = errors = 0
    try:
        reader = PdfReader(path)
        if reader.is_encrypted and not reader.decrypt(''):
            return 0, 0, False
        for page in reader.pages:
            try:
                page.extract_text()
                pages += 1
            except Exception:
                errors += 1
    except Exception:  # a file pypdf cannot open or whose page tree breaks: skipped
        return pages, errors, False
    return pages, errors, True


def run_plain(path: str) -> None:
    """The plain single-process loop over `path`; prints its counts and seconds as JSON."""
    import pypdf

    logging.getLogger('pypdf').setLevel(logging.CRITICAL)  # its warnings on broken files
    started = time.perf_counter()
    pages = errors = ok = failed = 0
    for file in pdf_files(path):
        n, e, opened = plain_file(file)
        pages, errors = pages + n, errors + e
        ok, failed = ok + opened, failed + (not opened)
    print(json.dumps({'pages': pages, 'page_errors': errors, 'files_ok': ok,
                      'files_failed': failed, 'seconds': time.perf_counter() - started,
                      'pypdf': pypdf.__version__}))


# ---------------------------------------------------------------- inputs

def generated_pdf(workdir: str, pages: int) -> str:
    """A generated PDF of `pages` pages, reused when already there."""
    path = os.path.join(workdir, f'pdf-{pages}p.pdf')
    if not os.path.exists(path):
        print(f'generating {path} ({pages} pages)', flush=True)
        write_pdf(path + '.part', pages)
        os.replace(path + '.part', path)
    return path


def input_size(path: str) -> tuple[int, int]:
    """(bytes, files) of a PDF or a folder of PDFs."""
    files = pdf_files(path)
    return sum(os.path.getsize(f) for f in files), len(files)


# ---------------------------------------------------------------- measuring

def ragbeam_command(path: str, output: str, workers: int, page_timeout: Optional[int]) -> list[str]:
    """`ragbeam run` on `path`; 2 workers adds the multi-processing direct_* flags."""
    ragbeam = str(Path(sys.executable).with_name('ragbeam'))
    cmd = [ragbeam, 'run', '--input', path, '--output', output,
           '--embedder', 'hash', '--index-type', 'none']
    if page_timeout is not None:
        cmd += ['--pdf-page-timeout', str(page_timeout)]
    if workers > 1:
        cmd += ['--direct_num_workers', str(workers), '--direct_running_mode', 'multi_processing']
    return cmd


def ragbeam_counts(output: str) -> dict:
    """Pages of ok objects, object and page-error counts and report.json figures of one run."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    manifest = ds.dataset(os.path.join(output, 'manifest'), format='parquet').to_table(
        columns=['status', 'pages'])
    ok = pc.equal(manifest.column('status'), 'ok')
    pages = pc.sum(pc.filter(manifest.column('pages'), ok)).as_py() or 0
    page_errors = 0
    for name in glob.glob(os.path.join(output, 'errors', '*.jsonl')):  # JSON lines, if any
        with open(name) as f:
            page_errors += sum(json.loads(line).get('stage') == 'extract'
                               for line in f if line.strip())
    with open(os.path.join(output, 'report.json')) as f:
        report = json.load(f)
    files_ok = pc.sum(ok.cast('int64')).as_py() or 0
    return {'pages': pages, 'page_errors': page_errors, 'files_ok': files_ok,
            'files_failed': manifest.num_rows - files_ok,
            'chunks': report.get('chunks'), 'bytes_read': report.get('bytes_read'),
            'pipeline_seconds': report.get('wall_seconds')}


def measure_ragbeam(experiment: str, label: str, path: str, workdir: str, workers: int,
                    page_timeout: Optional[int], wait_idle: float) -> Result:
    """One measured ragbeam run; its output is read, then deleted."""
    runner = RAGBEAM_2 if workers > 1 else RAGBEAM_1
    output = os.path.join(workdir, 'out')
    shutil.rmtree(output, ignore_errors=True)
    busy = machine_busy(wait_idle)
    try:
        m = run_measured(ragbeam_command(path, output, workers, page_timeout), cwd=REPO)
        counts = ragbeam_counts(output) if m.returncode == 0 else {}
    finally:
        shutil.rmtree(output, ignore_errors=True)
    if m.returncode != 0:
        print(f'{runner} on {label} exited with {m.returncode}:\n{m.output[-4000:]}', flush=True)
    return _result(experiment, label, path, runner, m, counts, busy)


def measure_plain(experiment: str, label: str, path: str, wait_idle: float) -> Result:
    """One measured run of the `plain` sub-command."""
    busy = machine_busy(wait_idle)
    m = run_measured([sys.executable, '-m', 'bench.bench_pdf', 'plain', '--input', path],
                     cwd=REPO)
    counts = {}
    if m.returncode == 0:
        counts = json.loads(m.output.strip().splitlines()[-1])
        counts['extract_seconds'] = round(counts.pop('seconds'), 2)
        counts.pop('pypdf')
    else:
        print(f'{PLAIN} on {label} exited with {m.returncode}:\n{m.output[-4000:]}', flush=True)
    return _result(experiment, label, path, PLAIN, m, counts, busy)


def machine_busy(wait_idle: float = 0.0) -> float:
    """CPU busy % over a second, sampled again for up to `wait_idle` seconds until the cores
    are idle; with a warning when other work still keeps them busy."""
    import psutil

    deadline = time.monotonic() + wait_idle
    busy = psutil.cpu_percent(interval=1.0)
    while busy > BUSY_WARNING_PCT and time.monotonic() < deadline:
        busy = psutil.cpu_percent(interval=1.0)
    if busy > BUSY_WARNING_PCT:
        print(f'warning: the cores were {busy:.0f}% busy before this run: other processes '
              f'share the machine', flush=True)
    return busy


def _result(experiment: str, label: str, path: str, runner: str, m, counts: dict,
            busy: float) -> Result:
    size, files = input_size(path)
    pages = counts.pop('pages', 0)
    return Result(experiment, label, size, files, runner, m.returncode, round(m.wall_seconds, 2),
                  pages, round(pages / m.wall_seconds, 2), round(m.peak_rss_mb, 1),
                  counts.pop('page_errors', 0), counts.pop('files_ok', 0),
                  counts.pop('files_failed', 0), **counts, busy_before_pct=busy)


def _show(r: Result) -> None:
    print(f'{r.input_label}: {r.runner}: {r.wall_seconds:.2f} s, {r.pages} pages, '
          f'{r.pages_per_s:.2f} pages/s, peak RSS {r.peak_rss_mb:.1f} MB, rc {r.returncode}',
          flush=True)


def throughput_runs(label: str, path: str, workdir: str, page_timeout: int,
                    wait_idle: float) -> list[Result]:
    """ragbeam with 2 workers, with 1, and the plain loop, on one input."""
    warm_cache(*pdf_files(path))
    results = []
    for runner in RUNNERS:
        if runner == PLAIN:
            r = measure_plain(THROUGHPUT, label, path, wait_idle)
        else:
            r = measure_ragbeam(THROUGHPUT, label, path, workdir,
                                2 if runner == RAGBEAM_2 else 1, page_timeout, wait_idle)
        _show(r)
        results.append(r)
    return results


def rss_runs(pages: Sequence[int], workdir: str, wait_idle: float) -> list[Result]:
    """ragbeam with its default flags (1 worker) on a generated PDF of each page count."""
    results = []
    for n in pages:
        path = generated_pdf(workdir, n)
        warm_cache(*pdf_files(path))
        r = measure_ragbeam(RSS, f'{n} pages', path, workdir, 1, None, wait_idle)
        _show(r)
        results.append(r)
    return results


# ---------------------------------------------------------------- reporting

def summary(results: list[Result], big_label: str) -> dict:
    """Pages/s ratios per input, the speed-up target on the big PDF, and the RSS targets."""
    by = {(r.runner, r.input_label): r for r in results if r.experiment == THROUGHPUT}
    ratios = {}
    for label in dict.fromkeys(l for _, l in by):
        plain, two, one = by[(PLAIN, label)], by[(RAGBEAM_2, label)], by[(RAGBEAM_1, label)]
        ratios[label] = {
            'ragbeam_2_over_plain': _ratio(two.pages_per_s, plain.pages_per_s),
            'ragbeam_1_over_plain': _ratio(one.pages_per_s, plain.pages_per_s),
            'ragbeam_2_over_1': _ratio(two.pages_per_s, one.pages_per_s),
        }
    speedup = ratios.get(big_label, {}).get('ragbeam_2_over_plain')
    rss = sorted((r for r in results if r.experiment == RSS), key=lambda r: r.size_bytes)
    growth = _ratio(rss[-1].peak_rss_mb, rss[0].peak_rss_mb) if len(rss) > 1 else None
    return {
        'throughput': ratios,
        'speedup': {'input': big_label, 'ragbeam_2_over_plain': speedup,
                    'target': SPEEDUP_TARGET,
                    'target_met': None if speedup is None else speedup >= SPEEDUP_TARGET},
        'rss': {
            'smallest': rss[0].input_label if rss else None,
            'largest': rss[-1].input_label if rss else None,
            'peak_rss_mb_largest': rss[-1].peak_rss_mb if rss else None,
            'max_peak_rss_mb': max((r.peak_rss_mb for r in rss), default=None),
            'limit_mb': RSS_LIMIT_MB,
            'limit_met': all(r.peak_rss_mb <= RSS_LIMIT_MB for r in rss) if rss else None,
            'growth_largest_over_smallest': growth,
            'growth_limit': RSS_GROWTH_LIMIT,
            'growth_met': None if growth is None else growth <= RSS_GROWTH_LIMIT,
        },
        'all_runs_ok': all(r.returncode == 0 for r in results),
    }


def _ratio(a: float, b: float) -> Optional[float]:
    return round(a / b, 3) if b else None


def _met(flag: Optional[bool]) -> str:
    return 'n/a' if flag is None else ('met' if flag else 'NOT met')


def print_table(results: list[Result], summ: dict) -> None:
    """Every run, then the ratios per input and whether each target is met."""
    print(f"\n{'experiment':>10} {'input':>22} {'MB':>7} {'runner':>17} {'wall s':>8} "
          f"{'pages':>6} {'pages/s':>8} {'page err':>8} {'files ok/failed':>15} "
          f"{'peak RSS MB':>11} {'busy%':>5} {'rc':>3}")
    for r in results:
        files = f'{r.files_ok}/{r.files_failed}'
        print(f'{r.experiment:>10} {r.input_label:>22} {r.size_bytes / MB:>7.1f} {r.runner:>17} '
              f'{r.wall_seconds:>8.2f} {r.pages:>6} {r.pages_per_s:>8.2f} {r.page_errors:>8} '
              f'{files:>15} {r.peak_rss_mb:>11.1f} {r.busy_before_pct:>5.0f} {r.returncode:>3}')
    print()
    for label, t in summ['throughput'].items():
        print(f"{label}: pages/s ragbeam 2 workers / plain {t['ragbeam_2_over_plain']}, "
              f"1 worker / plain {t['ragbeam_1_over_plain']}, "
              f"2 workers / 1 worker {t['ragbeam_2_over_1']}")
    s = summ['speedup']
    print(f"speed-up on {s['input']}: ragbeam 2 workers / plain {s['ragbeam_2_over_plain']} "
          f"(target >= {SPEEDUP_TARGET}: {_met(s['target_met'])})")
    rss = summ['rss']
    if rss['largest'] is not None:
        print(f"ragbeam 1 worker max peak RSS {rss['max_peak_rss_mb']:.1f} MB "
              f"(target <= {RSS_LIMIT_MB:.0f} MB: {_met(rss['limit_met'])})")
        print(f"ragbeam 1 worker peak RSS {rss['largest']} / {rss['smallest']}: "
              f"{rss['growth_largest_over_smallest']} "
              f"(target <= {RSS_GROWTH_LIMIT}: {_met(rss['growth_met'])})")


def write_chart(results: list[Result], path: str) -> None:
    """Pages/s per input for the three runners; ragbeam's peak RSS against PDF size."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    by = {(r.runner, r.input_label): r for r in results if r.experiment == THROUGHPUT}
    labels = list(dict.fromkeys(l for _, l in by))
    fig, (speed, mem) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.8 / len(RUNNERS)
    for i, runner in enumerate(RUNNERS):
        xs = [j + (i - (len(RUNNERS) - 1) / 2) * width for j in range(len(labels))]
        bars = speed.bar(xs, [by[(runner, l)].pages_per_s for l in labels], width, label=runner)
        speed.bar_label(bars, fmt='%.1f', fontsize=8)
    speed.set_xticks(range(len(labels)), [
        f'{l}\n{by[(PLAIN, l)].size_bytes / MB:.0f} MB, {by[(PLAIN, l)].files} file(s)'
        for l in labels])
    speed.set_ylabel('pages / wall second')
    speed.set_title('Pages per second (whole process)')
    speed.legend()
    rss = sorted((r for r in results if r.experiment == RSS), key=lambda r: r.size_bytes)
    xs = [r.size_bytes / MB for r in rss]
    mem.plot(xs, [r.peak_rss_mb for r in rss], marker='o', label=RAGBEAM_1 + ' (default flags)')
    for r, x in zip(rss, xs):
        mem.annotate(f'{r.input_label}\n{r.peak_rss_mb:.0f} MB', (x, r.peak_rss_mb),
                     textcoords='offset points', xytext=(0, 8), ha='center', fontsize=8)
    mem.axhline(RSS_LIMIT_MB, color='grey', linestyle='--', linewidth=1,
                label=f'target {RSS_LIMIT_MB:.0f} MB')
    mem.set_ylim(0, max([RSS_LIMIT_MB] + [r.peak_rss_mb for r in rss]) * 1.2)
    mem.set_xlabel('PDF size (MB)')
    mem.set_ylabel('peak RSS of the process tree (MB)')
    mem.set_title('ragbeam peak RSS vs PDF size')
    mem.legend(loc='lower right')
    save_figure(fig, path, 'PDFs: ragbeam (hash embedder, FnApiRunner) vs a plain pypdf loop')


def git_commit() -> Optional[str]:
    """The checked-out commit, with '+dirty' when tracked files differ from it."""
    import subprocess

    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=REPO, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ('+dirty' if dirty else '')


# ---------------------------------------------------------------- command line

def bench(pages: int, rss_pages: Sequence[int], corpus: Optional[str], workdir: str,
          out: str, wait_idle: float = 0.0) -> int:
    """Throughput on the generated PDF and the corpus, then RSS by size; 1 when a run failed."""
    os.makedirs(workdir, exist_ok=True)
    big_label = f'generated {pages} pages'
    results = throughput_runs(big_label, generated_pdf(workdir, pages), workdir, PAGE_TIMEOUT,
                              wait_idle)
    if corpus:
        results += throughput_runs(f'corpus {os.path.basename(corpus.rstrip("/"))}', corpus,
                                   workdir, PAGE_TIMEOUT, wait_idle)
    results += rss_runs(rss_pages, workdir, wait_idle)
    summ = summary(results, big_label)
    print_table(results, summ)
    import pypdf

    save_report(out, 'pdf', results, summ, write_chart, commit=git_commit(), mb=MB, corpus=corpus,
                page_timeout_seconds=PAGE_TIMEOUT, pypdf=pypdf.__version__)
    return 0 if summ['all_runs_ok'] else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bench.bench_pdf', description=__doc__.split('\n')[0])
    p.add_argument('--pages', type=int, default=600,
                   help='pages of the generated PDF of the throughput runs (~400 KB each)')
    p.add_argument('--rss-pages', default='100,300,900',
                   help='comma-separated page counts of the generated PDFs of the RSS runs')
    p.add_argument('--corpus', default=CORPUS,
                   help="folder of real PDFs for the throughput runs ('' to leave out)")
    p.add_argument('--workdir', default='/tmp/ragbeam-bench-pdf',
                   help='where PDFs are generated (and reused) and outputs go while a run lasts')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'),
                   help='folder for pdf.json and pdf.png')
    p.add_argument('--wait-idle', type=float, default=0.0, metavar='SECONDS',
                   help='before each run, wait up to this long for the cores to be idle')
    sub = p.add_subparsers(dest='command')
    plain = sub.add_parser('plain', help='run the plain pypdf loop alone')
    plain.add_argument('--input', required=True, metavar='FILE_OR_DIR')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.command == 'plain':
        run_plain(args.input)
        return 0
    rss_pages = [int(n) for n in args.rss_pages.split(',') if n.strip()]
    return bench(args.pages, rss_pages, args.corpus or None, args.workdir, args.out,
                 args.wait_idle)


if __name__ == '__main__':
    sys.exit(main())
