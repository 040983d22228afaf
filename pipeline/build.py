"""Pipeline construction and the driver-side steps around it: output, report, index."""
from __future__ import annotations

import gc
import logging
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, TestOptions

from pipeline import report as reporting
from pipeline.monitor import RunMonitor
from pipeline.options import RunOptions, UsageError, beam_options, store_beam_args
from transforms import index, outputs
from transforms.embed import Embed, describe_embedder, release_embedders
from transforms.entities import ExtractEntities, release_model
from transforms.listing import ListObjects, check_patterns
from transforms.manifest import BuildManifest
from transforms.pdf import ReadPdfs
from transforms.read_text import ReadText
from transforms.route import Route
from transforms.store import StoreConfig
from transforms.types import chunk_schema
from transforms.write import WriteChunks, WriteErrors, WriteManifest

_log = logging.getLogger(__name__)


def build(p: beam.Pipeline, opts: RunOptions) -> None:
    """Adds the ingestion graph: list -> route -> read -> enrich -> embed -> write, plus the
    manifest of every listed object and the error records.

    Chunk text and embeddings stay on one fused path from each reader to its Parquet sink;
    only object refs, stats and error records cross a shuffle.
    """
    out = opts.output
    listed = p | 'List' >> ListObjects(opts.inputs, opts.store)
    routes = listed | 'Route' >> Route(opts.route)
    watch = opts.monitor
    text = routes.text | 'ReadText' >> ReadText(opts.chunker, opts.text, opts.store,
                                                monitor=watch)
    pdfs = ((routes.pdf, text.handed_off) | 'AllPdfs' >> beam.Flatten()
            | 'ReadPdfs' >> ReadPdfs(opts.chunker, opts.pdf, opts.store, watch))
    # PDF headers that do not open as PDFs: read as text after all
    not_pdfs = pdfs.handed_off | 'ReadNotPdfs' >> ReadText(opts.chunker, opts.text, opts.store,
                                                           sniff_pdfs=False, monitor=watch)
    reads = {'text': text, 'pdf': pdfs, 'notpdf': not_pdfs}
    # Each reader's chunks are enriched, embedded and written on their own path: a Flatten
    # of them would be a fusion break that holds every chunk in memory on the FnApiRunner.
    for name, read in reads.items():
        _ = (read.chunks
             | f'Enrich/{name}' >> ExtractEntities(opts.entities, watch)
             | f'Embed/{name}' >> Embed(opts.embed, watch)
             | f'Write/{name}' >> WriteChunks(outputs.path(out, 'chunks', name), opts.embed.dim,
                                              watch))
    stats = tuple(r.stats for r in reads.values()) | 'AllStats' >> beam.Flatten()
    _ = ((listed, stats, routes.skipped)
         | 'Manifest' >> BuildManifest()
         | 'WriteManifest' >> WriteManifest(outputs.path(out, 'manifest', 'manifest')))
    _ = (tuple(r.errors for r in reads.values())
         | 'AllErrors' >> beam.Flatten()
         | 'WriteErrors' >> WriteErrors(outputs.path(out, 'errors', 'errors')))


def make_pipeline(beam_args: list[str], store: StoreConfig) -> beam.Pipeline:
    """A Pipeline on the requested runner; without --runner, the in-process FnApiRunner.

    Beam's DirectRunner would first try to download the Prism binary, which fails offline.
    """
    options = beam_options(store_beam_args(store, beam_args))
    runner = None
    if options.view_as(StandardOptions).runner is None:
        from apache_beam.runners.portability.fn_api_runner import FnApiRunner
        runner = FnApiRunner()
    try:
        return beam.Pipeline(runner=runner, options=options)
    except ValueError as e:  # the runner's validation of its options, e.g. Dataflow's project
        raise UsageError(' '.join(str(e).split()))


def run(opts: RunOptions) -> dict | None:
    """Runs the whole job; returns the report, or None when the runner only translated it."""
    opts.validate()
    started = time.time()
    p = make_pipeline(opts.beam_args, opts.store)
    outputs.configure(p.options)
    check_patterns(opts.inputs, opts.store)
    outputs.prepare(opts.output)
    build(p, opts)
    options = p.options
    dry_run = options.view_as(TestOptions).dry_run
    _log.info('ragbeam: embedder %s (%s); running on %s (%s workers)', opts.embed.embedder,
              describe_embedder(opts.embed.embedder, opts.embed.device, opts.embed.runtime),
              options.view_as(StandardOptions).runner
              or 'FnApiRunner', options.view_as(DirectOptions).direct_num_workers or 1)
    with RunMonitor() as monitor:
        result = p.run()
        if dry_run:
            _log.warning('ragbeam: --dry_run: the pipeline was translated, not run; '
                         'no report and no index are built')
            return None
        result.wait_until_finish()
    release_embedders()  # models the in-process runner loaded here; the index needs none
    release_model()
    gc.collect()
    outputs.ensure_table(outputs.path(opts.output, 'chunks'), chunk_schema(opts.embed.dim),
                         opts.store)
    index_meta = None
    if opts.index.type != 'none':
        index_meta = index.build_index(opts.output, opts.index.type, opts.store,
                                       opts.index.memory_mb,
                                       lambda: make_pipeline(opts.beam_args, opts.store))
    found = metrics(result)
    report = reporting.summarise(opts, index_meta, found['counters'],
                                 wall_seconds=time.time() - started,
                                 peak_rss_mb=monitor.peak_mb,
                                 stages=reporting.stages(found), rss_series=monitor.series)
    outputs.write_json(outputs.path(opts.output, 'report.json'), report)
    return report


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
