"""Batching within a bundle, bounded in element count and in total weight (bytes)."""
from __future__ import annotations

from typing import Any, Callable, Iterator

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.windowed_value import WindowedValue


class BatchBounded(beam.DoFn):
    """Collects elements into lists of at most `max_count` elements and about `max_weight`.

    A batch is emitted as soon as either bound is reached (a single element heavier than
    `max_weight` is a batch of its own), and at the end of each bundle. Global window only,
    which is what a batch pipeline has.
    """

    def __init__(self, max_count: int, max_weight: int, weight: Callable[[Any], int]):
        self._max_count = max_count
        self._max_weight = max_weight
        self._weight = weight

    def start_bundle(self) -> None:
        self._batch: list = []
        self._batch_weight = 0

    def process(self, element) -> Iterator[list]:
        w = self._weight(element)
        if self._batch and self._batch_weight + w > self._max_weight:
            yield self._take()
        self._batch.append(element)
        self._batch_weight += w
        if len(self._batch) >= self._max_count or self._batch_weight >= self._max_weight:
            yield self._take()

    def finish_bundle(self) -> Iterator[WindowedValue]:
        if self._batch:
            yield WindowedValue(self._take(), GlobalWindow().max_timestamp(), (GlobalWindow(),))

    def _take(self) -> list:
        batch, self._batch, self._batch_weight = self._batch, [], 0
        return batch
