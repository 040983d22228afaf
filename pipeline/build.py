"""Pipeline construction and the driver-side steps around it: output, report, index."""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterator, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import (DebugOptions, DirectOptions, StandardOptions,
                                                  TestOptions)

from pipeline import engines
from pipeline import report as reporting
from pipeline.monitor import RunMonitor
from pipeline.options import (JobFailed, RunOptions, UsageError, beam_options,
                              store_beam_args)
from transforms import corpus, index, outputs
from transforms.corpus import Diff, ManifestAt, StagedRun
from transforms.embed import EMBEDDERS, Embed, describe_embedder, release_embedders
from transforms.entities import ExtractEntities, release_model
from transforms.listing import check_patterns
from transforms.manifest import WriteStats
from transforms.pdf import ReadPdfs
from transforms.read_text import ReadText
from transforms.route import Route
from transforms.store import StoreConfig
from transforms.types import chunk_schema
from transforms.write import WriteChunks, WriteErrors, error_json

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunPlan:
    """What the driver knows before the pipeline starts: the run's id, the settings
    fingerprint, and the committed manifest's table version that the workers diff their
    listing against (read by them, not passed through the graph)."""
    run_id: str
    fingerprint: str
    manifest: ManifestAt


def settings(opts: RunOptions) -> dict:
    """What enters the settings fingerprint: whatever makes the same object give other
    chunks, vectors or columns."""
    from transforms.pdf_engines import engine_fingerprint

    pdf = opts.pdf
    ocr = pdf.ocr if pdf.ocr != 'tesseract' else f'{pdf.ocr}-{pdf.ocr_dpi}-{pdf.ocr_lang}'
    return {'chunk': opts.chunker.tag(), 'embedder': EMBEDDERS[opts.embed.embedder].name,
            'dim': opts.embed.dim, 'pdf': engine_fingerprint(pdf.engine), 'ocr': ocr,
            'entities': opts.entities.entities}


def run_folder(output: str, run_id: str, *parts: str) -> str:
    """The run's own small outputs (staged manifest, changes, errors) until its commit."""
    return outputs.path(output, '_ragbeam', 'runs', run_id, *parts)


