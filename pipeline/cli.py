"""The `ragbeam` command: run, index, query."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import (INDEX_TYPES, RunOptions, UsageError, parse_size, store_beam_args,
                              store_config)
from transforms import outputs
from transforms.pdf import OCR_ENGINES
from transforms.store import StoreConfig
from transforms.listing import NoMatchError
from transforms.outputs import OutputError

def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line through UsageError."""

    def error(self, message: str):
        raise UsageError(message)


def _parser() -> argparse.ArgumentParser:
    from transforms.embed import EMBEDDERS, default_embedder_name

    p = _Parser(prog='ragbeam', description='Documents in buckets -> chunks, embeddings, index.')
    sub = p.add_subparsers(dest='command', required=True, parser_class=_Parser)

    run = sub.add_parser('run', help='ingest objects into DIR (any other flag goes to Beam)')
    run.add_argument('--input', action='append', required=True, metavar='PATTERN',
                     help='file, directory, glob or bucket prefix; repeatable')
    run.add_argument('--output', required=True, metavar='DIR')
    run.add_argument('--embedder', choices=sorted(EMBEDDERS), default=default_embedder_name(),
                     help='default: minilm when its package is installed, else hash')
    run.add_argument('--device', choices=('auto', 'cpu', 'cuda'), default='auto',
                     help='where the model runs (auto: a GPU when there is one)')
    run.add_argument('--chunk-size', type=int, default=1000, help='bytes of source text')
    run.add_argument('--chunk-overlap', type=int, default=100, help='bytes')
    run.add_argument('--window-bytes', type=_size, default=8 << 20, help='largest single read')
    run.add_argument('--split-bytes', type=_size, default=64 << 20,
                     help='initial split of one object')
    run.add_argument('--pdf-pages-per-split', type=int, default=16)
    run.add_argument('--pdf-page-timeout', type=float, default=60.0,
                     help='seconds one PDF page may take before it is cut off (an error record)')
    run.add_argument('--pdf-max-pages', type=int, default=10000,
                     help='PDFs with more pages fail with a reason')
    run.add_argument('--pdf-max-stream-bytes', type=_size, default=64 << 20,
                     help='largest decompressed PDF stream (bombs fail clearly)')
    run.add_argument('--pdf-max-worker-mb', type=int, default=1024,
                     help='memory of the pypdf process before a page is cut off')
    run.add_argument('--ocr', choices=OCR_ENGINES, default='none',
                     help='OCR image-only PDF pages (tesseract must be installed)')
    run.add_argument('--max-object-bytes', type=_size, default=None,
                     help='skip larger objects (with a reason in the manifest)')
    run.add_argument('--index-type', choices=INDEX_TYPES, default='auto')
    run.add_argument('--index-memory-mb', type=int, default=1024,
                     help='memory budget of the index; auto picks flat, hnsw or ivfpq by it')
    run.add_argument('--store-max-attempts', type=int, default=6,
                     help='attempts per object-store request before the object fails')
    _add_store_flags(run)
    run.add_argument('--embed-batch-size', type=int, default=256, help='chunks per batch')
    run.add_argument('--embed-batch-bytes', type=_size, default=4 << 20,
                     help='text bytes per batch')

    index = sub.add_parser('index', help='(re)build the vector index of DIR (Beam flags run '
                                         'the ivfpq shard stage)')
    index.add_argument('--output', required=True, metavar='DIR')
    index.add_argument('--index-type', choices=INDEX_TYPES, default='auto')
    index.add_argument('--index-memory-mb', type=int, default=1024)
    _add_store_flags(index)

    query = sub.add_parser('query', help='print the chunks nearest to TEXT')
    query.add_argument('--output', required=True, metavar='DIR')
    query.add_argument('-k', type=int, default=10)
    query.add_argument('--json', action='store_true', help='a JSON array instead of text')
    query.add_argument('--uri-prefix', default='', help='only chunks of objects under this URI')
    query.add_argument('text', nargs='+', metavar='TEXT')
    _add_store_flags(query)
    return p


