"""run, open, Corpus, Hit and Report: the whole public API (see the package's docstring)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import pyarrow.dataset as pads

from transforms.store import StoreConfig


@dataclass(frozen=True)
class Hit:
    """One search result: a chunk, where it comes from, and how it ranked.

    `start` and `end` are byte offsets in a text object, or character offsets in the page's
    text for a PDF (`page` is 1-based, None for text). In a hybrid search `dense_rank` and
    `lexical_rank` are the chunk's rank in each list (None where it was not drawn);
    `entities` are the chunk's named entities as (label, text) pairs where the corpus has
    them (--entities spacy), else None.
    """
    chunk_id: str
    uri: str
    page: Optional[int]
    start: int
    end: int
    text: str
    score: float
    dense_rank: Optional[int] = None
    lexical_rank: Optional[int] = None
    entities: Optional[tuple] = None

    @classmethod
    def from_row(cls, row: dict) -> 'Hit':
        entities = row.get('entities')
        return cls(row['chunk_id'], row['uri'], row['page'], row['start'], row['end'],
                   row['text'], row['score'], row.get('dense_rank'), row.get('lexical_rank'),
                   None if entities is None else tuple((e['label'], e['text'])
                                                       for e in entities))


@dataclass(frozen=True)
class Report:
    """What a run listed, read, committed and indexed (its report.json, whole in `data`)."""
    table_version: Optional[int]
    objects_listed: int
    objects_ok: int
    objects_failed: int
    objects_skipped: int
    chunks: int
    wall_seconds: float
    data: dict = field(repr=False, compare=False)

    @classmethod
    def from_json(cls, data: dict) -> 'Report':
        return cls(data.get('run', {}).get('table_version'), data.get('objects_listed', 0),
                   data.get('objects_ok', 0), data.get('objects_failed', 0),
                   data.get('objects_skipped', 0), data.get('chunks', 0),
                   data.get('wall_seconds', 0.0), data)


def run(inputs: Union[str, Sequence[str]], output: str, **options: Any) -> Optional[Report]:
    """Runs the pipeline as `ragbeam run` does: `options` are its flags, named with `_` for
    `-` (`chunk_size=800`, `full=True`, `runner='PrismRunner'`); a name ragbeam does not know
    goes to Beam, as on the command line. Returns the report, or None for a `dry_run`.

    Raises pipeline.options.UsageError (a ValueError) for options no run can use, and
    pipeline.options.JobFailed when the runner lost the job (nothing was committed).
    """
    from pipeline import build
    from pipeline.cli import run_options
    from pipeline.options import RunOptions, flags_by_name, quiet_beam_logs

    quiet_beam_logs()
    ours = flags_by_name(RunOptions)
    argv = [a for uri in ([inputs] if isinstance(inputs, str) else inputs)
            for a in ('--input', str(uri))] + ['--output', str(output)]
    for name, value in options.items():
        flag = ours[name][0] if name in ours else f'--{name}'  # Beam's keep their names
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        elif isinstance(value, (list, tuple)):
            argv += [f'{flag}={v}' for v in value]
        else:
            argv.append(f'{flag}={value}')
    found = build.run(run_options(argv))
    return None if found is None else Report.from_json(found)


class _Version:
    """One index version, its chunk rows and the query embedder, loaded once; queries share
    it across threads (FAISS, tantivy and the row lookup only read)."""

    def __init__(self, output: str, config: StoreConfig, as_of: Optional[int]):
        from transforms.embed import embedder_for_model
        from transforms.index.search import Retriever

        self.retriever = Retriever(output, config, as_of)
        meta = self.retriever.meta
        self.table_version: Optional[int] = meta.get('table_version')
        self.embedder = embedder_for_model(meta['model'])
        self.has_lexical = bool(meta.get('lexical'))
        # load now what the first query would: the searchers and the id64 -> row map
        self.retriever.search(1, self.embedder.embed_queries(['warm-up'])[0], 'warm-up',
                              'hybrid' if self.has_lexical else 'dense')


class Corpus:
    """A committed corpus: its index loaded once, searched from many threads.

    `refresh()` switches to a newer committed version; a search already running finishes
    on the version it started on.
    """

    def __init__(self, output: str, as_of: Optional[int] = None,
                 config: StoreConfig = StoreConfig()):
        from apache_beam.options.pipeline_options import PipelineOptions

        from pipeline.options import store_beam_args
        from transforms import outputs
        from transforms.store import require_credentials

        require_credentials(output, config)
        outputs.configure(PipelineOptions(store_beam_args(config, [])), config)
        self.output, self._as_of, self._config = output, as_of, config
        self._lock = threading.Lock()
        self._current = _Version(output, config, as_of)

    @property
    def has_lexical(self) -> bool:
        """Whether the index has its lexical (BM25) side: hybrid and lexical searches."""
        return self._current.has_lexical

    @property
    def version(self) -> Optional[int]:
        """The table version that searches answer from."""
        return self._current.table_version

    def search(self, text: str, k: int = 10, mode: str = 'hybrid',
               uri_prefix: Optional[str] = None,
               entity: Union[str, tuple[str, str], None] = None) -> list[Hit]:
        """The k best chunks for `text`: `mode` hybrid (dense and BM25 fused), dense or
        lexical; only chunks of URIs starting with `uri_prefix`, and with `entity`
        ('LABEL:TEXT' or (label, text)) only chunks that mention it."""
        from transforms.index.search import parse_entity

        if not isinstance(k, int) or k < 1:
            raise ValueError(f'k must be a positive integer, not {k!r}')
        if isinstance(entity, str):
            entity = parse_entity(entity)
        current = self._current  # this search's version, whatever refresh() does meanwhile
        vector = None if mode == 'lexical' else current.embedder.embed_queries([text])[0]
        rows = current.retriever.search(k, vector, text, mode, uri_prefix or '', entity,
                                        with_entities=True)
        return [Hit.from_row(r) for r in rows]

    def refresh(self) -> bool:
        """Loads the newest committed index if it is newer than the one searched; True if
        it switched. A corpus opened `as_of` a version stays on it."""
        from transforms.index.search import index_meta

        if self._as_of is not None:
            return False
        with self._lock:
            newest = index_meta(self.output).get('table_version')
            if newest == self._current.table_version:
                return False
            self._current = _Version(self.output, self._config, None)
            return True

    def history(self) -> list[dict]:
        """The commits, newest first: version, time, run, settings fingerprint and counts."""
        from pipeline.report import history_rows
        from transforms.corpus import Corpus as Tables

        return history_rows(Tables(self.output, self._storage()).history())

    def report(self) -> Report:
        """The last run's report."""
        from transforms import outputs

        return Report.from_json(outputs.read_json(outputs.path(self.output, 'report.json')))

    def chunks(self) -> pads.Dataset:
        """The chunk table at this corpus's version, as a pyarrow dataset (streams)."""
        return self._table('chunks')

    def manifest(self) -> pads.Dataset:
        """The newest committed manifest: one row per object, with its status and reason."""
        return self._table('manifest')

    def _table(self, name: str) -> pads.Dataset:
        from deltalake import DeltaTable

        from transforms import outputs

        return DeltaTable(outputs.path(self.output, name),
                          version=self.version if name == 'chunks' else None,
                          storage_options=self._storage()).to_pyarrow_dataset()

    def _storage(self) -> Optional[dict]:
        return self._config.delta_storage_options(self.output)


def open(output: str, as_of: Optional[int] = None, *, s3_endpoint_url: Optional[str] = None,
         s3_region: Optional[str] = None, gcs_endpoint_url: Optional[str] = None) -> Corpus:
    """The committed corpus in `output` (a folder, s3:// or gs://), at its newest indexed
    version or at table version `as_of`."""
    return Corpus(output, as_of, StoreConfig(s3_endpoint_url=s3_endpoint_url,
                                             s3_region=s3_region,
                                             gcs_endpoint_url=gcs_endpoint_url))