def build(p: beam.Pipeline, opts: RunOptions, plan: RunPlan) -> None:
    """Adds the ingestion graph: list and diff in ranges -> route -> read -> enrich -> embed
    -> write, plus the manifest of every object read, the diff's decisions on what is read
    or deleted, each range's counts and the error records, all staged for the driver's
    commit.

    Chunk text and embeddings stay on one fused path from each reader to its Parquet sink;
    only listing ranges, the refs of objects to read, stats and error records cross a
    shuffle. The graph holds the input patterns and the manifest's version, nothing per
    object.
    """
    out = opts.output
    diff = p | 'Diff' >> Diff(opts.inputs, opts.store, plan.fingerprint, opts.backfill,
                              plan.manifest)
    routes = diff.read | 'Route' >> Route(opts.route)
    watch = opts.monitor
    text = routes.text | 'ReadText' >> ReadText(opts.chunker, opts.text, opts.store,
                                                monitor=watch)
    pdfs = ((routes.pdf, text.handed_off) | 'AllPdfs' >> beam.Flatten()
            | 'ReadPdfs' >> ReadPdfs(opts.chunker, opts.pdf, opts.store, watch))
    # PDF headers that do not open as PDFs: read as text after all
    not_pdfs = pdfs.handed_off | 'ReadNotPdfs' >> ReadText(opts.chunker, opts.text, opts.store,
                                                           sniff_pdfs=False, monitor=watch)
    reads = {'text': text, 'pdf': pdfs, 'notpdf': not_pdfs}
    chunks_staging = corpus.staging(outputs.path(out, 'chunks'), plan.run_id)
    # Each reader's chunks are enriched, embedded and written on their own path: a Flatten
    # of them would be a fusion break that holds every chunk in memory on the FnApiRunner.
    written = []
    for reader, read in reads.items():
        for n, chunks in enumerate(read.chunks):
            name = reader if n == 0 else f'{reader}{n}'
            written.append(chunks
                           | f'Enrich/{name}' >> ExtractEntities(opts.entities, watch)
                           | f'Embed/{name}' >> Embed(opts.embed, watch)
                           | f'Write/{name}' >> WriteChunks(outputs.path(chunks_staging, name),
                                                            opts.embed.dim, watch))
    # the chunk files to commit; none is no file (Beam's s3io fails to upload an empty one)
    _ = (written
         | 'AllWritten' >> beam.Flatten()
         | 'WriteFileList' >> beam.io.WriteToText(run_folder(out, plan.run_id, 'written'),
                                                  file_name_suffix='.txt', num_shards=1,
                                                  skip_if_empty=True))
    # the stats records of every object routed and every restriction read, each PCollection
    # on its own way to a sink (no Flatten, no join: the driver merges them in Arrow)
    stats = [('route', routes.stats)] + [(f'{reader}{n or ""}', part)
                                         for reader, read in reads.items()
                                         for n, part in enumerate(read.stats)]
    _ = ([part | f'Stats/{name}' >> WriteStats(run_folder(out, plan.run_id, 'stats', name))
          for name, part in stats]
         | 'AllStatsFiles' >> beam.Flatten()
         | 'WriteStatsList' >> beam.io.WriteToText(run_folder(out, plan.run_id, 'statsfiles'),
                                                   file_name_suffix='.txt', num_shards=1,
                                                   skip_if_empty=True))
    _ = (diff.changes
         | 'ChangesJson' >> beam.Map(lambda c: json.dumps([c.uri, c.change, c.pattern]))
         | 'WriteChanges' >> beam.io.WriteToText(run_folder(out, plan.run_id, 'changes'),
                                                 file_name_suffix='.jsonl', num_shards=1,
                                                 skip_if_empty=True))
    _ = (diff.ranges
         | 'RangesJson' >> beam.Map(lambda r: json.dumps(dataclasses.asdict(r)))
         | 'WriteRanges' >> beam.io.WriteToText(run_folder(out, plan.run_id, 'ranges'),
                                                file_name_suffix='.jsonl', num_shards=1))
    _ = ((diff.errors,) + tuple(r.errors for r in reads.values())
         | 'AllErrors' >> beam.Flatten()
         | 'WriteErrors' >> WriteErrors(run_folder(out, plan.run_id, 'errors', 'errors')))


def make_pipeline(beam_args: list[str], store: StoreConfig) -> beam.Pipeline:
    """A Pipeline on the requested runner; without --runner, the in-process FnApiRunner.

    Beam's DirectRunner would first try to download the Prism binary, which fails offline;
    `--runner PrismRunner` and `FlinkRunner` get their binary or jar from `engines`.
    """
    options = beam_options(engines.runner_args(store_beam_args(store, beam_args)))
    runner = None
    if options.view_as(StandardOptions).runner is None:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        runner = FnApiRunner()
    try:
        return beam.Pipeline(runner=runner, options=options)
    except ValueError as e:  # the runner's validation of its options, e.g. Dataflow's project
        raise UsageError(' '.join(str(e).split()))


def prepare(opts: RunOptions) -> tuple[beam.Pipeline, RunPlan, corpus.Corpus]:
    """Everything before the job starts: the options checked, the output ready, a commit a
    dead driver left half-done finished, and the graph built against the committed corpus."""
    opts.validate()
    p = make_pipeline(opts.beam_args, opts.store)
    outputs.configure(p.options, opts.store)
    check_patterns(opts.inputs, opts.store)
    outputs.prepare(opts.output, opts.store)
    storage = opts.store.delta_storage_options(opts.output)
    committed = corpus.Corpus(opts.output, storage)
    committed.roll_forward()  # a commit whose driver died half-way
    committed.clean_staging()
    committed = corpus.Corpus(opts.output, storage)
    plan = RunPlan(corpus.new_run_id(), corpus.fingerprint(settings(opts)),
                   committed.manifest_at())
    if opts.backfill.windowed:
        stale = committed.objects_made_otherwise(plan.fingerprint)
        if stale:
            raise UsageError(f'{stale} committed objects were made with other settings (chunker, '
                             'embedder, PDF engine, OCR or entities): a --modified-since/'
                             '--modified-before run would leave a mix of old and new settings; '
                             'run without them to redo every object')
    build(p, opts, plan)
    return p, plan, committed