def _add_store_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--s3-endpoint-url', default=None,
                        help='S3-compatible endpoint (MinIO, moto, ...)')
    parser.add_argument('--s3-region', default=None, help='S3 region (default: AWS config)')
    parser.add_argument('--s3-path-style', action='store_true',
                        help='path-style S3 addressing, as MinIO usually needs')


def _store(args) -> StoreConfig:
    """The store settings of `index` and `query`, also applied to Beam's FileSystems."""
    config = store_config(args.s3_endpoint_url, args.s3_region, args.s3_path_style)
    outputs.configure(PipelineOptions(store_beam_args(config, [])))
    return config


def _run(args, beam_args: list[str]) -> int:
    from pipeline import build, report

    opts = RunOptions(
        inputs=args.input, output=args.output, embedder=args.embedder,
        chunk_size=args.chunk_size, chunk_overlap=args.chunk_overlap,
        window_bytes=args.window_bytes, split_bytes=args.split_bytes,
        pdf_pages_per_split=args.pdf_pages_per_split, pdf_page_timeout=args.pdf_page_timeout,
        pdf_max_pages=args.pdf_max_pages, pdf_max_stream_bytes=args.pdf_max_stream_bytes,
        pdf_max_worker_mb=args.pdf_max_worker_mb, ocr=args.ocr,
        max_object_bytes=args.max_object_bytes,
        index_type=args.index_type, index_memory_mb=args.index_memory_mb,
        s3_endpoint_url=args.s3_endpoint_url,
        s3_region=args.s3_region, s3_path_style=args.s3_path_style,
        store_max_attempts=args.store_max_attempts,
        device=args.device, embed_batch_size=args.embed_batch_size,
        embed_batch_bytes=args.embed_batch_bytes,
        beam_args=beam_args)
    result = build.run(opts)
    if result is not None:
        print(report.one_line(result))
    return 0


def _index(args, beam_args: list[str]) -> int:
    from pipeline.build import make_pipeline
    from transforms.index import build_index

    if args.index_type == 'none':
        raise UsageError('--index-type none builds nothing')
    config = _store(args)
    make_pipeline(beam_args, config)  # bad Beam flags fail here, before any work
    meta = build_index(args.output, args.index_type, config, args.index_memory_mb,
                       lambda: make_pipeline(beam_args, config))
    print(f"ragbeam: {meta['type']} index of {meta['count']} vectors in {args.output}")
    return 0


def _query(args) -> int:
    from apache_beam.io.filesystems import FileSystems

    from transforms import index
    from transforms.embed import embedder_for_model

    config = _store(args)
    meta_path = outputs.path(args.output, 'index', 'index.json')
    if not FileSystems.exists(meta_path):
        raise UsageError(f'no index in {args.output} (run `ragbeam run` or `ragbeam index` first)')
    meta = outputs.read_json(meta_path)
    text = ' '.join(args.text)
    vector = embedder_for_model(meta['model']).embed([text])[0]
    results = index.query(args.output, vector, args.k, args.uri_prefix, config)
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return 0
    for rank, r in enumerate(results, 1):
        where = f"{r['uri']}" + (f" p.{r['page']}" if r['page'] else '') + f" [{r['start']}:{r['end']}]"
        snippet = ' '.join(r['text'].split())[:300]
        print(f"{rank:2d}. {r['score']:.3f}  {where}\n    {snippet}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    for ours in ('ragbeam', 'pipeline', 'transforms'):
        logging.getLogger(ours).setLevel(logging.INFO)
    # "No shards found to finalize": Beam's way of saying there were no error records
    logging.getLogger('apache_beam.io.filebasedsink').setLevel(logging.ERROR)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, rest = _parser().parse_known_args(argv)
        if args.command == 'query' and rest:
            raise UsageError(f'unrecognized arguments: {" ".join(rest)}')
        return {'run': lambda: _run(args, rest), 'index': lambda: _index(args, rest),
                'query': lambda: _query(args)}[args.command]()
    except (UsageError, NoMatchError, OutputError) as e:
        print(f'ragbeam: error: {e}', file=sys.stderr)
        return 2
    except BrokenPipeError:  # `ragbeam query ... | head`
        sys.stderr.close()
        return 0
