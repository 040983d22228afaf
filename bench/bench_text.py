"""Throughput and peak memory of ragbeam on large text objects, against a naive Beam pipeline.

    .venv/bin/python -m bench.bench_text [--sizes 10MiB,250MiB,1GiB] [--workdir DIR] [--out DIR]

For each size, a generated text object is ingested twice, each run a measured subprocess:
`ragbeam run ... --embedder hash --index-type none`, and the `naive` sub-command of this
script, which reads each file whole (fileio.MatchFiles | ReadMatches | FlatMap) and then
chunks, embeds and writes Parquet with the same transforms as ragbeam. Prints a table,
writes OUT/text.json and OUT/text.png.

    .venv/bin/python -m bench.bench_text naive --input PATTERN --output DIR

runs the naive pipeline alone, and

    .venv/bin/python -m bench.bench_text engines [--size 1GiB]

the object on each engine (the FnApiRunner, Prism, Flink where it can be had: bench.engines).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import apache_beam as beam
from apache_beam.io import fileio
from apache_beam.io.restriction_trackers import OffsetRange, OffsetRestrictionTracker

from bench.generate import write_text
from bench.measure import run_measured, save_figure, save_report, warm_cache
from pipeline.options import parse_size
from transforms.chunk import ChunkerSettings, ChunkRule, chunk_id
from transforms.decode import DETECT_BYTES, detect_encoding
from transforms.embed import Embed, EmbedOptions
from transforms.readers import is_blank
from transforms.store import store_for
from transforms.types import Chunk
from transforms.write import WriteChunks

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
# ragbeam's defaults, which the naive pipeline copies
EMBEDDER = 'hash'
BATCH_COUNT = 256
BATCH_BYTES = 4 << 20

# Targets (reported, not asserted)
RSS_LIMIT_MB = 512.0
RSS_GROWTH_LIMIT = 1.3
THROUGHPUT_FACTOR = 2.0

PIPELINES = ('ragbeam', 'naive')


@dataclass
class Result:
    """One measured run of one pipeline on one object."""
    size_label: str
    size_bytes: int
    pipeline: str
    returncode: int
    wall_seconds: float
    mb_per_s: float
    peak_rss_mb: float
    rows: int
    peak_anon_mb: float = 0.0  # RSS less file-backed pages (bench/measure.py)


# ---------------------------------------------------------------- the naive pipeline

def whole_file_chunks(rf: fileio.ReadableFile, settings: ChunkerSettings) -> Iterator[Chunk]:
    """The chunks of one file, read whole into memory, by ragbeam's chunk rule."""
    ref = store_for(rf.metadata.path).ref(rf.metadata)  # same uri and version as ragbeam
    data = rf.read()
    enc = detect_encoding(data[:DETECT_BYTES], len(data))
    rule = ChunkRule(settings, enc, len(data))
    claim = OffsetRestrictionTracker(OffsetRange(0, len(data))).try_claim
    tag = settings.tag()
    for start, end in rule.spans(lambda a, b: data[a:b], claim, 0):
        text = data[start:end].decode(enc.codec)
        if is_blank(text):
            continue
        cid, id64 = chunk_id(ref.uri, ref.version, None, start, end, tag)
        yield Chunk(cid, id64, ref.uri, ref.version, 'text', None, start, end, text,
                    encoding=enc.codec)


def build_naive(p: beam.Pipeline, pattern: str, output: str) -> None:
    """MatchFiles -> ReadMatches -> whole-file chunks -> ragbeam's embed and write."""
    options = EmbedOptions(embedder=EMBEDDER, batch_size=BATCH_COUNT, batch_bytes=BATCH_BYTES)
    _ = (p
         | 'Match' >> fileio.MatchFiles(pattern)
         | 'Read' >> fileio.ReadMatches()
         | 'Chunk' >> beam.FlatMap(whole_file_chunks, ChunkerSettings())
         | 'Embed' >> Embed(options)
         | 'WriteChunks' >> WriteChunks(os.path.join(output, 'chunks', 'chunks'), options.dim))


def run_naive(pattern: str, output: str) -> None:
    """Runs the naive pipeline on the in-process FnApiRunner (the DirectRunner needs a download)."""
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    os.makedirs(output, exist_ok=True)
    with beam.Pipeline(runner=FnApiRunner()) as p:
        build_naive(p, pattern, output)
    print(f'naive: {parquet_rows(output)} chunks written to {output}')


# ---------------------------------------------------------------- measuring

def input_file(workdir: str, label: str, size: int) -> str:
    """A generated text object of exactly `size` bytes, reused when already there."""
    path = os.path.join(workdir, f'text-{label}.txt')
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        print(f'generating {path} ({size} bytes)', flush=True)
        write_text(path, size)
    return path