def graph_bytes(p: beam.Pipeline) -> int:
    """The size of the pipeline's proto, what a runner such as Dataflow is sent."""
    return len(p.to_runner_api().SerializeToString())


def run(opts: RunOptions) -> dict | None:
    """Runs the whole job; returns the report, or None when the runner only translated it.

    The previous committed corpus stays readable, unchanged, until this run's commit; a run
    that dies before it leaves only run-scoped files, which the next run removes.
    """
    started = time.time()
    p, plan, committed = prepare(opts)
    options = p.options
    dry_run = options.view_as(TestOptions).dry_run
    _log.info('ragbeam: embedder %s (%s); running on %s (%s); %s; listing in up to %d ranges '
              'per input', opts.embed.embedder,
              describe_embedder(opts.embed.embedder, opts.embed.device, opts.embed.runtime),
              options.view_as(StandardOptions).runner or 'FnApiRunner', _workers(options),
              f'incremental over table version {committed.version}'
              if committed.version is not None and not opts.backfill.full else 'full run',
              opts.backfill.list_ranges)
    with RunMonitor() as monitor, lost_streams_in_one_line():
        result = p.run()
        if dry_run:
            _log.warning('ragbeam: --dry_run: the pipeline was translated, not run; '
                         'nothing is committed')
            _save_job(getattr(result, 'job', None), options)
            return None
        wait(result)
    release_embedders()  # models the in-process runner loaded here; the index needs none
    release_model()
    gc.collect()
    corpus.crash_point('after-pipeline')
    staged = corpus.StagedManifest.from_stats(
        _read_lines(run_folder(opts.output, plan.run_id, 'statsfiles*.txt')))
    try:
        return _commit(opts, plan, committed, result, monitor, staged, started)
    finally:
        staged.close()


def _commit(opts: RunOptions, plan: RunPlan, committed: corpus.Corpus, result,
            monitor: RunMonitor, staged: corpus.StagedManifest, started: float) -> dict:
    """The run's commit, its errors, the index update and the report, once its pipeline
    finished."""
    written = list(_read_lines(run_folder(opts.output, plan.run_id, 'written*.txt')))
    staged, incomplete = corpus.check_staged(written, staged)
    if incomplete:
        with FileSystems.create(run_folder(opts.output, plan.run_id, 'errors',
                                           'errors-commit.jsonl')) as f:
            f.write(''.join(error_json(e) + '\n' for e in incomplete).encode('utf-8'))
    ranges = [json.loads(line) for line in
              _read_lines(run_folder(opts.output, plan.run_id, 'ranges*.jsonl'))]
    deleted = _deletes(run_folder(opts.output, plan.run_id, 'changes*.jsonl'), ranges,
                       opts.inputs)
    found = metrics(result)
    summary = reporting.run_counts(ranges, len(deleted), staged.totals)
    try:
        done = committed.commit(StagedRun(plan.run_id, plan.fingerprint,
                                          chunk_schema(opts.embed.dim), staged, deleted,
                                          written, summary), opts.backfill)
    except corpus.CommitError as e:
        committed.clean_staging(plan.run_id)
        raise UsageError(str(e))
    _publish_errors(opts.output, plan.run_id)
    corpus.crash_point('before-index')
    index_meta = _update_index(opts, done.version)
    report = reporting.summarise(opts, index_meta, found['counters'],
                                 wall_seconds=time.time() - started,
                                 peak_rss_mb=monitor.peak_mb,
                                 peak_anon_mb=monitor.peak_anon_mb,
                                 stages=reporting.stages(found), rss_series=monitor.series,
                                 run=dict(summary, table_version=done.version,
                                          committed=done.committed,
                                          chunks_added=done.chunks_added,
                                          chunks_removed=done.chunks_removed,
                                          commit_seconds=done.seconds,
                                          chunk_files_rewritten=done.files_rewritten,
                                          commit_bytes_added=done.bytes_added,
                                          commit_bytes_rewritten=done.bytes_rewritten),
                                 read=staged.totals)
    outputs.write_json(outputs.path(opts.output, 'report.json'), report)
    committed.clean_staging(plan.run_id)
    outputs.remove(outputs.path(opts.output, '_ragbeam', 'runs'), [plan.run_id])
    return report


