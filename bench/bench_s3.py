"""S3 reads: ragbeam against a plain boto3 download, through moto and a byte-counting proxy.

    .venv/bin/python -m bench.bench_s3 [--sizes 1MiB,32MiB,256MiB] [--workdir DIR] [--out DIR]

moto's S3 server and tests.servers.FaultProxy (faults off) run inside this process, on
127.0.0.1. For each size, a generated text object is uploaded with boto3 `upload_file` and
read, each reader a measured subprocess (wall time, peak RSS of its process tree):

- ragbeam: `ragbeam run --input s3://bench/KEY ... --embedder hash --index-type none`, and for
  the largest size once more with `--split-bytes 8MiB`. Bytes over the wire are what the
  proxy counts of ranged GETs during the run; the wire ratio is that over the object size.
- store: the `store` sub-command of this script, ragbeam's S3Store.read_range over the whole
  object in sequential 8 MiB windows (ragbeam's default), with no pipeline around it: the
  read-only share of a ragbeam run.
- boto3: the `boto3` sub-command, one plain GET read in 8 MiB pieces with `iter_chunks`.
  Non-ranged GETs are not counted by the proxy; its bytes are taken as the object size.

Prints a table, writes OUT/s3.json and OUT/s3.png.

    .venv/bin/python -m bench.bench_s3 store|boto3 --endpoint URL --bucket B --key K

runs one reader alone and prints {"bytes": N, "seconds": S} of its transfer (timed after the
client is made and, for store, the object listed).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.generate import write_text
from bench.measure import run_measured, save_figure, save_report
from pipeline.options import parse_size

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
BUCKET = 'bench'
PIECE_BYTES = 8 << 20  # boto3's iter_chunks piece and the store reader's window (ragbeam's default)
SPLIT_BYTES = '8MiB'
WIRE_RATIO_LIMIT = 1.05

RAGBEAM = 'ragbeam'
RAGBEAM_SPLIT = f'ragbeam split {SPLIT_BYTES}'
STORE = 'store'
BOTO3 = 'boto3'


@dataclass
class Result:
    """One measured read of one object by one reader.

    `seconds` is what MB/s is computed from: the whole process's wall time for ragbeam, the
    transfer alone (timed inside the process, after its client is made) for store and boto3.
    `pipeline_seconds` is the wall time ragbeam writes to its report.json.
    """
    size_label: str
    size_bytes: int
    reader: str
    returncode: int
    wall_seconds: float
    seconds: float
    mb_per_s: float
    peak_rss_mb: float
    wire_bytes: int
    wire_ratio: Optional[float]
    chunks: Optional[int] = None
    pipeline_seconds: Optional[float] = None


# ---------------------------------------------------------------- the readers alone

def store_reader(endpoint: str, bucket: str, key: str) -> Callable[[], int]:
    """A read of the object through ragbeam's S3Store in sequential windows, ready to start."""
    from transforms.store import S3Store, StoreConfig

    store = S3Store(StoreConfig(s3_endpoint_url=endpoint))
    ref = next(store.list(f's3://{bucket}/{key}'))
    return lambda: sum(len(store.read_range(ref, start, start + PIECE_BYTES))
                       for start in range(0, ref.size, PIECE_BYTES))


def boto3_reader(endpoint: str, bucket: str, key: str) -> Callable[[], int]:
    """A plain GET of the object, read in pieces that are counted and dropped, ready to start."""
    import boto3

    client = boto3.client('s3', endpoint_url=endpoint)
    return lambda: sum(len(piece) for piece in
                       client.get_object(Bucket=bucket, Key=key)['Body'].iter_chunks(PIECE_BYTES))


READERS: dict[str, Callable[[str, str, str], Callable[[], int]]] = {
    STORE: store_reader, BOTO3: boto3_reader}