def command(pipeline: str, path: str, output: str) -> list[str]:
    """The command line that runs `pipeline` on `path` into `output`."""
    if pipeline == 'ragbeam':
        ragbeam = str(Path(sys.executable).with_name('ragbeam'))
        return [ragbeam, 'run', '--input', path, '--output', output,
                '--embedder', EMBEDDER, '--index-type', 'none']
    return [sys.executable, '-m', 'bench.bench_text', 'naive', '--input', path, '--output', output]


def parquet_rows(output: str) -> int:
    """Rows of the chunk table under `output` (ragbeam's Delta table, through its log; the
    naive pipeline's plain Parquet folder), from the files' footers."""
    from transforms import outputs

    folder = outputs.ParquetFolder(outputs.path(output, 'chunks'))
    return sum(folder.open(ref).metadata.num_rows for ref in folder.refs)


def measure(pipeline: str, label: str, path: str, workdir: str) -> Result:
    """Runs one pipeline on one object as a measured subprocess; deletes its output after."""
    output = os.path.join(workdir, f'out-{pipeline}-{label}')
    shutil.rmtree(output, ignore_errors=True)
    size = os.path.getsize(path)
    try:
        m = run_measured(command(pipeline, path, output), cwd=REPO)
        rows = parquet_rows(output) if m.returncode == 0 else 0
    finally:
        shutil.rmtree(output, ignore_errors=True)
    if m.returncode != 0:
        print(f'{pipeline} on {label} exited with {m.returncode}:\n{m.output[-4000:]}', flush=True)
    return Result(label, size, pipeline, m.returncode, round(m.wall_seconds, 2),
                  round(size / MB / m.wall_seconds, 2), round(m.peak_rss_mb, 1), rows,
                  round(m.peak_anon_mb, 1))


# ---------------------------------------------------------------- reporting

def summary(results: list[Result]) -> dict:
    """Ratios and targets: throughput against naive per size, RSS growth and limit of ragbeam."""
    by = {(r.pipeline, r.size_label): r for r in results}
    labels = list(dict.fromkeys(r.size_label for r in results))
    throughput = {}
    for label in labels:
        ours, naive = by[('ragbeam', label)], by[('naive', label)]
        throughput[label] = {
            'ragbeam_over_naive': round(ours.mb_per_s / naive.mb_per_s, 3),
            'target_met': ours.mb_per_s >= naive.mb_per_s / THROUGHPUT_FACTOR,
        }
    ordered = sorted(labels, key=lambda l: by[('ragbeam', l)].size_bytes)
    small, large = by[('ragbeam', ordered[0])], by[('ragbeam', ordered[-1])]
    growth = round(large.peak_rss_mb / small.peak_rss_mb, 3) if len(ordered) > 1 else None
    anon_growth = (round(large.peak_anon_mb / small.peak_anon_mb, 3)
                   if len(ordered) > 1 and small.peak_anon_mb else None)
    return {
        'throughput': throughput,
        'rss': {
            'largest': large.size_label,
            'smallest': small.size_label,
            'ragbeam_peak_rss_mb_largest': large.peak_rss_mb,
            'limit_mb': RSS_LIMIT_MB,
            'limit_met': large.peak_rss_mb <= RSS_LIMIT_MB,
            'growth_largest_over_smallest': growth,
            'growth_limit': RSS_GROWTH_LIMIT,
            'growth_met': None if growth is None else growth <= RSS_GROWTH_LIMIT,
            # the part that grows with data: RSS also counts library pages, more of which a
            # long run touches (README, "How memory is measured")
            'anon_growth_largest_over_smallest': anon_growth,
        },
        'all_runs_ok': all(r.returncode == 0 for r in results),
    }


def print_table(results: list[Result], summ: dict) -> None:
    """The numbers, then whether each target is met."""
    print(f"\n{'size':>8} {'pipeline':>8} {'wall s':>9} {'MB/s':>8} {'peak RSS MB':>12} "
          f"{'anon MB':>8} {'chunks':>10} {'rc':>3}")
    for r in results:
        print(f'{r.size_label:>8} {r.pipeline:>8} {r.wall_seconds:>9.2f} {r.mb_per_s:>8.2f} '
              f'{r.peak_rss_mb:>12.1f} {r.peak_anon_mb:>8.1f} {r.rows:>10} {r.returncode:>3}')
    print()
    for label, t in summ['throughput'].items():
        print(f"throughput ragbeam/naive at {label}: {t['ragbeam_over_naive']:.3f} "
              f"(target >= {1 / THROUGHPUT_FACTOR:.2f}: {_met(t['target_met'])})")
    rss = summ['rss']
    print(f"ragbeam peak RSS at {rss['largest']}: {rss['ragbeam_peak_rss_mb_largest']:.1f} MB "
          f"(target <= {RSS_LIMIT_MB:.0f} MB: {_met(rss['limit_met'])})")
    growth = rss['growth_largest_over_smallest']
    print(f"ragbeam peak RSS {rss['largest']} / {rss['smallest']}: "
          f"{'n/a' if growth is None else f'{growth:.3f}'} "
          f"(target <= {RSS_GROWTH_LIMIT}: {_met(rss['growth_met'])})")
    anon = rss['anon_growth_largest_over_smallest']
    if anon is not None:
        print(f"ragbeam peak anonymous memory {rss['largest']} / {rss['smallest']}: {anon:.3f}")