def _workers(options) -> str:
    """The parallelism the run asked for, as the first log line says it."""
    if options.view_as(StandardOptions).runner is None:
        return f'{options.view_as(DirectOptions).direct_num_workers or 1} workers'
    parallelism = options.get_all_options().get('parallelism') or -1  # -1: the runner's own
    return f'parallelism {parallelism}' if parallelism > 0 else "the runner's parallelism"


def wait(result) -> None:
    """Waits for the job; a job service that went away or a job the engine failed is a
    JobFailed (one line). An in-process runner raises the pipeline's own exception."""
    import grpc
    from apache_beam.runners.portability.portable_runner import PipelineResult

    try:
        result.wait_until_finish()
    except grpc.RpcError as e:  # the engine's process died, or its port closed
        details = getattr(e, 'details', lambda: None)() or 'no details'
        raise JobFailed(f'the runner\'s job service stopped answering ({_rpc_code(e)}: '
                        f'{details}); the job is lost and nothing of this run was '
                        'committed') from None
    except RuntimeError as e:
        if not isinstance(result, PipelineResult):
            raise
        detail = str(e).strip()
        _log.error('%s', detail)  # the engine's own account, with any worker traceback
        raise JobFailed(f'the runner failed the job ({detail.splitlines()[0][:300]}); '
                        'nothing of this run was committed') from None


@contextlib.contextmanager
def lost_streams_in_one_line():
    """While a job runs, a thread of this process that dies of a gRPC error (the SDK's state,
    message and worker streams, when the engine's process is gone) logs one line instead of
    a traceback, and so does a logged exception of that kind. Left in place when the job
    fails: its threads may end after it."""
    import grpc

    previous = threading.excepthook

    def hook(args):
        if isinstance(args.exc_value, grpc.RpcError):
            code = _rpc_code(args.exc_value)
            # CANCELLED: the engine closed the stream at the job's end, as it does
            _log.log(logging.DEBUG if code == 'CANCELLED' else logging.WARNING,
                     'ragbeam: thread %s lost its stream to the runner (%s)',
                     getattr(args.thread, 'name', '?'), code)
        else:
            previous(args)

    def one_line(record: logging.LogRecord) -> bool:  # the same for logged exceptions
        if record.exc_info and isinstance(record.exc_info[1], grpc.RpcError):
            record.msg, record.args = f'{record.getMessage()} (lost stream to the runner)', ()
            record.exc_info = record.exc_text = None
        return True

    handlers = logging.getLogger().handlers
    threading.excepthook = hook
    for h in handlers:
        h.addFilter(one_line)
    yield
    threading.excepthook = previous
    for h in handlers:
        h.removeFilter(one_line)


def _rpc_code(error) -> str:
    """The status code's name of a gRPC error (not every RpcError carries one)."""
    code = getattr(error, 'code', lambda: None)()
    return getattr(code, 'name', str(code))


def _save_job(job, options) -> None:
    """A Dataflow dry run's job: the pipeline proto's size said, and with --dataflow_job_file
    (which Beam writes only when it submits) the request made as Beam makes it before it
    submits: its files staged to the temp location, the request's JSON written there.
    Dataflow refuses a graph over 10 MB and a request over 20 MB."""
    if job is None:  # another runner's dry run
        return
    path = options.view_as(DebugOptions).dataflow_job_file
    size = f'the Dataflow pipeline proto is {job.proto_pipeline.ByteSize()} bytes'
    if path:
        from apache_beam.runners.dataflow.internal import apiclient

        apiclient.DataflowApplicationClient(
            options, job.root_staging_location).create_job_description(job)
        data = job.json().encode('utf-8')
        with FileSystems.create(path, mime_type='application/json') as f:
            f.write(data)
        size += f', its job request {len(data)} bytes, written to {path}'
    _log.warning('ragbeam: %s', size)


def _read_lines(pattern: str) -> Iterator[str]:
    """The non-empty lines of the run's small text outputs that match `pattern`."""
    for meta in FileSystems.match([pattern])[0].metadata_list:
        with FileSystems.open(meta.path, compression_type='uncompressed') as f:
            yield from (line for line in f.read().decode('utf-8').splitlines() if line)