def timed_read(reader: str, endpoint: str, bucket: str, key: str) -> None:
    """Times one reader's transfer (its client already made); prints bytes and seconds as JSON."""
    read = READERS[reader](endpoint, bucket, key)
    started = time.perf_counter()
    n = read()
    print(json.dumps({'bytes': n, 'seconds': time.perf_counter() - started}))


# ---------------------------------------------------------------- the servers and objects

class Servers:
    """moto's S3 server with a counting proxy (no faults) in front, in this process."""

    def __init__(self):
        from tests.servers import S3_ENV, FaultProxy, MotoS3

        os.environ.update(S3_ENV)  # before anything starts, so that subprocesses inherit them
        self.moto = MotoS3()
        self.proxy = FaultProxy(self.moto.port, faults=False)
        self.moto.client().create_bucket(Bucket=BUCKET)

    def upload(self, path: str, key: str) -> None:
        """Uploads a file straight to moto (multipart above boto3's 8 MiB threshold)."""
        self.moto.client().upload_file(path, BUCKET, key)

    def stop(self) -> None:
        self.proxy.stop()
        self.moto.stop()


def input_file(workdir: str, label: str, size: int) -> str:
    """A generated text object of exactly `size` bytes, reused when already there."""
    path = os.path.join(workdir, f'text-{label}.txt')
    if not (os.path.exists(path) and os.path.getsize(path) == size):
        print(f'generating {path} ({size} bytes)', flush=True)
        write_text(path, size)
    return path


# ---------------------------------------------------------------- measuring

def ragbeam_command(key: str, output: str, endpoint: str, extra: Sequence[str]) -> list[str]:
    """The ragbeam run that reads s3://bench/KEY through `endpoint` into `output`."""
    ragbeam = str(Path(sys.executable).with_name('ragbeam'))
    return [ragbeam, 'run', '--input', f's3://{BUCKET}/{key}', '--output', output,
            '--embedder', 'hash', '--index-type', 'none', '--s3-endpoint-url', endpoint, *extra]


def measure_ragbeam(servers: Servers, label: str, size: int, key: str, workdir: str,
                    split: bool) -> Result:
    """One measured ragbeam run; its output is deleted after, its report.json read first."""
    reader = RAGBEAM_SPLIT if split else RAGBEAM
    output = os.path.join(workdir, f'out-{label}')
    shutil.rmtree(output, ignore_errors=True)
    extra = ['--split-bytes', SPLIT_BYTES] if split else []
    before = servers.proxy.bytes_served
    try:
        m = run_measured(ragbeam_command(key, output, servers.proxy.endpoint, extra), cwd=REPO)
        report = _read_json(os.path.join(output, 'report.json')) if m.returncode == 0 else {}
    finally:
        shutil.rmtree(output, ignore_errors=True)
    wire = servers.proxy.bytes_served - before
    if m.returncode != 0:
        print(f'{reader} on {label} exited with {m.returncode}:\n{m.output[-4000:]}', flush=True)
    return Result(label, size, reader, m.returncode, round(m.wall_seconds, 2),
                  round(m.wall_seconds, 2), round(size / MB / m.wall_seconds, 2),
                  round(m.peak_rss_mb, 1), wire, round(wire / size, 4),
                  report.get('chunks'), report.get('wall_seconds'))


def measure_reader(servers: Servers, reader: str, label: str, size: int, key: str) -> Result:
    """One measured run of the `store` or `boto3` sub-command through the proxy."""
    cmd = [sys.executable, '-m', 'bench.bench_s3', reader, '--endpoint', servers.proxy.endpoint,
           '--bucket', BUCKET, '--key', key]
    before = servers.proxy.bytes_served
    m = run_measured(cmd, cwd=REPO)
    counted = servers.proxy.bytes_served - before
    if m.returncode != 0:
        print(f'{reader} on {label} exited with {m.returncode}:\n{m.output[-4000:]}', flush=True)
        timing = {'bytes': 0, 'seconds': m.wall_seconds}
    else:
        timing = json.loads(m.output.strip().splitlines()[-1])
    wire, ratio = (size, None) if reader == BOTO3 else (counted, round(counted / size, 4))
    return Result(label, size, reader, m.returncode, round(m.wall_seconds, 2),
                  round(timing['seconds'], 3), round(size / MB / timing['seconds'], 2),
                  round(m.peak_rss_mb, 1), wire, ratio)


