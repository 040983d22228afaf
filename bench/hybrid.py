"""bench_index's hybrid part: the lexical index's build (tantivy against bm25s) and query
latency at 100k and 1M chunks, and known-item recall@10 of the three query modes.

Run through `python -m bench.bench_index --part hybrid`; see that module's docstring.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bench.generate import real_paragraph, vocabulary
from bench.known_item import chunk_rows, probes, recall_at_10
from bench.measure import run_measured, save_report

REPO = Path(__file__).resolve().parent.parent
SHARED_TEXT = REPO.parent / 'shared' / 'corpus' / 'text'
VOCABULARY = ['alice29-crlf.txt', 'rfc3986.txt', 'world192.txt', 'pep-0008.rst']
OBJECT_BYTES = 4 << 20
CHUNK_BYTES = 1000               # about what one default chunk holds
LATENCY_QUERIES = 100
RSS_TARGET_MB = 1536
BM25S_MAX_CHUNKS = 100_000       # measured 2.6 GB there and linear in chunks: 1M would not fit
P50_TARGET_MS = 50

# the lexical build of one library, in a measured subprocess: prints its JSON line last
_BUILD = '''
import json, sys, time
out, library = sys.argv[1], sys.argv[2]
started = time.time()
if library == "tantivy":
    from transforms.index import lexical
    from transforms.store import StoreConfig
    entry = lexical.build(out, 0, StoreConfig(), None, 0.0)
    print(json.dumps({"seconds": time.time() - started, "entry": entry}))
else:
    import bm25s, numpy as np
    from transforms import outputs
    from transforms.index.tokens import terms
    table = outputs.ParquetFolder(out + "/chunks").table(["text"])
    vocab, corpus = {}, []
    for batch in table.to_batches(16384):
        for text in batch.column("text").to_pylist():
            corpus.append([vocab.setdefault(t, len(vocab)) for t in terms(text)])
    del table
    model = bm25s.BM25()
    model.index(bm25s.tokenization.Tokenized(ids=corpus, vocab=vocab), show_progress=False)
    seconds = time.time() - started
    del corpus
    import random
    rng = random.Random(1)
    words = list(vocab)
    times = []
    for _ in range(50):
        query = [[vocab[w] for w in rng.sample(words, 12)]]
        t = time.perf_counter()
        model.retrieve(bm25s.tokenization.Tokenized(ids=query, vocab=vocab), k=100,
                       show_progress=False, n_threads=1)
        times.append(1000 * (time.perf_counter() - t))
    print(json.dumps({"seconds": seconds, "p50_ms": float(np.percentile(times, 50)),
                      "p95_ms": float(np.percentile(times, 95))}))
'''


@dataclass
class Build:
    """One library's lexical build over one corpus size."""
    library: str
    chunks: int
    status: str
    build_seconds: float
    peak_rss_mb: float
    peak_anon_mb: float = float('nan')   # less file-backed pages (the mapped segments)
    index_mb: float = float('nan')
    lexical_p50_ms: float = float('nan')
    lexical_p95_ms: float = float('nan')
    entry: dict = field(default_factory=dict)   # tantivy's index.json entry


@dataclass
class Latency:
    """In-process query latency of each mode over one corpus size (ranked ids; and with
    the rows of the top 10 read back, as `ragbeam query` does)."""
    chunks: int
    p50_ms: dict = field(default_factory=dict)
    p95_ms: dict = field(default_factory=dict)


@dataclass
class Recall:
    """Known-item recall@10 of one query mode, on one corpus, with one embedder."""
    corpus: str
    model: str
    mode: str
    recall_at_10: float


def prepare(folder: Path, chunks: int, words: list[str]) -> Path:
    """Text objects of about `chunks` chunks of real words, under FOLDER/src."""
    src = folder / 'src'
    shutil.rmtree(folder, ignore_errors=True)
    src.mkdir(parents=True)
    rng = random.Random(chunks)
    total, n = chunks * CHUNK_BYTES, 0
    while total > 0:
        size = min(OBJECT_BYTES, total)
        with open(src / f'doc-{n:05d}.txt', 'w', encoding='utf-8') as f:
            written = 0
            while written < size:
                block = real_paragraph(rng, words)
                f.write(block)
                written += len(block)
        total -= size
        n += 1
    return src


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob('*') if f.is_file()) / 2**20


