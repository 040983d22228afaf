"""Query serving: `ragbeam serve` over HTTP against the same searches in-process, at 100k and
1M chunks; and recall@10 on the hand-written questions with each embedder.

    .venv/bin/python -m bench.bench_serve [--sizes 100000,1000000] [--work /tmp/ragbeam-bench-serve]
                                          [--out bench/results] [--queries 300] [--warmup 20]
                                          [--clients 1,8,32] [--threads 1,8]
                                          [--questions ../shared/corpus/questions.tsv]
                                          [--no-quality] [--build-timeout 1200]

1. Corpora. For each size N, WORK/N/src holds about N x 1,000 bytes of generated English-like
   text (words drawn, as often as they occur, from four of the shared corpus's English texts,
   in sentences and paragraphs; numpy-seeded, in files of up to 32 MiB), and WORK/N/out the
   corpus `ragbeam run --embedder hash --index-type auto` (the lexical tantivy index is on by
   default) makes of it, a subprocess measured by bench.measure.run_measured (wall time,
   peak RSS). Both are reused when WORK/N/out.done says the build finished. A size whose
   build would pass --build-timeout (estimated from a smaller size built in the same run,
   linearly) is skipped; a build that passes it is killed.
2. Serving. `python -m ragbeam serve --output WORK/N/out --port FREE` (127.0.0.1) in a
   subprocess (it takes the embedder from the corpus's index), after the corpus's files are
   read once into the page cache (bench.measure.warm_cache). For each mode (hybrid, dense,
   lexical) and each number of clients (threads, one keep-alive http.client connection
   each), --warmup queries, then the --queries measured ones, GET /api/search?q=&k=10&mode=;
   queries per second (queries / wall time), p50 and p99 latency, and the server's RSS after
   the configuration. The server is stopped; then the same queries in-process through
   `ragbeam.open(out).search(q, k=10, mode=m)` from --threads threads.
   The queries are a fixed seeded list of 3-6 words drawn like the text's words.
3. Quality (skipped with --no-quality). The shared texts (../shared/corpus/text) built with
   `--embedder hash` and with `--embedder minilm` (WORK/quality-EMBEDDER, reused when done),
   and recall@10 per mode and question kind from ragbeam.evaluate on --questions.

Prints markdown tables (serve; recall@10) and the target (reported, never asserted): hybrid
p50 <= 50 ms and p99 <= 200 ms over HTTP at 1M chunks with 8 clients. Writes OUT/serve.json
and OUT/serve.png (latency and qps against clients, per mode and size, HTTP and in-process).
"""
from __future__ import annotations

import argparse
import gc
import http.client
import json
import random
import shutil
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import psutil

from bench.generate import vocabulary
from bench.measure import run_measured, save_report, warm_cache

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / 'shared' / 'corpus'
VOCABULARY = ['alice29-crlf.txt', 'rfc3986.txt', 'world192.txt', 'pep-0008.rst']
CHUNK_BYTES = 1000          # about what one default chunk adds (1 GiB of text: 1.07M chunks)
FILE_BYTES = 32 << 20
MODES = ('hybrid', 'dense', 'lexical')
K = 10
EMBEDDERS = ('hash', 'minilm')

# target (reported, not asserted)
TARGET_CHUNKS = 1_000_000
TARGET_CLIENTS = 8
TARGET_P50_MS = 50.0
TARGET_P99_MS = 200.0


@dataclass
class Build:
    """One corpus build: `ragbeam run` over the generated text (or the shared texts)."""
    name: str                 # the size, or quality-EMBEDDER
    embedder: str
    status: str               # ok, reused, timeout, failed or skipped
    chunks: int = 0
    text_mb: float = 0.0
    wall_seconds: float = float('nan')
    peak_rss_mb: float = float('nan')
    index: dict = field(default_factory=dict)   # index.json's type and lexical entry, briefly
    note: str = ''