def _deletes(pattern: str, ranges: list[dict], inputs: list[str]) -> list[str]:
    """The URIs the diff deletes, less those of an input whose whole listing came back
    empty (a store that answered with nothing deletes nothing); says which ranges failed."""
    listed: dict[int, int] = {}
    for r in ranges:
        listed[r['pattern']] = listed.get(r['pattern'], 0) + r['listed']
    failed = [r for r in ranges if r['error']]
    if failed:
        _log.warning('ragbeam: the listing of %d of %d ranges failed (%s); nothing in them was '
                     'deleted, and the next run lists them again', len(failed), len(ranges),
                     failed[0]['error'])
    empty = {n for n, count in listed.items() if count == 0}
    for n in sorted(empty):
        _log.warning('ragbeam: --input %s listed no object: nothing under it is deleted',
                     inputs[n])
    deleted = []
    for line in _read_lines(pattern):
        uri, change, at = json.loads(line)
        if change == 'deleted' and at not in empty:
            deleted.append(uri)
    return deleted


def _publish_errors(output: str, run_id: str) -> None:
    """errors/ holds the error records of the last committed run."""
    outputs.remove(output, ['errors'])
    found = FileSystems.match([run_folder(output, run_id, 'errors', '*.jsonl')])[0].metadata_list
    for n, meta in enumerate(found):
        with FileSystems.open(meta.path, compression_type='uncompressed') as f:
            data = f.read()
        with FileSystems.create(outputs.path(output, 'errors', f'errors-{n:05d}.jsonl')) as f:
            f.write(data)


def _update_index(opts: RunOptions, version: int | None) -> dict | None:
    """The index of the committed table version: rebuilt when the table changed, kept when
    index.json already names this version."""
    if opts.index.type == 'none':
        return None
    meta_path = outputs.path(opts.output, 'index', 'index.json')
    if FileSystems.exists(meta_path):
        meta = outputs.read_json(meta_path)
        if (meta.get('table_version') == version and meta.get('requested_type') == opts.index.type
                and (meta.get('lexical') or {}).get('library', 'none') == opts.index.lexical):
            _log.info('ragbeam: the index already matches table version %s', version)
            return meta
    return index.build_index(opts.output, opts.index.type, opts.store, opts.index.memory_mb,
                             lambda: make_pipeline(opts.beam_args, opts.store),
                             table_version=version, keep_versions=opts.index.versions,
                             lexical=opts.index.lexical,
                             rebuild_fraction=0.0 if opts.backfill.full
                             else opts.index.rebuild_fraction)  # --full: from scratch


def follow_index(output: str, version: Optional[int], store: StoreConfig,
                 pipeline) -> dict | None:
    """The current index, if any, brought to table `version` with its own settings (after a
    commit that is not a run's: `ragbeam compact`)."""
    from transforms.index import IndexOptions

    meta_path = outputs.path(output, 'index', 'index.json')
    if not FileSystems.exists(meta_path):
        return None
    meta, defaults = outputs.read_json(meta_path), IndexOptions()
    return index.build_index(output, meta['requested_type'], store, defaults.memory_mb, pipeline,
                             table_version=version, keep_versions=defaults.versions,
                             lexical=(meta.get('lexical') or {}).get('library', 'none'),
                             rebuild_fraction=defaults.rebuild_fraction)


def metrics(result) -> dict[str, dict]:
    """ragbeam's Beam metrics as the runner reports them: counters (bytes read, chunks,
    store retries, stage_ms_*, ...) summed, and the max of each distribution (rss_mb_*)."""
    from apache_beam.metrics.metric import MetricsFilter

    found = {'counters': {}, 'maxima': {}}
    try:
        queried = result.metrics().query(MetricsFilter().with_namespace('ragbeam'))
    except (NotImplementedError, AttributeError, KeyError):  # runners without metrics
        return found
    for counter in queried.get('counters', ()):
        name = counter.key.metric.name
        found['counters'][name] = (found['counters'].get(name, 0)
                                   + (counter.committed or counter.attempted or 0))
    for dist in queried.get('distributions', ()):
        value = dist.committed or dist.attempted
        if value is not None and value.count:
            name = dist.key.metric.name
            found['maxima'][name] = max(found['maxima'].get(name, 0), value.max)
    found['counters'] = dict(sorted(found['counters'].items()))
    return found
