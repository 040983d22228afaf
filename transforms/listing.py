"""Listing input patterns into ObjectRefs, once per object."""
from __future__ import annotations

from typing import Iterator

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.monitor import WORK
from transforms.store import StoreConfig, StoreError, store_for
from transforms.types import ObjectRef

_listed = Metrics.counter('ragbeam', 'objects_listed')
_listed_bytes = Metrics.counter('ragbeam', 'bytes_listed')


def list_pattern(pattern: str, config: StoreConfig) -> Iterator[ObjectRef]:
    """Every object matching one --input pattern, with size and version, page by page."""
    for ref in store_for(pattern, config).list(pattern):
        _listed.inc()
        _listed_bytes.inc(ref.size)
        WORK.add(objects_listed=1, bytes_listed=ref.size)
        yield ref


class ListObjects(beam.PTransform):
    """Patterns -> (uri, ObjectRef), each object once even when several patterns match it.

    The de-duplication is a GroupByKey of small refs, which also spreads the objects over
    workers.
    """

    def __init__(self, patterns: list[str], config: StoreConfig):
        super().__init__()
        self._patterns = patterns
        self._config = config

    def expand(self, pbegin):
        return (pbegin
                | 'Patterns' >> beam.Create(self._patterns)
                | 'List' >> beam.FlatMap(list_pattern, self._config)
                | 'ByUri' >> beam.Map(lambda ref: (ref.uri, ref)).with_output_types(
                    tuple[str, ObjectRef])
                | 'Group' >> beam.GroupByKey()
                | 'Once' >> beam.MapTuple(lambda uri, refs: (uri, next(iter(refs)))))


class NoMatchError(ValueError):
    """An --input pattern that matches nothing."""


def check_patterns(patterns: list[str], config: StoreConfig) -> None:
    """Fails fast, before a pipeline starts, on a pattern that matches no object."""
    for pattern in patterns:
        try:
            first = next(iter(store_for(pattern, config).list(pattern)), None)
        except (StoreError, OSError) as e:
            raise NoMatchError(f'--input {pattern} cannot be listed: {e}') from e
        if first is None:
            raise NoMatchError(f'--input {pattern} matches no files')
