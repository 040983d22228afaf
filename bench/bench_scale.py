"""Buckets of many small objects: ragbeam's first, unchanged and incremental runs at 10k, 100k
and 1M objects of about 650 bytes, against LlamaIndex's incremental ingestion.

    .venv/bin/python -m bench.bench_scale [--sizes 10000,100000,1000000] [--steps STEPS]
                                          [--workdir /tmp/ragbeam-bench-scale] [--out DIR]
                                          [--s3] [--s3-objects S3_OBJECTS] [--no-llama]
                                          [--llama-python PATH]

For each N a bucket of N generated text objects (bench.generate.write_small_objects, 100 to
a folder) is made once under WORKDIR and reused. Each step runs on a copy of it (the
generated bucket stays as it was) as `ragbeam run --embedder hash --index-type none
--lexical-index none` into one output, a subprocess measured by bench.measure.run_measured:
wall time, peak RSS of the process tree and of each process, and what its report.json says.

1. `first`: the first run, into an empty output. Then the size of the pipeline's graph
   (`pipeline.build.graph_bytes` of what `prepare` builds against the N committed objects),
   in a subprocess (the hidden sub-command `_graph`);
2. `unchanged`: the same again: nothing to read or commit;
3. `clustered`: 1 % of the objects rewritten, consecutive ones (one stretch of the key space);
4. `scattered`: another 1 % rewritten, spread at random over the whole bucket;
5. `deleted`: 0.1 % of the objects deleted, at random.

STEPS (`--steps`, comma-separated) picks some of them; `first` always runs, as the others
need a committed corpus.

The LlamaIndex peer, for N up to 100,000 (it keeps its whole docstore in memory and in one
JSON file): its documented incremental pattern, an IngestionPipeline with a docstore, over
SimpleDirectoryReader's documents, persisted between runs (the hidden sub-command `_llama`),
on its own copy of the bucket, for the steps first, unchanged and clustered (the same edit).
llama-index-readers-file pins pypdf < 7 (ragbeam pins 7.1.1) and nltk's joblib wants
cloudpickle >= 3 (Beam pins 2.2), so the peer lives in a venv of its own (--llama-python,
default /tmp/llamavenv/bin/python when this Python cannot import the file readers).

`--s3`: the same steps on S3_OBJECTS objects (default 100,000) in moto's S3 server, run inside this process
(tests.servers.MotoS3), uploaded by 16 threads; the runs read `s3://bench/src/` through
`--s3-endpoint-url` and write a local output; edits and deletes are PUTs and DELETEs.

Prints a markdown table and the targets (met or NOT met; never asserted), and writes
OUT/scale.json and OUT/scale.png (peak RSS and wall time against N, a line per step).

    .venv/bin/python -m bench.bench_scale _graph RAGBEAM_RUN_ARGS...
    PYTHON -m bench.bench_scale _llama SRC PERSIST_DIR

print the graph's bytes, and run the peer once (its counts as JSON on the last line).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

# Only the standard library and bench.generate at the top: the `_llama` sub-command runs
# under a Python that has llama_index but neither Beam nor psutil, which bench.measure and
# ragbeam's own modules import. They are imported where they are used.
from bench.generate import (delete_small_objects, edit_small_objects, pick, small_object_name,
                            small_object_text, write_small_objects)

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20
PER_FOLDER = 100
OBJECT_BYTES = 650
BUCKET = 'bench'
PREFIX = 'src/'
UPLOAD_THREADS = 16

RAGBEAM = 'ragbeam'
RAGBEAM_S3 = 'ragbeam s3'
LLAMA = 'llamaindex'

# step key -> the label its rows carry
STEPS = {'first': 'first', 'unchanged': 'unchanged', 'clustered': 'changed 1% clustered',
         'scattered': 'changed 1% scattered', 'deleted': 'deleted 0.1%'}
LLAMA_STEPS = ('first', 'unchanged', 'clustered')
PEER_MAX_OBJECTS = 100_000
DEFAULT_LLAMA_PYTHON = '/tmp/llamavenv/bin/python'
# SentenceSplitter counts tokens: about ragbeam's 1,000 bytes and 100 bytes of overlap
LLAMA_CHUNK_TOKENS = 256
LLAMA_OVERLAP_TOKENS = 25
HASH_DIM = 384

# Targets (reported, not asserted)
LARGE = 1_000_000
PEER_AT = 100_000
SMALL_GRAPH_AT = 10_000
PROCESS_LIMIT_MB = 512.0
UNCHANGED_WALL_LIMIT_S = 60.0
CLUSTERED_OVER_FIRST = 0.1
OVER_LLAMA = 0.5
FIRST_TREE_LIMIT_MB = 1024.0
FIRST_OBJECTS_PER_S = 4000.0
GRAPH_LIMIT_BYTES = MB
GRAPH_GROWTH_BYTES = 4 << 10  # "within a few KB" of the graph at 10k
WRITE_AMPLIFICATION_LIMIT = 3.0
FLAT_KB_PER_OBJECT = 0.05  # memory is flat in N when an object adds at most this (50 MB a
#                            million objects)
PROJECTED = 10_000_000  # the bucket size the per-object figures are extrapolated to


@dataclass
class Step:
    """One measured run of one step on one bucket, by ragbeam or the LlamaIndex peer."""
    tool: str
    objects: int  # N, the objects generated
    step: str  # a STEPS key
    returncode: int
    wall_seconds: float
    peak_rss_mb: float  # the whole process tree
    largest_process_mb: float
    objects_listed: int = 0
    objects_per_s: float = 0.0  # listed / wall
    process_rss_mb: dict = field(default_factory=dict)  # the peak of each process
    run: dict = field(default_factory=dict)  # report.json's `run` (the peer: its own counts)
    report_wall_seconds: Optional[float] = None
    report_peak_rss_mb: Optional[float] = None
    commit_seconds: Optional[float] = None
    commit_bytes_added: Optional[int] = None
    commit_bytes_rewritten: Optional[int] = None
    write_amplification: Optional[float] = None
    wall_over_first: Optional[float] = None
    graph_bytes: Optional[int] = None  # on the `first` row: the graph against N committed

    @property
    def label(self) -> str:
        return STEPS[self.step]


@dataclass
class Target:
    """One target: what was measured, and whether it is met (None: not measured here)."""
    name: str
    value: str
    met: Optional[bool]


# ---------------------------------------------------------------- buckets

def generated_bucket(workdir: Path, n: int) -> Path:
    """The N generated objects, made once: a marker beside the folder (not in it, where a run
    would list it) says the folder is whole."""
    folder, marker = workdir / f'generated-{n}', workdir / f'generated-{n}.done'
    if not marker.exists():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.time()
        print(f'generating {n:,} objects in {folder}', flush=True)
        write_small_objects(folder, n, PER_FOLDER, OBJECT_BYTES)
        marker.write_text(f'{n}\n')
        print(f'generated {n:,} objects in {time.time() - started:.0f} s', flush=True)
    return folder


def copy_bucket(source: Path, target: Path) -> Path:
    """A copy to change and run on; `cp -r` (it copies 1M small files much faster than
    shutil.copytree)."""
    shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(['cp', '-r', str(source), str(target)], check=True)
    return target


class LocalBucket:
    """A folder the runs read, changed in place."""

    def __init__(self, root: Path):
        self.root = root
        self.input = str(root)
        self.run_args: list[str] = []

    def edit(self, which: list[int], edit: int) -> None:
        edit_small_objects(self.root, which, edit, PER_FOLDER, OBJECT_BYTES)

    def delete(self, which: list[int]) -> None:
        delete_small_objects(self.root, which, PER_FOLDER)


class S3Bucket:
    """s3://bench/src/ on moto's server in this process, filled from a generated folder;
    changed with PUTs and DELETEs, as a bucket's writers change it."""

    def __init__(self, moto, source: Path, n: int):
        from botocore.config import Config

        self.client = moto.client(config=Config(max_pool_connections=UPLOAD_THREADS))
        self.client.create_bucket(Bucket=BUCKET)
        self.input = f's3://{BUCKET}/{PREFIX}'
        self.run_args = ['--s3-endpoint-url', moto.endpoint]
        started = time.time()
        # straight into the server's backend: the first state is not what is measured, and
        # 100k HTTP PUTs take many minutes here
        moto.put_bodies(BUCKET, ((self._key(i), (source / small_object_name(i, PER_FOLDER))
                                  .read_bytes()) for i in range(n)))
        print(f'uploaded {n:,} objects to {self.input} in {time.time() - started:.0f} s',
              flush=True)

    def edit(self, which: list[int], edit: int) -> None:
        self._each(lambda i: self.client.put_object(
            Bucket=BUCKET, Key=self._key(i),
            Body=small_object_text(i, OBJECT_BYTES, edit).encode('ascii')), which)

    def delete(self, which: list[int]) -> None:
        self._each(lambda i: self.client.delete_object(Bucket=BUCKET, Key=self._key(i)), which)

    @staticmethod
    def _key(i: int) -> str:
        return PREFIX + small_object_name(i, PER_FOLDER)

    @staticmethod
    def _each(call: Callable[[int], object], which) -> None:
        """One request per object, 16 at a time (one at a time, 100k PUTs take many minutes);
        the first error is raised."""
        with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
            for _ in pool.map(call, which):
                pass