def build(out: Path, library: str, timeout: int) -> Build:
    cmd = ['timeout', str(timeout), sys.executable, '-c', _BUILD, str(out), library]
    m = run_measured(cmd, cwd=str(REPO), env=dict(os.environ, PYTHONPATH=str(REPO)))
    chunks = _count(out)
    if m.returncode:
        status = 'timeout' if m.returncode in (124, 137) else 'failed'
        print(f'{library} at {chunks}: {status}\n{m.output[-1500:]}', flush=True)
        return Build(library, chunks, status, m.wall_seconds, m.peak_rss_mb)
    found = json.loads(m.output.strip().splitlines()[-1])
    result = Build(library, chunks, 'ok', found['seconds'], m.peak_rss_mb, m.peak_anon_mb,
                   lexical_p50_ms=found.get('p50_ms', float('nan')),
                   lexical_p95_ms=found.get('p95_ms', float('nan')),
                   entry=found.get('entry', {}))
    if library == 'tantivy':
        result.index_mb = _dir_mb(out / 'index' / 'lexical')
    print(f'{library} at {chunks}: {result}', flush=True)
    return result


def _count(out: Path) -> int:
    return len(chunk_rows(out, ['id64'])) if (out / 'chunks').exists() else 0


def latency(out: Path, entry: dict) -> Latency:
    """p50/p95 of LATENCY_QUERIES 12-word spans per mode, after a warm-up query, with the
    lexical index whose index.json `entry` is given (the run built none)."""
    from transforms.embed import HashEmbedder
    from transforms.index.search import FUSED_DEPTH, Retriever, fuse

    retriever = Retriever(str(out))
    retriever.meta = dict(retriever.meta, lexical=entry)
    found = probes(str(out), LATENCY_QUERIES)
    vectors = HashEmbedder().embed_queries([p.text for p in found])
    result = Latency(_count(out))
    for mode in ('dense', 'lexical', 'hybrid'):
        for rows in (False, True):
            def one(probe, vector):
                if rows:
                    return retriever.search(10, vector, probe.text, mode)
                depth = FUSED_DEPTH if mode == 'hybrid' else 10
                return fuse(retriever.ranked(depth, vector, probe.text, mode))[:10]
            one(found[0], vectors[0])
            times = []
            for probe, vector in zip(found, vectors):
                started = time.perf_counter()
                one(probe, vector)
                times.append(1000 * (time.perf_counter() - started))
            name = mode + (' +rows' if rows else '')
            result.p50_ms[name] = round(float(np.percentile(times, 50)), 2)
            result.p95_ms[name] = round(float(np.percentile(times, 95)), 2)
    print(f'latency at {result.chunks}: p50 {result.p50_ms} p95 {result.p95_ms}', flush=True)
    return result


def known_items(work: Path, models: list[str]) -> dict:
    """recall@10 of 200 probes per mode on the shared text corpus, per embedder."""
    from transforms.embed import load_embedder

    found = {}
    for model in models:
        out = work / f'dev-{model}'
        shutil.rmtree(out, ignore_errors=True)
        run = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(SHARED_TEXT),
                            '--output', str(out), '--embedder', model], cwd=str(REPO))
        if run.returncode:
            print(f'dev corpus with {model}: failed\n{run.output[-1500:]}')
            continue
        embedder = load_embedder(model)
        sample = probes(str(out), 200)
        found[model] = {name: round(recall_at_10(str(out), embedder, mode, sample, fusion), 3)
                        for name, mode, fusion in (('dense', 'dense', 'convex'),
                                                   ('lexical', 'lexical', 'convex'),
                                                   ('hybrid', 'hybrid', 'convex'),
                                                   ('hybrid rrf', 'hybrid', 'rrf'))}
        print(f'known-item recall@10 on the dev texts, {model}: {found[model]}', flush=True)
    return found


