"""The `ragbeam` command: run, index, query, report, history."""
from __future__ import annotations

import os

# Arrow's default allocator (mimalloc) keeps what the Parquet writer freed: a minilm run over
# the shared corpus peaks ~50 MB higher with it than with the system allocator, which gives
# memory back. Arrow reads this once, at its first allocation, so it is set before any import
# of pyarrow; worker processes started from here inherit it.
os.environ.setdefault('ARROW_DEFAULT_MEMORY_POOL', 'system')


from transforms import heap  # noqa: E402  (before any import that allocates much)

heap.bound()

import argparse
import json
import logging
import sys
from typing import Optional, Sequence

from apache_beam.options.pipeline_options import PipelineOptions

from pipeline.options import (JobFailed, RunOptions, UsageError, add_flags, from_args,
                              quiet_beam_logs, size_arg, store_beam_args)
from transforms import outputs
from transforms.index import IndexOptions, MissingChunksError
from transforms.listing import NoMatchError
from transforms.outputs import OutputError
from transforms.store import StoreConfig, StoreError, require_credentials


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as one line through UsageError."""

    def error(self, message: str):
        raise UsageError(message)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'not a whole number: {text!r}')
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be at least 1, not {value}')
    return value


def parser() -> argparse.ArgumentParser:
    """The whole command line; every ragbeam option comes from an option dataclass."""
    p = _Parser(prog='ragbeam', description='Documents in buckets -> chunks, embeddings, index.')
    sub = p.add_subparsers(dest='command', required=True, parser_class=_Parser)

    run = sub.add_parser('run', help='ingest objects into DIR (any other flag goes to Beam)')
    run.add_argument('--input', action='append', required=True, metavar='PATTERN',
                     help='file, directory, glob or bucket prefix; repeatable')
    run.add_argument('--output', required=True, metavar='DIR')
    add_flags(run, RunOptions)

    index = sub.add_parser('index', help='(re)build the vector index of DIR (Beam flags run '
                                         'the ivfpq shard stage)')
    index.add_argument('--output', required=True, metavar='DIR')
    add_flags(index, IndexOptions)
    add_flags(index, StoreConfig)

    query = sub.add_parser('query', help='print the chunks nearest to TEXT')
    query.add_argument('--output', required=True, metavar='DIR')
    query.add_argument('-k', type=_positive, default=10, help='how many chunks (default: 10)')
    query.add_argument('--json', action='store_true', help='a JSON array instead of text')
    query.add_argument('--uri-prefix', default='', help='only chunks of objects under this URI')
    query.add_argument('--entity', metavar='LABEL:TEXT', default=None,
                       help='only chunks that mention this named entity (runs with --entities '
                            'spacy), e.g. PERSON:Ada Lovelace, GPE:Paris')
    query.add_argument('--mode', choices=('hybrid', 'dense', 'lexical'), default=None,
                       help='hybrid: the vector and BM25 lists fused (the default where the '
                            'index has its lexical side); dense: vectors only; lexical: BM25 '
                            'only')
    query.add_argument('--fusion', choices=('convex', 'rrf'), default='convex',
                       help='how hybrid fuses: convex (0.6 x BM25 + 0.4 x vector score, each '
                            'min-max scaled; the default, measured best) or rrf (reciprocal '
                            'rank, k = 60)')
    query.add_argument('--as-of', type=int, metavar='VERSION', default=None,
                       help='search the index of an older table version (ragbeam history '
                            'lists them), if it is still kept')
    query.add_argument('text', nargs='+', metavar='TEXT')
    add_flags(query, StoreConfig)

    compact = sub.add_parser('compact', help="rewrite DIR's small or fragmented table files "
                                             'into well-sized ones, in one commit; the index '
                                             'follows (Beam flags run its ivfpq shard stage)')
    compact.add_argument('--output', required=True, metavar='DIR')
    add_flags(compact, StoreConfig)

    evaluate = sub.add_parser('eval', help="recall@k of DIR's index on a file of questions, "
                                           'per mode and kind')
    evaluate.add_argument('--output', required=True, metavar='DIR')
    evaluate.add_argument('--questions', required=True, metavar='FILE',
                          help='tab-separated: id, file, question, answer_start, answer_end, '
                               'answer_text, kind (as ../shared/corpus/questions.tsv)')
    evaluate.add_argument('-k', type=int, default=10, help='hits looked at per question')
    evaluate.add_argument('--mode', action='append', choices=('hybrid', 'dense', 'lexical'),
                          help='repeatable (default: every mode the index has)')
    evaluate.add_argument('--json', action='store_true',
                          help='print the recall and each question\'s rank as JSON')
    add_flags(evaluate, StoreConfig)

    serve = sub.add_parser('serve', help="serve DIR over HTTP: a search API and page, and "
                                         'with --uploads, documents posted and indexed (any '
                                         'other flag is a run flag for the uploads\' runs)')
    serve.add_argument('--output', required=True, metavar='DIR')
    serve.add_argument('--host', default='127.0.0.1',
                       help='address to bind (default: 127.0.0.1); another than loopback '
                            'needs --token-file')
    serve.add_argument('--port', type=int, default=8080, help='(default: 8080)')
    serve.add_argument('--token-file', metavar='FILE',
                       help='a file holding the bearer token that uploads must send')
    serve.add_argument('--uploads', metavar='LOCATION',
                       help='accept documents (POST /api/documents) into this folder, s3:// '
                            'or gs:// location, and index them into DIR')
    serve.add_argument('--max-upload-bytes', type=size_arg, default=50 * 2**20, metavar='BYTES',
                       help='a larger upload is refused with 413 while it streams '
                            '(default: 50 MiB)')
    add_flags(serve, StoreConfig)

    history = sub.add_parser('history', help="list the corpus's commits in DIR")
    history.add_argument('--output', required=True, metavar='DIR')
    history.add_argument('--json', action='store_true', help='a JSON array instead of text')
    add_flags(history, StoreConfig)

    summary = sub.add_parser('report', help="print the summary table of DIR's last run")
    summary.add_argument('--output', required=True, metavar='DIR')
    summary.add_argument('--png', metavar='FILE', default=None,
                         help='also draw RSS and throughput over time (needs matplotlib)')
    summary.add_argument('--json', action='store_true', help='print report.json instead')
    add_flags(summary, StoreConfig)
    return p


def _store(args) -> StoreConfig:
    """The store settings of `index`, `query`, `report` and `history`, also applied to Beam's
    FileSystems; an output on S3 without credentials fails here, in one line."""
    config = from_args(StoreConfig, args)
    try:
        require_credentials(args.output, config)
    except StoreError as e:
        raise UsageError(str(e)) from e
    outputs.configure(PipelineOptions(store_beam_args(config, [])), config)
    return config


def run_options(argv: Sequence[str]) -> RunOptions:
    """The RunOptions of `ragbeam run ARGV` (ARGV without the word run)."""
    args, beam_args = parser().parse_known_args(['run', *argv])
    return _run_options(args, beam_args)


def _run_options(args, beam_args: list[str]) -> RunOptions:
    return from_args(RunOptions, args, inputs=args.input, output=args.output,
                     beam_args=beam_args)


def _run(args, beam_args: list[str]) -> int:
    from pipeline import build, report

    result = build.run(_run_options(args, beam_args))
    if result is not None:
        print(report.one_line(result))
    return 0


def _index(args, beam_args: list[str]) -> int:
    from pipeline.build import make_pipeline
    from transforms.index import build_index

    options = from_args(IndexOptions, args)
    if options.type == 'none':
        raise UsageError('--index-type none builds nothing')
    config = _store(args)
    make_pipeline(beam_args, config)  # bad Beam flags fail here, before any work
    from transforms.corpus import Corpus

    version = Corpus(args.output, config.delta_storage_options(args.output)).version
    meta = build_index(args.output, options.type, config, options.memory_mb,
                       lambda: make_pipeline(beam_args, config), table_version=version,
                       keep_versions=options.versions, lexical=options.lexical)
    print(f"ragbeam: {meta['type']} index of {meta['count']} vectors in {args.output}")
    return 0


def _compact(args, beam_args: list[str]) -> int:
    from pipeline.build import follow_index, make_pipeline
    from transforms.corpus import CommitError, Corpus, new_run_id

    config = _store(args)
    make_pipeline(beam_args, config)  # bad Beam flags fail here, before any work
    storage = config.delta_storage_options(args.output)
    Corpus(args.output, storage).roll_forward()  # a commit whose driver died half-way
    corpus, run_id = Corpus(args.output, storage), new_run_id()
    try:
        done = corpus.compact(run_id)
    except CommitError as e:
        corpus.clean_staging(run_id)
        raise UsageError(str(e))
    if not done.committed:
        corpus.clean_staging(run_id)
        print(f'ragbeam: nothing to compact in {args.output} (table version {done.version})')
        return 0
    meta = follow_index(args.output, done.version, config,
                        lambda: make_pipeline(beam_args, config))
    print(f'ragbeam: compacted {done.files_rewritten} files ({done.bytes_rewritten:,} bytes '
          f'written) in {done.seconds} s; table version {done.version}'
          + (f", index of {meta['count']} vectors" if meta else ''))
    return 0


def _query(args) -> int:
    from transforms import index
    from transforms.embed import embedder_for_model

    config = _store(args)
    try:
        entity = index.parse_entity(args.entity) if args.entity else None
    except ValueError as e:
        raise UsageError(str(e))
    try:
        meta = index.index_meta(args.output, args.as_of)
        mode = index.query_mode(meta, args.mode)
    except (index.NoIndexError, ValueError) as e:
        raise UsageError(str(e))
    text = ' '.join(args.text)
    vector = (None if mode == 'lexical'
              else embedder_for_model(meta['model']).embed_queries([text])[0])
    try:
        results = index.query(args.output, vector, args.k, args.uri_prefix, config, entity,
                              meta.get('table_version'), text=text, mode=mode,
                              fusion=args.fusion)
    except ValueError as e:  # e.g. --entity on an output without entities
        raise UsageError(str(e))
    if args.json:
        print(json.dumps(results, ensure_ascii=False, indent=2))
        return 0
    for rank, r in enumerate(results, 1):
        where = f"{r['uri']}" + (f" p.{r['page']}" if r['page'] else '') + f" [{r['start']}:{r['end']}]"
        snippet = ' '.join(r['text'].split())[:300]
        lists = (' (' + ', '.join(f"{name} #{r[name + '_rank'] or '-'}"
                                  for name in ('dense', 'lexical')) + ')'
                 if mode == 'hybrid' else '')
        print(f"{rank:2d}. {r['score']:.4f}{lists}  {where}\n    {snippet}")
    return 0


def _report(args) -> int:
    from apache_beam.io.filesystems import FileSystems

    from pipeline import report

    _store(args)
    path = outputs.path(args.output, 'report.json')
    if not FileSystems.exists(path):
        raise UsageError(f'no report in {args.output} (run `ragbeam run` first)')
    found = outputs.read_json(path)
    print(json.dumps(found, indent=2) if args.json else report.table(found))
    if args.png:
        report.draw(found, args.png)
        print(f'ragbeam: wrote {args.png}', file=sys.stderr)
    return 0


def _eval(args) -> int:
    from ragbeam import Corpus
    from ragbeam.evaluate import evaluate, read_questions, table
    from transforms.index import NoIndexError

    config = _store(args)
    try:
        questions = read_questions(args.questions)
        corpus = Corpus(args.output, config=config)
    except (OSError, NoIndexError) as e:
        raise UsageError(str(e))
    modes = args.mode or (('hybrid', 'dense', 'lexical') if corpus.has_lexical else ('dense',))
    try:
        result = evaluate(corpus, questions, args.k, modes)
    except ValueError as e:  # a lexical mode on an index without its lexical side
        raise UsageError(str(e))
    print(json.dumps(result, indent=2) if args.json else table(result))
    return 0


def _serve(args, run_args: list[str]) -> int:
    from ragbeam.serve import is_loopback, read_token, serve
    from transforms.index import NoIndexError

    config = _store(args)
    if not is_loopback(args.host) and not args.token_file:
        raise UsageError(f'--host {args.host} serves beyond this machine: give --token-file '
                         'with the bearer token that uploads must send')
    try:
        token = read_token(args.token_file) if args.token_file else None
    except (OSError, ValueError) as e:
        raise UsageError(str(e))
    run_args = [*run_args, *store_args(args)]
    if args.uploads:
        _check_upload_settings(run_options(['--input', args.uploads, '--output', args.output,
                                            *run_args]), config)
    print(f'ragbeam: serving {args.output} on http://{args.host}:{args.port}/'
          + (f', uploads into {args.uploads}' if args.uploads else ''), flush=True)
    try:
        serve(args.output, args.host, args.port, token, args.uploads, args.max_upload_bytes,
              run_args, config)
    except NoIndexError as e:
        raise UsageError(str(e))
    return 0


def _check_upload_settings(opts: RunOptions, config: StoreConfig) -> None:
    """The uploads' runs must make chunks as the corpus's were made: one corpus never mixes
    settings (a run with others would redo only the uploads)."""
    from pipeline.build import settings
    from transforms.corpus import Corpus, fingerprint

    opts.validate()
    commits = Corpus(opts.output, config.delta_storage_options(opts.output)).history(1)
    made = commits[0].get('ragbeam_fingerprint') if commits else None
    if made and made != fingerprint(settings(opts)):
        raise UsageError(f'{opts.output} was made with other run settings than the uploads\' '
                         'runs would use (chunker, embedder, PDF engine, OCR or entities): give '
                         'serve the run flags it was made with (its report.json, "options")')


def store_args(args) -> list[str]:
    """The store flags given to a command, as flags again (for the runs it starts)."""
    from pipeline.options import flag_fields

    found = []
    for dest, f, hint in flag_fields(StoreConfig):
        value = getattr(args, dest, None)
        if value is None or value is False or value == f.default:
            continue
        found += [f.metadata['flag']] if value is True else [f.metadata['flag'], str(value)]
    return found


def _history(args) -> int:
    from transforms.corpus import Corpus

    config = _store(args)
    commits = Corpus(args.output, config.delta_storage_options(args.output)).history()
    if not commits:
        raise UsageError(f'no committed corpus in {args.output} (run `ragbeam run` first)')
    from pipeline.report import history_rows

    rows = history_rows(commits)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'version':>7}  {'time':<20}  {'fingerprint':<16}  {'new':>5} {'changed':>7} "
          f"{'retried':>7} {'unchanged':>9} {'deleted':>7} {'failed':>6}")
    for r in rows:
        print(f"{r['version']:>7}  {r['time']:<20}  {r['fingerprint'] or '-':<16}  "
              f"{r.get('objects_new', 0):>5} {r.get('objects_changed', 0):>7} "
              f"{r.get('objects_retried', 0):>7} {r.get('objects_unchanged', 0):>9} "
              f"{r.get('objects_deleted', 0):>7} {r.get('objects_read_failed', 0):>6}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.WARNING, format='%(message)s')
    for ours in ('ragbeam', 'pipeline', 'transforms'):
        logging.getLogger(ours).setLevel(logging.INFO)
    quiet_beam_logs()
    argv = list(sys.argv[1:] if argv is None else argv)
    code = _main(argv)
    if 'deltalake' in sys.modules:
        # delta-rs's runtime threads can abort the interpreter's teardown ("terminate called
        # without an active exception", delta-io/delta-rs#2184) after the work is done and
        # committed: leave without the teardown, once everything is flushed.
        # os._exit skips the atexit handlers, among them Beam's stop of the engine process
        # it started (Prism, a Flink job server): run them first, or each run leaves one.
        import atexit
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _main(argv: list[str]) -> int:
    try:
        args, rest = parser().parse_known_args(argv)
        if args.command in ('query', 'report', 'history', 'eval') and rest:
            raise UsageError(f'unrecognized arguments: {" ".join(rest)}')
        return {'run': lambda: _run(args, rest), 'index': lambda: _index(args, rest),
                'compact': lambda: _compact(args, rest),
                'query': lambda: _query(args), 'report': lambda: _report(args),
                'history': lambda: _history(args), 'eval': lambda: _eval(args),
                'serve': lambda: _serve(args, rest)}[args.command]()
    except (UsageError, NoMatchError, OutputError, MissingChunksError) as e:
        print(f'ragbeam: error: {e}', file=sys.stderr)
        return 2
    except JobFailed as e:
        print(f'ragbeam: error: {e}', file=sys.stderr)
        return 1
    except BrokenPipeError:  # `ragbeam query ... | head`
        sys.stderr.close()
        return 0