def _share(n: int, per: int) -> int:
    """One object in `per`, at least one (a small trial still changes something)."""
    return max(1, n // per)


# What each step does to the bucket before its run.
CHANGES: dict[str, Callable[[int, object], None]] = {
    'first': lambda n, bucket: None,
    'unchanged': lambda n, bucket: None,
    'clustered': lambda n, bucket: bucket.edit(pick(n, _share(n, 100), clustered=True), 1),
    'scattered': lambda n, bucket: bucket.edit(pick(n, _share(n, 100), clustered=False), 2),
    'deleted': lambda n, bucket: bucket.delete(pick(n, _share(n, 1000), clustered=False,
                                                    seed=5)),
}


# ---------------------------------------------------------------- measuring

def process_name(p) -> str:
    """A psutil.Process's name in the per-process peaks: the measured command is the driver,
    anything it starts a worker; the pid keeps processes of one name apart."""
    role = 'driver' if p.ppid() == os.getpid() else 'worker'
    return f'{role} {p.name()} {p.pid}'


def measured(cmd: list[str]):
    """bench.measure's run of `cmd` from the repository, with each process's peak."""
    from bench.measure import run_measured

    return run_measured(cmd, group=process_name, cwd=str(REPO))


def ragbeam_command(bucket, output: Path) -> list[str]:
    ragbeam = str(Path(sys.executable).with_name('ragbeam'))
    return [ragbeam, 'run', *run_args(bucket, output)]


def run_args(bucket, output: Path) -> list[str]:
    """What follows `ragbeam run`: the hash embedder, no index, so that what is measured is
    listing, the diff, reading and the commit."""
    return ['--input', bucket.input, '--output', str(output), '--embedder', 'hash',
            '--index-type', 'none', '--lexical-index', 'none', *bucket.run_args]


def measured_step(tool: str, n: int, step: str, bucket, cmd: list[str]):
    """The step's change to the bucket, then `cmd` measured: (measurement, its Step); the
    command's output tail is printed when it failed."""
    CHANGES[step](n, bucket)
    m = measured(cmd)
    largest = max(m.peak_process_rss_mb_by.values(), default=0.0)
    result = Step(tool, n, step, m.returncode, round(m.wall_seconds, 2), round(m.peak_rss_mb, 1),
                  largest, process_rss_mb=m.peak_process_rss_mb_by)
    if m.returncode:
        print(f'{tool} {n:,} {STEPS[step]} exited with {m.returncode}:\n{m.output[-4000:]}',
              flush=True)
    return m, result


def ragbeam_step(tool: str, n: int, step: str, bucket, output: Path) -> Step:
    """One step: its change to the bucket, then a measured `ragbeam run`."""
    m, result = measured_step(tool, n, step, bucket, ragbeam_command(bucket, output))
    if m.returncode:
        return result
    report = json.loads((output / 'report.json').read_text())
    run = report['run']
    added, rewritten = run.get('commit_bytes_added', 0), run.get('commit_bytes_rewritten', 0)
    result.run = run
    result.objects_listed = sum(run.get(f'objects_{c}', 0) for c in
                                ('new', 'changed', 'retried', 'unchanged', 'outside'))
    result.objects_per_s = round(result.objects_listed / m.wall_seconds, 1)
    result.report_wall_seconds = report.get('wall_seconds')
    result.report_peak_rss_mb = report.get('peak_rss_mb')
    result.commit_seconds = run.get('commit_seconds')
    result.commit_bytes_added, result.commit_bytes_rewritten = added, rewritten
    result.write_amplification = round((added + rewritten) / added, 3) if added else None
    if step == 'first':
        result.graph_bytes = graph_size(bucket, output)
    print(f'{tool} {n:,} {STEPS[step]}: {m.wall_seconds:.1f} s, {result.objects_per_s:,.0f} '
          f'objects/s, peak RSS {m.peak_rss_mb:.0f} MB (largest process '
          f'{result.largest_process_mb:.0f}), read '
          f"{run.get('objects_read', 0):,}, commit {result.commit_seconds or 0:.2f} s"
          + (f', graph {result.graph_bytes / 1024:.1f} KB' if result.graph_bytes else ''),
          flush=True)
    return result


def graph_size(bucket, output: Path) -> Optional[int]:
    """The bytes of the graph a run over `bucket` builds against what is committed in
    `output`, from the `_graph` sub-command (a process of its own, as a run's driver is)."""
    done = subprocess.run([sys.executable, '-m', 'bench.bench_scale', '_graph',
                           *run_args(bucket, output)], cwd=str(REPO), capture_output=True,
                          text=True)
    if done.returncode:
        print(f'_graph exited with {done.returncode}:\n{done.stderr[-3000:]}', flush=True)
        return None
    return int(done.stdout.strip().splitlines()[-1])


def ragbeam_steps(tool: str, n: int, steps: Sequence[str], bucket, output: Path) -> list[Step]:
    """The steps in order on one bucket into one output, each step's wall time also as a
    share of the first run's."""
    shutil.rmtree(output, ignore_errors=True)
    results = [ragbeam_step(tool, n, step, bucket, output) for step in steps]
    with_wall_over_first(results)
    return results


def with_wall_over_first(results: list[Step]) -> None:
    first = next((r for r in results if r.step == 'first' and r.returncode == 0), None)
    for r in results:
        if first is not None and r.returncode == 0:
            r.wall_over_first = round(r.wall_seconds / first.wall_seconds, 4)


# ---------------------------------------------------------------- the LlamaIndex peer

def hash_vector(text: str, dim: int = HASH_DIM) -> list[float]:
    """Signed feature hashing of the distinct words of `text` into `dim` floats, unit length:
    the idea of ragbeam's hash embedder (no model, no network), in plain Python."""
    vector = [0.0] * dim
    for word in set(re.findall(r'\w+', text.lower())):
        h = zlib.crc32(word.encode('utf-8'))
        vector[h % dim] += 1.0 if (h >> 31) & 1 else -1.0
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    return [v / norm for v in vector]


def hash_embedding():
    """A LlamaIndex embedding model that calls hash_vector; defined on first use, as
    llama_index is only in the peer's Python."""
    from llama_index.core.base.embeddings.base import BaseEmbedding

    class HashEmbedding(BaseEmbedding):
        """Feature hashing of words into HASH_DIM floats."""

        @classmethod
        def class_name(cls) -> str:
            return 'HashEmbedding'

        def _get_text_embedding(self, text: str) -> list[float]:
            return hash_vector(text)

        def _get_query_embedding(self, query: str) -> list[float]:
            return hash_vector(query)

        async def _aget_query_embedding(self, query: str) -> list[float]:
            return hash_vector(query)

    return HashEmbedding(model_name='hash', embed_batch_size=256)


def llama_main(src: str, persist: str) -> None:
    """(A measured subprocess, under the peer's Python.) One incremental ingestion as
    LlamaIndex documents it: the pipeline's docstore loaded from `persist` when there,
    every file read, the documents whose hash the docstore does not hold split and embedded,
    the docstore persisted. Prints its counts and timings as JSON.

    llama-index 0.14 applies UPSERTS only with a vector store, and without one (as here)
    warns and de-duplicates by hash (duplicates_only): a changed document is new to it, an
    unchanged one skipped, the same work. The ingestion cache is off: it keys whole batches,
    so a changed bucket never hits it, and persisting it writes every node and vector."""
    from llama_index.core import SimpleDirectoryReader
    from llama_index.core.ingestion import DocstoreStrategy, IngestionPipeline
    from llama_index.core.node_parser import SentenceSplitter
    from llama_index.core.storage.docstore import SimpleDocumentStore

    started = time.perf_counter()
    pipeline = IngestionPipeline(
        transformations=[SentenceSplitter(chunk_size=LLAMA_CHUNK_TOKENS,
                                          chunk_overlap=LLAMA_OVERLAP_TOKENS),
                         hash_embedding()],
        docstore=SimpleDocumentStore(), docstore_strategy=DocstoreStrategy.UPSERTS,
        disable_cache=True)
    loaded = os.path.isdir(persist)
    if loaded:
        pipeline.load(persist)
    documents = SimpleDirectoryReader(src, recursive=True, filename_as_id=True).load_data()
    read = time.perf_counter()
    nodes = pipeline.run(documents=documents)
    ran = time.perf_counter()
    pipeline.persist(persist)
    print(json.dumps({'documents': len(documents), 'nodes_embedded': len(nodes),
                      'docstore_loaded': loaded,
                      'load_and_read_seconds': round(read - started, 2),
                      'run_seconds': round(ran - read, 2),
                      'persist_seconds': round(time.perf_counter() - ran, 2)}))


def llama_step(python: str, n: int, step: str, bucket: LocalBucket, persist: Path) -> Step:
    """One step of the peer: the step's change to its copy, then a measured `_llama`."""
    m, result = measured_step(LLAMA, n, step, bucket, [python, '-m', 'bench.bench_scale',
                                                       '_llama', str(bucket.root), str(persist)])
    if m.returncode:
        return result
    # its JSON line: the last one that is JSON (llama-index warns on stderr, which
    # run_measured merges in)
    result.run = json.loads(next(line for line in reversed(m.output.splitlines())
                                 if line.startswith('{')))
    result.objects_listed = result.run['documents']
    result.objects_per_s = round(result.objects_listed / m.wall_seconds, 1)
    print(f'LlamaIndex {n:,} {STEPS[step]}: {m.wall_seconds:.1f} s, peak RSS '
          f"{m.peak_rss_mb:.0f} MB, {result.run['nodes_embedded']:,} nodes embedded", flush=True)
    return result


def llama_steps(python: str, n: int, steps: Sequence[str], bucket: LocalBucket,
                persist: Path) -> list[Step]:
    shutil.rmtree(persist, ignore_errors=True)
    results = [llama_step(python, n, step, bucket, persist)
               for step in steps if step in LLAMA_STEPS]
    with_wall_over_first(results)
    return results


LLAMA_IMPORTS = 'import llama_index.core, llama_index.readers.file'


def find_llama_python(option: Optional[str]) -> Optional[str]:
    """The Python the peer runs under: --llama-python; else this one when it has the peer's
    packages (ragbeam's `llamaindex` extra brings llama-index-core, not the file readers);
    else /tmp/llamavenv's. None, with the reason printed, when it cannot import them."""
    def imports(python: str) -> subprocess.CompletedProcess:
        return subprocess.run([python, '-c', LLAMA_IMPORTS], capture_output=True, text=True)

    if option:
        python = option
    elif not imports(sys.executable).returncode:
        python = sys.executable
    else:
        python = DEFAULT_LLAMA_PYTHON
    if not os.path.exists(python):
        print(f'LlamaIndex peer left out: no {python} (see bench/README.md)', flush=True)
        return None
    check = imports(python)
    if check.returncode:
        print(f'LlamaIndex peer left out: {python} cannot import llama_index:\n'
              f'{check.stderr[-2000:]}', flush=True)
        return None
    return python


# ---------------------------------------------------------------- one size

def bench_size(n: int, workdir: Path, steps: Sequence[str], llama: Optional[str]) -> list[Step]:
    """ragbeam's steps on a copy of the generated bucket, then the peer's on another copy;
    the copies and outputs are deleted after (at 1M each copy is a million files)."""
    generated = generated_bucket(workdir, n)
    runs = workdir / f'runs-{n}'
    shutil.rmtree(runs, ignore_errors=True)
    try:
        bucket = LocalBucket(copy_bucket(generated, runs / 'ragbeam-src'))
        results = ragbeam_steps(RAGBEAM, n, steps, bucket, runs / 'ragbeam-out')
        if llama and n <= PEER_MAX_OBJECTS:
            bucket = LocalBucket(copy_bucket(generated, runs / 'llama-src'))
            results += llama_steps(llama, n, steps, bucket, runs / 'llama-store')
        elif llama:
            print(f'LlamaIndex peer not run at {n:,} objects (above {PEER_MAX_OBJECTS:,})',
                  flush=True)
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    return results


def bench_s3(n: int, workdir: Path, steps: Sequence[str]) -> list[Step]:
    """ragbeam's steps on N objects in moto's S3 (a server in this process), output local."""
    from tests.servers import S3_ENV, MotoS3

    os.environ.update(S3_ENV)  # before the server starts, so that the runs inherit them
    generated = generated_bucket(workdir, n)
    runs = workdir / f'runs-s3-{n}'
    shutil.rmtree(runs, ignore_errors=True)
    moto = MotoS3()
    try:
        bucket = S3Bucket(moto, generated, n)
        return ragbeam_steps(RAGBEAM_S3, n, steps, bucket, runs / 'ragbeam-out')
    finally:
        moto.stop()
        shutil.rmtree(runs, ignore_errors=True)


# ---------------------------------------------------------------- targets

def _row(rows: list[Step], tool: str, n: int, step: str) -> Optional[Step]:
    return next((r for r in rows if (r.tool, r.objects, r.step) == (tool, n, step)
                 and r.returncode == 0), None)


def _not_run(name: str, *needs: str) -> Target:
    return Target(name, 'not run (needs ' + ', '.join(needs) + ')', None)


def target_unchanged(rows: list[Step]) -> Target:
    name = (f'unchanged re-run at {LARGE:,}: every process <= {PROCESS_LIMIT_MB:.0f} MB and '
            f'wall <= {UNCHANGED_WALL_LIMIT_S:.0f} s')
    r = _row(rows, RAGBEAM, LARGE, 'unchanged')
    if r is None:
        return _not_run(name, f'unchanged at {LARGE:,}')
    return Target(name, f'largest process {r.largest_process_mb:.0f} MB, wall '
                        f'{r.wall_seconds:.1f} s',
                  r.largest_process_mb <= PROCESS_LIMIT_MB
                  and r.wall_seconds <= UNCHANGED_WALL_LIMIT_S)


def target_clustered(rows: list[Step]) -> Target:
    name = f"1% changed clustered at {LARGE:,}: wall <= {CLUSTERED_OVER_FIRST}x the first run's"
    r = _row(rows, RAGBEAM, LARGE, 'clustered')
    if r is None or r.wall_over_first is None:
        return _not_run(name, f'first and clustered at {LARGE:,}')
    return Target(name, f'{r.wall_over_first:.3f}x ({r.wall_seconds:.1f} s)',
                  r.wall_over_first <= CLUSTERED_OVER_FIRST)


def target_llama(rows: list[Step]) -> Target:
    name = (f"1% changed at {PEER_AT:,}: <= {OVER_LLAMA}x LlamaIndex's time for the same step, "
            f'with less memory')
    ours, peer = _row(rows, RAGBEAM, PEER_AT, 'clustered'), _row(rows, LLAMA, PEER_AT, 'clustered')
    if ours is None or peer is None:
        return _not_run(name, f'clustered at {PEER_AT:,}, ragbeam and LlamaIndex')
    ratio = ours.wall_seconds / peer.wall_seconds
    return Target(name, f'{ratio:.3f}x ({ours.wall_seconds:.1f} s against '
                        f'{peer.wall_seconds:.1f} s), peak RSS {ours.peak_rss_mb:.0f} against '
                        f'{peer.peak_rss_mb:.0f} MB',
                  ratio <= OVER_LLAMA and ours.peak_rss_mb < peer.peak_rss_mb)


def target_first(rows: list[Step]) -> Target:
    name = (f'first run at {LARGE:,}: tree <= {FIRST_TREE_LIMIT_MB:.0f} MB and >= '
            f'{FIRST_OBJECTS_PER_S:,.0f} objects/s')
    r = _row(rows, RAGBEAM, LARGE, 'first')
    if r is None:
        return _not_run(name, f'first at {LARGE:,}')
    return Target(name, f'{r.peak_rss_mb:.0f} MB, {r.objects_per_s:,.0f} objects/s',
                  r.peak_rss_mb <= FIRST_TREE_LIMIT_MB and r.objects_per_s >= FIRST_OBJECTS_PER_S)


def target_graph(rows: list[Step]) -> Target:
    name = (f'graph at {LARGE:,} committed objects <= {GRAPH_LIMIT_BYTES // 1024} KB and within '
            f'{GRAPH_GROWTH_BYTES // 1024} KB of the graph at {SMALL_GRAPH_AT:,}')
    large, small = _row(rows, RAGBEAM, LARGE, 'first'), _row(rows, RAGBEAM, SMALL_GRAPH_AT, 'first')
    if large is None or small is None or large.graph_bytes is None or small.graph_bytes is None:
        return _not_run(name, f'first at {SMALL_GRAPH_AT:,} and {LARGE:,}')
    growth = large.graph_bytes - small.graph_bytes
    return Target(name, f'{large.graph_bytes / 1024:.1f} KB, {growth / 1024:+.1f} KB from '
                        f'{SMALL_GRAPH_AT:,}',
                  large.graph_bytes <= GRAPH_LIMIT_BYTES and abs(growth) <= GRAPH_GROWTH_BYTES)


def target_write_amplification(rows: list[Step]) -> Target:
    name = f'commit write amplification, 1% changed clustered: <= {WRITE_AMPLIFICATION_LIMIT}x'
    found = [r for r in rows if r.tool in (RAGBEAM, RAGBEAM_S3) and r.step == 'clustered'
             and r.write_amplification is not None]
    if not found:
        return _not_run(name, 'the clustered step')
    return Target(name, ', '.join(f'{r.write_amplification:.2f}x at {r.objects:,}'
                                  + (' (S3)' if r.tool == RAGBEAM_S3 else '') for r in found),
                  all(r.write_amplification <= WRITE_AMPLIFICATION_LIMIT for r in found))


TARGETS = (target_unchanged, target_clustered, target_llama, target_first, target_graph,
           target_write_amplification)


def per_object(rows: list[Step]) -> dict:
    """What each object adds, between one N and the next (ragbeam, local bucket; the fixed
    start-up cancels out): KB of peak tree RSS and µs of wall time per object, for the first
    and unchanged runs; whether memory is flat (each step adds at most FLAT_KB_PER_OBJECT);
    and the 10M run this extrapolates to from the largest two N."""
    out = {}
    for step in ('first', 'unchanged'):
        by_n = sorted((r.objects, r) for r in rows
                      if r.tool == RAGBEAM and r.step == step and r.returncode == 0)
        steps = [{'from': a, 'to': b,
                  'kb_per_object': round((rb.peak_rss_mb - ra.peak_rss_mb) * 1024 / (b - a), 4),
                  'us_per_object': round((rb.wall_seconds - ra.wall_seconds) * 1e6 / (b - a), 1)}
                 for (a, ra), (b, rb) in zip(by_n, by_n[1:])]
        if not steps:
            continue
        last, (n, r) = steps[-1], by_n[-1]
        out[step] = {
            'steps': steps,
            'memory_flat': all(x['kb_per_object'] <= FLAT_KB_PER_OBJECT for x in steps),
            'at_10m': {'peak_rss_mb': round(r.peak_rss_mb + last['kb_per_object'] / 1024
                                            * (PROJECTED - n), 0),
                       'wall_seconds': round(r.wall_seconds + last['us_per_object'] / 1e6
                                             * (PROJECTED - n), 0)}}
    return out


def summary(rows: list[Step], llama_skipped: list[int]) -> dict:
    return {
        'targets': [asdict(t(rows)) for t in TARGETS],
        'per_object': per_object(rows),
        'llama_not_run_at': llama_skipped,
        'all_runs_ok': all(r.returncode == 0 for r in rows),
    }


# ---------------------------------------------------------------- reporting

def _cell(value, fmt: str) -> str:
    return '' if value is None else format(value, fmt)


def print_table(rows: list[Step], summ: dict) -> None:
    """A markdown table, ragbeam's rows first, then the peer's; then the targets and the
    per-object figures."""
    print('\n| N | tool | step | rc | wall s | x first | objects/s | read | peak tree MB | '
          'largest process MB | graph KB | commit s | commit MB written | write amp. |')
    print('|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|')
    ordered = sorted(rows, key=lambda r: (r.tool == LLAMA, r.tool, r.objects,
                                          list(STEPS).index(r.step)))
    for r in ordered:
        written = (None if r.commit_bytes_added is None
                   else (r.commit_bytes_added + r.commit_bytes_rewritten) / MB)
        read = r.run.get('objects_read', r.run.get('nodes_embedded'))
        print(f'| {r.objects:,} | {r.tool} | {r.label} | {r.returncode} | {r.wall_seconds:.1f} | '
              f'{_cell(r.wall_over_first, ".3f")} | {r.objects_per_s:,.0f} | '
              f'{_cell(read, ",")} | {r.peak_rss_mb:.0f} | {r.largest_process_mb:.0f} | '
              f'{_cell(None if r.graph_bytes is None else r.graph_bytes / 1024, ".1f")} | '
              f'{_cell(r.commit_seconds, ".2f")} | {_cell(written, ".2f")} | '
              f'{_cell(r.write_amplification, ".2f")} |')
    print('\n(read: objects read by ragbeam; nodes embedded by LlamaIndex)\n\nTargets:')
    for t in summ['targets']:
        print(f"- {t['name']}: {t['value']}: {_met(t['met'])}")
    if summ['llama_not_run_at']:
        print(f"- LlamaIndex not run at {', '.join(f'{n:,}' for n in summ['llama_not_run_at'])}"
              f' objects (above {PEER_MAX_OBJECTS:,})')
    print('\nWhat each object adds (ragbeam, local bucket; between one N and the next):')
    for step, found in summ['per_object'].items():
        figures = '; '.join(f"{x['from']:,} -> {x['to']:,}: {x['kb_per_object']:.3f} KB and "
                            f"{x['us_per_object']:,.1f} µs per object" for x in found['steps'])
        at = found['at_10m']
        print(f"- {STEPS[step]}: {figures}; memory "
              f"{'flat' if found['memory_flat'] else 'NOT flat'} (<= {FLAT_KB_PER_OBJECT} KB "
              f"per object); at {PROJECTED:,} objects, extrapolated: {at['peak_rss_mb']:,.0f} MB,"
              f" {at['wall_seconds']:,.0f} s")


def _met(flag: Optional[bool]) -> str:
    return 'n/a' if flag is None else ('met' if flag else 'NOT met')


def write_chart(rows: list[Step], path: str) -> None:
    """Peak tree RSS and wall time against N (log scale), a line per step and tool: ragbeam
    solid with dots, ragbeam on S3 dotted with squares, LlamaIndex dashed with open
    triangles; one colour per step. At one N each line is a point, hence the markers."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    from bench.measure import save_figure

    styles = {RAGBEAM: ('-', 'o', None), RAGBEAM_S3: (':', 's', None), LLAMA: ('--', '^', 'none')}
    colours = {step: f'C{i}' for i, step in enumerate(STEPS)}
    fig, (memory, wall) = plt.subplots(1, 2, figsize=(13, 5.5))
    for tool, (style, marker, face) in styles.items():
        for step in STEPS:
            line = sorted((r for r in rows if (r.tool, r.step) == (tool, step)
                           and r.returncode == 0), key=lambda r: r.objects)
            if not line:
                continue
            xs = [r.objects for r in line]
            for ax, values in ((memory, [r.peak_rss_mb for r in line]),
                               (wall, [r.wall_seconds for r in line])):
                ax.plot(xs, values, style, color=colours[step], marker=marker, markersize=7,
                        markerfacecolor=face, label=f'{tool}: {STEPS[step]}')
    memory.axhline(FIRST_TREE_LIMIT_MB, color='grey', linewidth=1, linestyle='-.')
    memory.annotate(f'first-run target {FIRST_TREE_LIMIT_MB:.0f} MB', (0.01, FIRST_TREE_LIMIT_MB),
                    xycoords=('axes fraction', 'data'), va='bottom', fontsize=8, color='grey')
    highest = max((r.peak_rss_mb for r in rows if r.returncode == 0), default=0.0)
    memory.set_ylim(0, max(FIRST_TREE_LIMIT_MB, highest) * 1.15)
    memory.set_title('Peak RSS of the process tree (MB)')
    wall.set_title('Wall time (s, log scale)')
    wall.set_yscale('log')
    wall.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    wall.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
    wall.yaxis.set_minor_formatter(NullFormatter())
    sizes = sorted({r.objects for r in rows})
    for ax in (memory, wall):
        ax.set_xscale('log')
        ax.set_xticks(sizes, [_short(n) for n in sizes])
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(sizes) == 1:
            ax.set_xlim(sizes[0] / 3, sizes[0] * 3)
        ax.set_xlabel('objects in the bucket (N)')
        ax.grid(True, which='both', alpha=0.3)
    wall.legend(fontsize=7, loc='best')
    save_figure(fig, path, 'ragbeam on buckets of many ~650-byte objects (hash embedder, '
                           'FnApiRunner) against LlamaIndex')


def _short(n: int) -> str:
    """10000 as 10k, 1000000 as 1M."""
    for size, suffix in ((1_000_000, 'M'), (1000, 'k')):
        if n >= size and n % size == 0:
            return f'{n // size}{suffix}'
    return f'{n:,}'


# ---------------------------------------------------------------- command line

def step_keys(option: str) -> list[str]:
    """The steps asked for, in their order, `first` among them."""
    asked = {s.strip() for s in option.split(',') if s.strip()}
    unknown = asked - set(STEPS)
    if unknown:
        raise SystemExit(f"unknown steps {', '.join(sorted(unknown))}; "
                         f"choose from {', '.join(STEPS)}")
    if 'first' not in asked:
        print('steps: first added (the others need a committed corpus)', flush=True)
    return [s for s in STEPS if s in asked or s == 'first']


def bench(args: argparse.Namespace) -> int:
    """Every size, then S3 if asked; the table, the targets, scale.json and scale.png.
    1 when any run failed."""
    from bench.measure import save_report

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    steps = step_keys(args.steps)
    sizes = [int(s.replace('_', '')) for s in args.sizes.split(',') if s.strip()]
    llama = None if args.no_llama else find_llama_python(args.llama_python)
    rows: list[Step] = []
    for n in sizes:
        rows += bench_size(n, workdir, steps, llama)
    if args.s3:
        rows += bench_s3(args.s3_objects, workdir, steps)
    skipped = [n for n in sizes if llama and n > PEER_MAX_OBJECTS]
    summ = summary(rows, skipped)
    print_table(rows, summ)
    save_report(args.out, 'scale', rows, summ, write_chart, sizes=sizes, steps=steps,
                object_bytes=OBJECT_BYTES, per_folder=PER_FOLDER,
                s3_objects=args.s3_objects if args.s3 else None,
                llama=llama_versions(llama))
    return 0 if summ['all_runs_ok'] else 1


def llama_versions(python: Optional[str]) -> Optional[dict]:
    """The peer's Python and its llama-index versions, for the report."""
    if python is None:
        return None
    done = subprocess.run([python, '-c', 'import importlib.metadata as m, json; print(json.dumps('
                           '{p: m.version(p) for p in ("llama-index-core", '
                           '"llama-index-readers-file")}))'], capture_output=True, text=True)
    versions = json.loads(done.stdout) if done.returncode == 0 else {}
    return {'python': python, **versions}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='bench.bench_scale', description=__doc__.split('\n')[0])
    p.add_argument('--sizes', default='10000,100000,1000000',
                   help='comma-separated numbers of objects (N)')
    p.add_argument('--steps', default=','.join(STEPS),
                   help=f"comma-separated subset of {', '.join(STEPS)} (first always runs)")
    p.add_argument('--workdir', default='/tmp/ragbeam-bench-scale',
                   help='generated buckets (kept and reused), and the copies and outputs of '
                        'the runs (deleted after each N)')
    p.add_argument('--out', default=str(REPO / 'bench' / 'results'),
                   help='folder for scale.json and scale.png')
    p.add_argument('--s3', action='store_true',
                   help='also run the steps on objects in moto S3 (see --s3-objects)')
    p.add_argument('--s3-objects', type=int, default=100_000,
                   help='objects in the S3 bucket with --s3')
    p.add_argument('--no-llama', action='store_true', help='leave out the LlamaIndex peer')
    p.add_argument('--llama-python', default=None,
                   help='a Python with llama-index-core and llama-index-readers-file '
                        f'(default: this one if it has them, else {DEFAULT_LLAMA_PYTHON})')
    return p


def graph_main(argv: Sequence[str]) -> None:
    """(A subprocess.) Prints the bytes of the graph `ragbeam run ARGV` would run now."""
    from pipeline.build import graph_bytes, prepare
    from pipeline.cli import run_options

    p, _, _ = prepare(run_options(list(argv)))
    print(graph_bytes(p))


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ['_llama']:
        llama_main(argv[1], argv[2])
        return 0
    if argv[:1] == ['_graph']:
        graph_main(argv[1:])
        return 0
    return bench(parser().parse_args(argv))


if __name__ == '__main__':
    sys.exit(main())