@dataclass
class Serve:
    """One configuration: a transport (http or in-process), a mode and a number of clients."""
    size: int
    chunks: int
    transport: str
    mode: str
    clients: int
    queries: int
    errors: int
    wall_seconds: float
    qps: float
    p50_ms: float
    p99_ms: float
    mean_ms: float
    server_rss_mb: Optional[float] = None   # http: the server process after the configuration
    first_error: str = ''


@dataclass
class Recall:
    """recall@10 of one mode with one embedder, per question kind."""
    embedder: str
    mode: str
    questions: int
    recall: dict


# ---------------------------------------------------------------- text and corpora

def write_source(src: Path, chunks: int, words: list[str], seed: int) -> float:
    """About `chunks` x CHUNK_BYTES of sentences of `words` in files of up to FILE_BYTES;
    returns the MB written."""
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir(parents=True)
    total, n = chunks * CHUNK_BYTES, 0
    rng = np.random.default_rng(seed)
    get = words.__getitem__
    while total > 0:
        size = min(FILE_BYTES, total)
        written = 0
        with open(src / f'doc-{n:04d}.txt', 'w', encoding='utf-8') as f:
            while written < size:
                tokens = list(map(get, rng.integers(0, len(words), 100_000).tolist()))
                lengths = rng.integers(8, 25, len(tokens) // 8).tolist()
                breaks = rng.integers(2, 7, len(lengths)).tolist()
                parts, at, sentence_no, paragraph_left = [], 0, 0, breaks[0]
                for length in lengths:
                    if at + length > len(tokens):
                        break
                    sentence = ' '.join(tokens[at:at + length])
                    parts.append(sentence[:1].upper() + sentence[1:] + '.')
                    at += length
                    paragraph_left -= 1
                    if paragraph_left == 0:
                        parts.append('\n\n')
                        sentence_no += 1
                        paragraph_left = breaks[sentence_no % len(breaks)]
                    else:
                        parts.append(' ')
                block = ''.join(parts)[:size - written]
                f.write(block)
                written += len(block.encode('utf-8'))
        total -= size
        n += 1
    return sum(p.stat().st_size for p in src.iterdir()) / 2**20


def _index_brief(out: Path) -> dict:
    try:
        meta = json.loads((out / 'index' / 'index.json').read_text())
    except (OSError, ValueError):
        return {}
    lexical = meta.get('lexical') or {}
    return {k: meta.get(k) for k in ('type', 'index_type', 'count', 'model', 'table_version')
            if k in meta} | ({'lexical': {k: lexical.get(k) for k in ('library', 'count',
                                                                       'seconds')}}
                             if lexical else {})


def _chunks(out: Path) -> int:
    try:
        return int(json.loads((out / 'report.json').read_text()).get('chunks', 0))
    except (OSError, ValueError):
        return 0


def build(name: str, inputs: str, out: Path, embedder: str, timeout: int,
          text_mb: float = 0.0) -> Build:
    """`ragbeam run` into OUT unless OUT.done says it was built; killed after `timeout` s."""
    done = out.parent / (out.name + '.done')
    if done.exists():
        found = Build(name, embedder, 'reused', _chunks(out), text_mb, index=_index_brief(out),
                      **json.loads(done.read_text()))
        print(f'{name}: reused {out} ({found.chunks:,} chunks; built in '
              f'{found.wall_seconds:.0f} s)', flush=True)
        return found
    shutil.rmtree(out, ignore_errors=True)
    print(f'{name}: building {out} ({embedder}) ...', flush=True)
    cmd = ['timeout', str(timeout), sys.executable, '-m', 'ragbeam', 'run', '--input', inputs,
           '--output', str(out), '--embedder', embedder, '--index-type', 'auto']
    m = run_measured(cmd, cwd=str(REPO))
    if m.returncode:
        status = 'timeout' if m.returncode in (124, 137) else 'failed'
        print(f'{name}: build {status} (rc {m.returncode}) after {m.wall_seconds:.0f} s\n'
              f'{m.output[-2000:]}', flush=True)
        return Build(name, embedder, status, 0, text_mb, m.wall_seconds, m.peak_rss_mb)
    done.write_text(json.dumps({'wall_seconds': m.wall_seconds, 'peak_rss_mb': m.peak_rss_mb}))
    found = Build(name, embedder, 'ok', _chunks(out), text_mb, m.wall_seconds, m.peak_rss_mb,
                  _index_brief(out))
    print(f'{name}: built {found.chunks:,} chunks in {m.wall_seconds:.0f} s, peak RSS '
          f'{m.peak_rss_mb:.0f} MB, index {found.index}', flush=True)
    return found


# ---------------------------------------------------------------- load

def make_queries(words: list[str], count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [' '.join(rng.choice(words) for _ in range(rng.randint(3, 6))) for _ in range(count)]


def drive(new_client: Callable[[], Callable[[str], None]], queries: list[str],
          clients: int) -> tuple[float, list[float], int, str]:
    """Runs `queries` from `clients` threads, each with its own client taking the next query;
    (wall seconds, latencies in ms, errors, first error)."""
    lock, latencies, errors = threading.Lock(), [], []
    pending = iter(queries)
    ready = threading.Barrier(clients + 1)

    def worker():
        try:
            call = new_client()
        finally:
            ready.wait()
        mine = []
        while True:
            with lock:
                query = next(pending, None)
            if query is None:
                break
            started = time.perf_counter()
            try:
                call(query)
                mine.append(1000 * (time.perf_counter() - started))
            except Exception as e:  # counted and reported; the run goes on
                errors.append(f'{type(e).__name__}: {e}'[:300])
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(clients)]
    for t in threads:
        t.start()
    ready.wait()
    started = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - started, latencies, len(errors), errors[0] if errors else ''


def http_client(port: int, mode: str) -> Callable[[], Callable[[str], None]]:
    def new():
        conn = [http.client.HTTPConnection('127.0.0.1', port, timeout=300)]

        def call(query: str) -> None:
            path = '/api/search?' + urllib.parse.urlencode({'q': query, 'k': K, 'mode': mode})
            try:
                conn[0].request('GET', path)
                response = conn[0].getresponse()
                body = response.read()
            except (OSError, http.client.HTTPException):
                conn[0].close()  # a dropped keep-alive connection: reconnect once
                conn[0] = http.client.HTTPConnection('127.0.0.1', port, timeout=300)
                raise
            if response.status != 200:
                raise RuntimeError(f'HTTP {response.status}: {body[:200]!r}')
            if 'hits' not in json.loads(body):
                raise RuntimeError(f'no hits in {body[:200]!r}')
        return call
    return new


def in_process_client(corpus, mode: str) -> Callable[[], Callable[[str], None]]:
    return lambda: (lambda query: corpus.search(query, k=K, mode=mode))


def measure(size: int, chunks: int, transport: str, mode: str, clients: int,
            new_client, warmup: list[str], queries: list[str],
            server: Optional[psutil.Process] = None) -> Serve:
    drive(new_client, warmup, min(clients, len(warmup)))
    wall, times, errors, first = drive(new_client, queries, clients)
    rss = None
    if server is not None:
        rss = sum(p.memory_info().rss for p in [server] + server.children(recursive=True))
        rss = round(rss / 2**20, 1)
    row = Serve(size, chunks, transport, mode, clients, len(times), errors, round(wall, 2),
                round(len(times) / wall, 2) if wall else 0.0,
                *(round(float(np.percentile(times, p)), 2) if times else float('nan')
                  for p in (50, 99)),
                round(float(np.mean(times)), 2) if times else float('nan'), rss, first)
    print(f'  {transport:<10} {mode:<8} {clients:>2} clients: {row.qps:7.1f} q/s, p50 '
          f'{row.p50_ms:8.1f} ms, p99 {row.p99_ms:8.1f} ms'
          + (f', server RSS {rss:,.0f} MB' if rss is not None else '')
          + (f', {errors} errors ({first})' if errors else ''), flush=True)
    return row


def serve_size(size: int, out: Path, chunks: int, args, warmup: list[str],
               queries: list[str]) -> tuple[list[Serve], dict]:
    import ragbeam

    rows: list[Serve] = []
    files = [str(p) for p in out.rglob('*') if p.is_file()]
    started = time.time()
    warm_cache(*files)
    print(f'{size}: read {len(files)} files of the corpus into the page cache in '
          f'{time.time() - started:.0f} s', flush=True)
    from tests.servers import RagbeamServer

    server = RagbeamServer('--output', out, '--host', '127.0.0.1', log=out.parent / 'serve.log')
    info = {'start_seconds': round(server.start_seconds, 1),
            'idle_rss_mb': round(server.rss_mb(), 1), 'status_chunks': server.status.get('chunks'),
            'lexical': server.status.get('lexical')}
    print(f'{size}: server up on port {server.port} in {server.start_seconds:.1f} s, '
          f'RSS {info["idle_rss_mb"]:.0f} MB', flush=True)
    try:
        for mode in MODES:
            for clients in args.clients:
                rows.append(measure(size, chunks, 'http', mode, clients,
                                    http_client(server.port, mode), warmup, queries,
                                    server.process))
    finally:
        server.stop()
    started = time.time()
    corpus = ragbeam.open(str(out))
    info['open_seconds'] = round(time.time() - started, 1)
    for mode in MODES:
        for threads in args.threads:
            rows.append(measure(size, chunks, 'in-process', mode, threads,
                                in_process_client(corpus, mode), warmup, queries))
    del corpus
    gc.collect()
    return rows, info


# ---------------------------------------------------------------- quality

def quality(work: Path, questions_path: str, timeout: int) -> tuple[list[Build], list[Recall]]:
    import ragbeam
    from ragbeam.evaluate import evaluate, read_questions

    questions = read_questions(questions_path)
    builds, recalls = [], []
    for embedder in EMBEDDERS:
        out = work / f'quality-{embedder}'
        found = build(f'quality-{embedder}', str(SHARED / 'text'), out, embedder, timeout)
        builds.append(found)
        if found.status not in ('ok', 'reused'):
            continue
        corpus = ragbeam.open(str(out))
        result = evaluate(corpus, questions, K, MODES)
        for mode in MODES:
            recalls.append(Recall(embedder, mode, result['questions'], result['recall'][mode]))
        print(f'recall@{K} with {embedder}: {result["recall"]}', flush=True)
        del corpus
        gc.collect()
    return builds, recalls


# ---------------------------------------------------------------- report

def serve_table(rows: list[Serve]) -> str:
    lines = ['| size | transport | mode | clients | qps | p50 ms | p99 ms | server RSS MB |',
             '|---:|---|---|---:|---:|---:|---:|---:|']
    for r in rows:
        rss = f'{r.server_rss_mb:,.0f}' if r.server_rss_mb is not None else ''
        errors = f' ({r.errors} errors)' if r.errors else ''
        lines.append(f'| {r.size:,} | {r.transport} | {r.mode} | {r.clients} | {r.qps:,.1f}'
                     f'{errors} | {r.p50_ms:,.1f} | {r.p99_ms:,.1f} | {rss} |')
    return '\n'.join(lines)


def recall_table(recalls: list[Recall]) -> str:
    lines = ['| embedder | mode | paraphrase | keyword | all |', '|---|---|---:|---:|---:|']
    for r in recalls:
        cells = ' | '.join(f'{r.recall.get(kind):.3f}' if r.recall.get(kind) is not None
                           else '' for kind in ('paraphrase', 'keyword', 'all'))
        lines.append(f'| {r.embedder} | {r.mode} | {cells} |')
    return '\n'.join(lines)


def target(rows: list[Serve]) -> dict:
    row = next((r for r in rows if r.transport == 'http' and r.mode == 'hybrid'
                and r.clients == TARGET_CLIENTS and r.size == TARGET_CHUNKS), None)
    if row is None:
        return {'measured': False, 'met': None,
                'text': f'hybrid at {TARGET_CHUNKS:,} chunks with {TARGET_CLIENTS} clients: '
                        'not measured'}
    met = row.errors == 0 and row.p50_ms <= TARGET_P50_MS and row.p99_ms <= TARGET_P99_MS
    return {'measured': True, 'met': met, 'p50_ms': row.p50_ms, 'p99_ms': row.p99_ms,
            'qps': row.qps, 'chunks': row.chunks,
            'text': f'hybrid p50 <= {TARGET_P50_MS:.0f} ms and p99 <= {TARGET_P99_MS:.0f} ms '
                    f'over HTTP at {TARGET_CHUNKS:,} chunks ({row.chunks:,} built) with '
                    f'{TARGET_CLIENTS} clients: {"met" if met else "NOT met"} (p50 '
                    f'{row.p50_ms:,.1f} ms, p99 {row.p99_ms:,.1f} ms, {row.qps:,.1f} q/s'
                    + (f', {row.errors} errors' if row.errors else '') + ')'}


def _chart(runs: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    rows = [r for r in runs if isinstance(r, Serve)]
    recalls = [r for r in runs if isinstance(r, Recall)]
    sizes = sorted({r.size for r in rows})
    nrows = max(1, len(sizes)) + (1 if recalls else 0)
    fig, axes = plt.subplots(nrows, 3, figsize=(16, 4 * nrows), squeeze=False)
    colours = {'hybrid': 'tab:blue', 'dense': 'tab:orange', 'lexical': 'tab:green'}
    styles = {'http': '-', 'in-process': '--'}
    for i, size in enumerate(sizes):
        for j, (metric, title) in enumerate((('p50_ms', 'p50 ms'), ('p99_ms', 'p99 ms'),
                                             ('qps', 'queries/s'))):
            ax = axes[i][j]
            for mode in MODES:
                for transport in ('http', 'in-process'):
                    line = sorted((r.clients, getattr(r, metric)) for r in rows
                                  if r.size == size and r.mode == mode
                                  and r.transport == transport)
                    if line:
                        ax.plot(*zip(*line), styles[transport], marker='o',
                                color=colours[mode], label=f'{mode} {transport}')
            if metric != 'qps':
                ax.set_yscale('log')
                ax.axhline(TARGET_P50_MS if metric == 'p50_ms' else TARGET_P99_MS,
                           color='grey', linestyle=':', label='target (hybrid, 1M, 8 clients)')
            ax.set_xscale('log', base=2)
            ax.set_xlabel('concurrent clients')
            ax.set_title(f'{size:,} chunks: {title}')
            ax.legend(fontsize=6)
    if recalls:
        kinds = ('paraphrase', 'keyword', 'all')
        groups = list(dict.fromkeys((r.embedder, r.mode) for r in recalls))
        ax = axes[-1][0]
        for j, kind in enumerate(kinds):
            ax.bar(np.arange(len(groups)) + j * 0.27,
                   [next((r.recall.get(kind) or 0 for r in recalls
                          if (r.embedder, r.mode) == g), 0) for g in groups], 0.27, label=kind)
        ax.set_xticks(np.arange(len(groups)) + 0.27, [f'{e}\n{m}' for e, m in groups],
                      fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_title(f'recall@{K} on the questions')
        ax.legend(fontsize=7)
        for ax in axes[-1][1:]:
            ax.axis('off')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--sizes', default='100000,1000000')
    parser.add_argument('--work', default='/tmp/ragbeam-bench-serve')
    parser.add_argument('--out', default=str(REPO / 'bench' / 'results'))
    parser.add_argument('--name', default='serve')
    parser.add_argument('--queries', type=int, default=300)
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--clients', default='1,8,32')
    parser.add_argument('--threads', default='1,8')
    parser.add_argument('--questions', default=str(SHARED / 'questions.tsv'))
    parser.add_argument('--no-quality', action='store_true')
    parser.add_argument('--build-timeout', type=int, default=1200,
                        help='seconds one corpus build may take (default: 1200)')
    args = parser.parse_args(argv)
    args.clients = [int(c) for c in args.clients.split(',')]
    args.threads = [int(t) for t in args.threads.split(',')]
    sizes = [int(s) for s in args.sizes.split(',')]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()

    words = vocabulary([SHARED / 'text' / name for name in VOCABULARY])
    every = make_queries(words, args.warmup + args.queries)
    warmup, queries = every[:args.warmup], every[args.warmup:]
    print(f'{len(words):,} word occurrences ({len(set(words)):,} distinct); '
          f'{len(every)} queries, e.g. {queries[:3]}', flush=True)

    builds: list[Build] = []
    rows: list[Serve] = []
    servers: dict = {}
    per_chunk: Optional[float] = None   # build seconds per chunk, from a size built here
    for size in sorted(sizes):
        folder, out = work / str(size), work / str(size) / 'out'
        if not (folder / 'out.done').exists():
            if per_chunk is not None and per_chunk * size > args.build_timeout:
                note = (f'estimated {per_chunk * size:.0f} s from the smaller build, over '
                        f'--build-timeout {args.build_timeout} s')
                print(f'{size}: skipped ({note})', flush=True)
                builds.append(Build(str(size), 'hash', 'skipped', note=note))
                continue
            started = time.time()
            mb = write_source(folder / 'src', size, words, seed=size)
            print(f'{size}: generated {mb:,.0f} MB of text in {time.time() - started:.0f} s',
                  flush=True)
        else:
            mb = sum(p.stat().st_size for p in (folder / 'src').iterdir()) / 2**20 \
                if (folder / 'src').exists() else 0.0
        found = build(str(size), str(folder / 'src'), out, 'hash', args.build_timeout, mb)
        builds.append(found)
        if found.status == 'ok' and found.chunks:
            per_chunk = found.wall_seconds / found.chunks
        if found.status not in ('ok', 'reused'):
            continue
        try:
            made, info = serve_size(size, out, found.chunks, args, warmup, queries)
        except Exception as e:  # reported; the other sizes and the quality part go on
            print(f'{size}: serving failed: {type(e).__name__}: {e}', flush=True)
            servers[str(size)] = {'error': f'{type(e).__name__}: {e}'[:2000]}
            continue
        rows += made
        servers[str(size)] = info

    recalls: list[Recall] = []
    if not args.no_quality:
        try:
            quality_builds, recalls = quality(work, args.questions, args.build_timeout)
            builds += quality_builds
        except Exception as e:  # reported; the serving numbers are still written
            print(f'quality failed: {type(e).__name__}: {e}', flush=True)
            servers['quality_error'] = f'{type(e).__name__}: {e}'[:2000]

    verdict = target(rows)
    summary = {
        'target': verdict,
        'builds': {b.name: {'status': b.status, 'chunks': b.chunks,
                            'wall_seconds': round(b.wall_seconds, 1),
                            'peak_rss_mb': round(b.peak_rss_mb, 1), 'note': b.note}
                   for b in builds},
        'servers': servers,
        'recall_at_10': {f'{r.embedder} {r.mode}': r.recall for r in recalls},
        'wall_seconds': round(time.time() - began, 1),
    }
    print('\n## builds\n')
    print('| corpus | embedder | status | chunks | text MB | wall s | peak RSS MB |')
    print('|---|---|---|---:|---:|---:|---:|')
    for b in builds:
        print(f'| {b.name} | {b.embedder} | {b.status} | {b.chunks:,} | {b.text_mb:,.0f} | '
              f'{b.wall_seconds:,.0f} | {b.peak_rss_mb:,.0f} |')
    print('\n## serve (k=10)\n')
    print(serve_table(rows))
    if recalls:
        print(f'\n## recall@{K}\n')
        print(recall_table(recalls))
    print(f'\ntarget: {verdict["text"]}')
    print(f'wall time: {time.time() - began:.0f} s')
    save_report(args.out, args.name, builds + rows + recalls, summary, _chart,
                sizes=args.sizes, queries=args.queries, warmup=args.warmup,
                clients=args.clients, threads=args.threads, k=K, chunk_bytes=CHUNK_BYTES,
                file_bytes=FILE_BYTES, queries_sample=queries[:10])


if __name__ == '__main__':
    main()