def _met(flag: Optional[bool]) -> str:
    return 'n/a' if flag is None else ('met' if flag else 'NOT met')


def write_chart(results: list[Result], path: str) -> None:
    """Two panels of bars per size, ragbeam beside naive: MB/s and peak RSS MB."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.size_label for r in results))
    by = {(r.pipeline, r.size_label): r for r in results}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    width = 0.38
    for ax, field, title in ((axes[0], 'mb_per_s', 'Throughput (MB/s)'),
                             (axes[1], 'peak_rss_mb', 'Peak RSS (MB)')):
        for i, pipeline in enumerate(PIPELINES):
            xs = [j + (i - 0.5) * width for j in range(len(labels))]
            values = [getattr(by[(pipeline, l)], field) for l in labels]
            bars = ax.bar(xs, values, width, label=pipeline)
            ax.bar_label(bars, fmt='%.1f', fontsize=8)
        ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel('object size')
        ax.set_title(title)
    axes[1].axhline(RSS_LIMIT_MB, color='grey', linestyle='--', linewidth=1,
                    label=f'target {RSS_LIMIT_MB:.0f} MB')
    for ax in axes:
        ax.legend()
    save_figure(fig, path, 'ragbeam vs naive whole-file Beam pipeline (hash embedder, FnApiRunner)')


# ---------------------------------------------------------------- command line

def bench(sizes: str, workdir: str, out: str) -> int:
    """Measures both pipelines at every size; 1 when any run failed."""
    os.makedirs(workdir, exist_ok=True)
    results = []
    for label in (s.strip() for s in sizes.split(',') if s.strip()):
        path = input_file(workdir, label, parse_size(label))
        warm_cache(path)
        for pipeline in PIPELINES:
            print(f'{label}: {pipeline} ...', flush=True)
            r = measure(pipeline, label, path, workdir)
            print(f'{label}: {pipeline}: {r.wall_seconds:.2f} s, {r.mb_per_s:.2f} MB/s, '
                  f'peak RSS {r.peak_rss_mb:.1f} MB, {r.rows} chunks', flush=True)
            results.append(r)
    summ = summary(results)
    print_table(results, summ)
    save_report(out, 'text', results, summ, write_chart, mb=MB)
    return 0 if summ['all_runs_ok'] else 1


def bench_engines(size: str, workdir: str, out: str, only: Sequence[str] = ()) -> int:
    """One generated object on every engine (or those in `only`), MB/s side by side:
    OUT/text-engines.json and .png."""
    from bench import engines

    os.makedirs(workdir, exist_ok=True)
    path = input_file(workdir, size, parse_size(size))
    tiny = input_file(workdir, '1KiB', 1024)
    warm_cache(path)
    return engines.bench('text-engines', f'{size} text object', path, tiny, 'MB', workdir, out,
                         only=only)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bench.bench_text', description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default='10MiB,250MiB,1GiB', help='comma-separated object sizes')
    p.add_argument('--workdir', default='/tmp/ragbeam-bench',
                   help='where inputs are generated (and reused) and outputs go while a run lasts')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'),
                   help='folder for text.json and text.png')
    sub = p.add_subparsers(dest='command')
    engines = sub.add_parser('engines', help='one object on each engine (bench.engines)')
    engines.add_argument('--size', default='1GiB', help='the generated object\'s size')
    engines.add_argument('--engines', default='', help='comma-separated subset of the engines '
                         '(fnapi, prism, flink-embedded, flink-cluster); default all')
    naive = sub.add_parser('naive', help='run the naive whole-file pipeline alone')
    naive.add_argument('--input', required=True, metavar='PATTERN')
    naive.add_argument('--output', required=True, metavar='DIR')
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.command == 'naive':
        run_naive(args.input, args.output)
        return 0
    if args.command == 'engines':
        return bench_engines(args.size, args.workdir, args.out,
                             [e for e in args.engines.split(',') if e])
    return bench(args.sizes, args.workdir, args.out)


if __name__ == '__main__':
    sys.exit(main())