def _read_json(path: str) -> dict:
    """The JSON document in the file at `path`."""
    with open(path) as f:
        return json.load(f)


def measure_size(servers: Servers, label: str, workdir: str, split: bool) -> list[Result]:
    """Uploads one object, then reads it with every reader (and split ragbeam if asked)."""
    size = parse_size(label)
    key = f'text-{label}.txt'
    servers.upload(input_file(workdir, label, size), key)
    results = []
    for reader in [RAGBEAM] + ([RAGBEAM_SPLIT] if split else []) + [STORE, BOTO3]:
        if reader in READERS:
            r = measure_reader(servers, reader, label, size, key)
        else:
            r = measure_ragbeam(servers, label, size, key, workdir, split=reader == RAGBEAM_SPLIT)
        print(f'{label}: {r.reader}: {r.seconds:.2f} s, {r.mb_per_s:.2f} MB/s, '
              f'wire ratio {r.wire_ratio}, peak RSS {r.peak_rss_mb:.1f} MB', flush=True)
        results.append(r)
    return results


# ---------------------------------------------------------------- reporting

def summary(results: list[Result]) -> dict:
    """Per size: ragbeam's wire ratios against the limit, and its store-read share of wall time."""
    by = {(r.reader, r.size_label): r for r in results}
    out = {}
    for label in dict.fromkeys(r.size_label for r in results):
        ratios = {reader: by[(reader, label)].wire_ratio for reader in (RAGBEAM, RAGBEAM_SPLIT)
                  if (reader, label) in by}
        ours, store, plain = by[(RAGBEAM, label)], by[(STORE, label)], by[(BOTO3, label)]
        out[label] = {
            'wire_ratio': ratios,
            'wire_ratio_met': {k: v <= WIRE_RATIO_LIMIT for k, v in ratios.items()},
            'store_read_share_of_ragbeam_wall': round(store.seconds / ours.wall_seconds, 3),
            'ragbeam_over_boto3_mb_per_s': round(ours.mb_per_s / plain.mb_per_s, 3),
        }
    return {'per_size': out, 'wire_ratio_limit': WIRE_RATIO_LIMIT,
            'all_runs_ok': all(r.returncode == 0 for r in results)}


def print_table(results: list[Result], summ: dict) -> None:
    """Every run, then the wire-ratio targets and ragbeam's read share per size."""
    print(f"\n{'size':>7} {'reader':>20} {'seconds':>8} {'MB/s':>8} {'wire MB':>9} {'ratio':>7} "
          f"{'peak RSS MB':>11} {'chunks':>7} {'rc':>3}")
    for r in results:
        ratio = '-' if r.wire_ratio is None else f'{r.wire_ratio:.4f}'
        chunks = '-' if r.chunks is None else str(r.chunks)
        print(f'{r.size_label:>7} {r.reader:>20} {r.seconds:>8.2f} {r.mb_per_s:>8.2f} '
              f'{r.wire_bytes / MB:>9.2f} {ratio:>7} {r.peak_rss_mb:>11.1f} {chunks:>7} '
              f'{r.returncode:>3}')
    print()
    for label, s in summ['per_size'].items():
        met = ', '.join(f"{k} {v:.4f} ({'met' if s['wire_ratio_met'][k] else 'NOT met'})"
                        for k, v in s['wire_ratio'].items())
        print(f'{label}: wire ratio (target <= {WIRE_RATIO_LIMIT}): {met}; store reads take '
              f"{100 * s['store_read_share_of_ragbeam_wall']:.1f}% of ragbeam's wall time; "
              f"ragbeam/boto3 MB/s {s['ragbeam_over_boto3_mb_per_s']:.3f}")


