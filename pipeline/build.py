"""Pipeline construction and the driver-side steps around it: output, report, index."""
from __future__ import annotations

import logging
import resource
import time

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, StandardOptions, TestOptions

from pipeline import report as reporting
from pipeline.options import RunOptions, UsageError, beam_options, store_beam_args
from transforms import index, outputs
from transforms.embed import EMBEDDERS, describe_embedder
from transforms.listing import ListObjects, check_patterns, skip_reason
from transforms.manifest import BuildManifest
from transforms.pdf import OpenPdfs, ReadPdfChunks
from transforms.read_text import ERRORS, PDFS, STATS, ReadTextChunks, looks_like_pdf
from transforms.store import StoreConfig
from transforms.write import EmbedAndWrite, WriteErrors, WriteManifest, chunk_schema

_log = logging.getLogger(__name__)


def build(p: beam.Pipeline, opts: RunOptions) -> None:
    """Adds the ingestion graph: list -> read+chunk (SDF) -> embed -> Parquet; manifest; errors.

    Chunk text and embeddings stay on one fused path from the read to the Parquet write;
    only object refs, stats and error records cross a shuffle.
    """
    out = opts.output
    refs = p | 'ListObjects' >> ListObjects(opts.inputs, opts.store)
    skipped = refs | 'SkipBySize' >> beam.FlatMapTuple(
        lambda uri, ref: [(uri, r)] if (r := skip_reason(ref, opts.max_object_bytes)) else [])
    to_read = refs | 'ToRead' >> beam.FlatMapTuple(
        lambda uri, ref: [] if skip_reason(ref, opts.max_object_bytes) else [ref])
    named_pdf, maybe_text = to_read | 'ByName' >> beam.Partition(
        lambda ref, _: 0 if looks_like_pdf(ref.uri) else 1, 2)
    text = maybe_text | 'ReadText' >> beam.ParDo(
        ReadTextChunks(opts.chunker, opts.window_bytes, opts.split_bytes, opts.store)
    ).with_outputs(ERRORS, STATS, PDFS, main='chunks')
    pdfs = (named_pdf, text[PDFS]) | 'AllPdfs' >> beam.Flatten()
    opened = pdfs | 'OpenPdfs' >> beam.ParDo(OpenPdfs(opts.pdf, opts.store)).with_outputs(
        ERRORS, STATS, main='documents')
    pages = opened.documents | 'ReadPdfPages' >> beam.ParDo(
        ReadPdfChunks(opts.chunker, opts.pdf, opts.store)).with_outputs(ERRORS, STATS, main='chunks')
    # Each reader embeds and writes its own chunks: a Flatten of the two would be a fusion
    # break that holds every chunk in memory on the FnApiRunner.
    for name, read in (('text', text), ('pdf', pages)):
        _ = read.chunks | f'EmbedAndWrite/{name}' >> EmbedAndWrite(
            outputs.path(out, 'chunks', name), opts.embedder, opts.embed_batch_size,
            opts.embed_batch_bytes, opts.device)
    stats = (text[STATS], opened[STATS], pages[STATS]) | 'AllStats' >> beam.Flatten()
    _ = ((refs, stats, skipped)
         | 'Manifest' >> BuildManifest()
         | 'WriteManifest' >> WriteManifest(outputs.path(out, 'manifest', 'manifest')))
    _ = ((text[ERRORS], opened[ERRORS], pages[ERRORS])
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
    _log.info('ragbeam: embedder %s (%s); running on %s (%s workers)', opts.embedder,
              describe_embedder(opts.embedder), options.view_as(StandardOptions).runner
              or 'FnApiRunner', options.view_as(DirectOptions).direct_num_workers or 1)
    result = p.run()
    if dry_run:
        _log.warning('ragbeam: --dry_run: the pipeline was translated, not run; '
                     'no report and no index are built')
        return None
    result.wait_until_finish()
    outputs.ensure_table(outputs.path(opts.output, 'chunks'),
                         chunk_schema(EMBEDDERS[opts.embedder]().dim), opts.store)
    index_meta = None
    if opts.index_type != 'none':
        index_meta = index.build_index(opts.output, opts.index_type, opts.store,
                                       opts.index_memory_mb,
                                       lambda: make_pipeline(opts.beam_args, opts.store))
    report = reporting.summarise(opts, index_meta, counters(result),
                                 wall_seconds=time.time() - started, peak_rss_mb=peak_rss_mb())
    outputs.write_json(outputs.path(opts.output, 'report.json'), report)
    return report


def counters(result) -> dict[str, int]:
    """ragbeam's Beam counters (bytes read, chunks, store retries, ...) as the runner reports them."""
    from apache_beam.metrics.metric import MetricsFilter

    try:
        found = result.metrics().query(MetricsFilter().with_namespace('ragbeam'))['counters']
    except (NotImplementedError, AttributeError, KeyError):  # runners without metrics
        return {}
    totals: dict[str, int] = {}
    for counter in found:
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + (counter.committed or counter.attempted or 0)
    return dict(sorted(totals.items()))


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children (worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)