def pivots(out: Path, values=(0, 32, 128, 512)) -> dict:
    """Per pivot of the hash embedder (0: none, the weighting before hash-ngram-v3), over the
    same 200 probes in an exact index of its chunk vectors: dense recall@10, and how many
    chunks of few distinct tokens (the adversarial corpus's genome objects) intrude in each
    top 10 of a prose or boilerplate probe."""
    import faiss
    from transforms.embedder import HashEmbedder

    table = chunk_rows(out, ['chunk_id', 'uri', 'text'])
    kind = {r['chunk_id']: r['uri'].rsplit('/', 1)[-1].split('-')[0] for r in table}
    sample = probes(str(out), 200)
    wordy = [p for p in sample if kind[p.chunk_id] in ('prose', 'boilerplate')]
    found = {}
    for pivot in values:
        model = HashEmbedder(pivot=pivot)
        index = faiss.IndexFlatIP(model.dim)
        index.add(model.embed([r['text'] for r in table]))
        _, rows = index.search(model.embed_queries([p.text for p in sample]), 10)
        found[pivot] = {'recall_at_10': round(float(np.mean([
            p.chunk_id in {table[r]['chunk_id'] for r in row} for p, row in zip(sample, rows)])),
            3)}
        if wordy:
            _, rows = index.search(model.embed_queries([p.text for p in wordy]), 10)
            found[pivot]['genome_chunks_per_top_10'] = round(float(np.mean([
                sum(kind[table[r]['chunk_id']] == 'genome' for r in row) for row in rows])), 3)
    print(f'hash pivots on {out.name}: {found}', flush=True)
    return found


def adversarial(work: Path, words: list[str]) -> dict:
    """The three modes' recall@10 on the corpus built to defeat hashing, and the pivots."""
    from bench.generate import write_hash_adversarial
    from transforms.embedder import HashEmbedder

    src, out = work / 'adversarial-src', work / 'adversarial'
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    write_hash_adversarial(str(src), words)
    run = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(src),
                        '--output', str(out), '--embedder', 'hash'], cwd=str(REPO))
    if run.returncode:
        print(run.output[-1500:])
        return {}
    sample = probes(str(out), 200)
    found = {mode: round(recall_at_10(str(out), HashEmbedder(), mode, sample, fusion), 3)
             for mode, fusion in (('dense', 'convex'), ('lexical', 'convex'),
                                  ('hybrid', 'convex'))}
    found['hybrid rrf'] = round(recall_at_10(str(out), HashEmbedder(), 'hybrid', sample, 'rrf'),
                                3)
    print(f'known-item recall@10 on the adversarial corpus: {found}', flush=True)
    return {'modes': found, 'dense_by_pivot': pivots(out)}