def write_chart(results: list[Result], path: str) -> None:
    """MB/s per size (ragbeam, store reads, boto3) and ragbeam's wire ratio per run."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    labels = list(dict.fromkeys(r.size_label for r in results))
    by = {(r.reader, r.size_label): r for r in results}
    fig, (speed, wire) = plt.subplots(1, 2, figsize=(12, 4.5))
    readers = (RAGBEAM, STORE, BOTO3)
    width = 0.8 / len(readers)
    for i, reader in enumerate(readers):
        xs = [j + (i - (len(readers) - 1) / 2) * width for j in range(len(labels))]
        bars = speed.bar(xs, [by[(reader, l)].mb_per_s for l in labels], width,
                         label={STORE: 'ragbeam store reads only'}.get(reader, reader))
        speed.bar_label(bars, fmt='%.1f', fontsize=8)
    speed.set_xticks(range(len(labels)), labels)
    speed.set_xlabel('object size')
    speed.set_title('Throughput (MB/s; ragbeam: whole run)')
    speed.legend()
    ragbeam = [r for r in results if r.reader in (RAGBEAM, RAGBEAM_SPLIT)]
    bars = wire.bar(range(len(ragbeam)), [r.wire_ratio for r in ragbeam], 0.6,
                    color=['C0' if r.reader == RAGBEAM else 'C3' for r in ragbeam])
    wire.bar_label(bars, fmt='%.4f', fontsize=8)
    wire.set_xticks(range(len(ragbeam)), [r.size_label + ('' if r.reader == RAGBEAM else
                                                          f'\nsplit {SPLIT_BYTES}')
                                          for r in ragbeam])
    wire.axhline(WIRE_RATIO_LIMIT, color='grey', linestyle='--', linewidth=1,
                 label=f'target {WIRE_RATIO_LIMIT}')
    wire.set_ylim(0, max(WIRE_RATIO_LIMIT, *(r.wire_ratio for r in ragbeam)) * 1.15)
    wire.set_title('ragbeam bytes over the wire / object size')
    wire.legend(loc='upper left')
    save_figure(fig, path, 'S3 reads through moto and a counting proxy (hash embedder, FnApiRunner)')


# ---------------------------------------------------------------- command line

def bench(sizes: str, workdir: str, out: str) -> int:
    """Measures every reader at every size; 1 when any run failed."""
    os.makedirs(workdir, exist_ok=True)
    labels = [s.strip() for s in sizes.split(',') if s.strip()]
    largest = max(labels, key=parse_size)
    servers = Servers()
    try:
        results = []
        for label in labels:
            split = label == largest and parse_size(label) > parse_size(SPLIT_BYTES)
            results += measure_size(servers, label, workdir, split)
    finally:
        servers.stop()
    summ = summary(results)
    print_table(results, summ)
    save_report(out, 's3', results, summ, write_chart, mb=MB, piece_bytes=PIECE_BYTES,
                    moto=importlib.metadata.version('moto'))
    return 0 if summ['all_runs_ok'] else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bench.bench_s3', description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default='1MiB,32MiB,256MiB', help='comma-separated object sizes')
    p.add_argument('--workdir', default='/tmp/ragbeam-bench-s3',
                   help='where inputs are generated (and reused) and outputs go while a run lasts')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'),
                   help='folder for s3.json and s3.png')
    sub = p.add_subparsers(dest='command')
    for reader in READERS:
        one = sub.add_parser(reader, help=f'time the {reader} reader alone')
        one.add_argument('--endpoint', required=True)
        one.add_argument('--bucket', required=True)
        one.add_argument('--key', required=True)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    if args.command in READERS:
        timed_read(args.command, args.endpoint, args.bucket, args.key)
        return 0
    return bench(args.sizes, args.workdir, args.out)


if __name__ == '__main__':
    sys.exit(main())