def main(args) -> None:
    work = Path(args.work) / 'hybrid'
    words = vocabulary([SHARED_TEXT / name for name in VOCABULARY])
    builds, latencies = [], []
    for n in [int(s) for s in args.sizes.split(',')]:
        folder = work / str(n)
        src = prepare(folder, n, words)
        out = folder / 'out'
        run = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(src),
                            '--output', str(out), '--embedder', 'hash', '--index-type', 'ivfpq',
                            '--lexical-index', 'none'], cwd=str(REPO))
        print(f'{n}: pipeline {run.wall_seconds:.0f} s, rc {run.returncode}', flush=True)
        if run.returncode:
            print(run.output[-2000:])
            continue
        builds.append(build(out, 'tantivy', args.timeout))
        if builds[-1].status == 'ok':
            latencies.append(latency(out, builds[-1].entry))
        if n <= BM25S_MAX_CHUNKS:
            builds.append(build(out, 'bm25s', args.timeout))
        else:
            print(f'bm25s at {n}: not run (over {BM25S_MAX_CHUNKS:,} chunks its in-memory '
                  'index does not fit this machine)', flush=True)
        if not args.keep:
            shutil.rmtree(src, ignore_errors=True)
    recall = known_items(work, args.models.split(','))
    hash_pivots = pivots(work / 'dev-hash') if (work / 'dev-hash').exists() else {}
    against_hashing = adversarial(work, words)
    big = [b for b in builds if b.library == 'tantivy' and b.status == 'ok']
    summary = {
        'lexical_build_peak_rss_mb': {str(b.chunks): round(b.peak_rss_mb, 1) for b in big},
        'rss_target_met': bool(big) and max(b.peak_rss_mb for b in big) <= RSS_TARGET_MB,
        'hybrid_p50_ms': {str(x.chunks): x.p50_ms.get('hybrid') for x in latencies},
        'hybrid_p50_target_met': bool(latencies) and all(
            x.p50_ms.get('hybrid', 1e9) <= P50_TARGET_MS for x in latencies),
        'known_item_recall_at_10': recall,
        'hash_dense_recall_by_pivot': hash_pivots,
        'adversarial': against_hashing,
    }
    for key, value in summary.items():
        print(f'{key}: {value}')
    recalls = [Recall('dev texts', model, mode, value) for model, modes in recall.items()
               for mode, value in modes.items()]
    recalls += [Recall('built to defeat hashing', 'hash', mode, value)
                for mode, value in (against_hashing.get('modes') or {}).items()]
    save_report(args.out, f'{args.name}-hybrid', builds + latencies + recalls, summary, _chart,
                sizes=args.sizes, object_bytes=OBJECT_BYTES, latency_queries=LATENCY_QUERIES)


def _chart(rows: list, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    builds = [vars(r) for r in rows if isinstance(r, Build)]
    latencies = [vars(r) for r in rows if isinstance(r, Latency)]
    recalls = [r for r in rows if isinstance(r, Recall)]
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for ax, metric, title in ((axes[0], 'build_seconds', 'lexical build s'),
                              (axes[1], 'peak_rss_mb', 'lexical build peak RSS MB')):
        libraries = sorted({b['library'] for b in builds})
        sizes = sorted({b['chunks'] for b in builds})
        for j, library in enumerate(libraries):
            values = [next((b[metric] for b in builds if b['library'] == library
                            and b['chunks'] == n and b['status'] == 'ok'), 0) for n in sizes]
            ax.bar(np.arange(len(sizes)) + j * 0.4, values, 0.4, label=library)
        ax.set_xticks(np.arange(len(sizes)) + 0.2, [f'{n:,}' for n in sizes])
        if metric == 'peak_rss_mb':
            ax.axhline(RSS_TARGET_MB, color='grey', linestyle='--', label='target')
        ax.set_title(title)
        ax.legend(fontsize=7)
    modes = ['dense', 'lexical', 'hybrid']
    for j, x in enumerate(latencies):
        axes[2].bar(np.arange(3) + j * 0.4, [x['p50_ms'].get(m, 0) for m in modes], 0.4,
                    label=f"{x['chunks']:,} chunks")
    axes[2].axhline(P50_TARGET_MS, color='grey', linestyle='--', label='target (hybrid)')
    axes[2].set_xticks(np.arange(3) + 0.2, modes)
    axes[2].set_title('query p50 ms (ids, in-process)')
    axes[2].legend(fontsize=7)
    groups = list(dict.fromkeys((r.corpus, r.model) for r in recalls))
    names = list(dict.fromkeys(r.mode for r in recalls))
    width = 0.8 / max(1, len(names))
    for j, mode in enumerate(names):
        axes[3].bar(np.arange(len(groups)) + j * width,
                    [next((r.recall_at_10 for r in recalls if (r.corpus, r.model) == g
                           and r.mode == mode), 0) for g in groups], width, label=mode)
    axes[3].set_xticks(np.arange(len(groups)) + width * (len(names) - 1) / 2,
                       [f'{c}\n{m}' for c, m in groups], fontsize=8)
    axes[3].set_ylim(0.4, 1.1)
    axes[3].set_title('known-item recall@10 (200 probes)')
    axes[3].legend(fontsize=7, ncol=4, loc='upper center')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
