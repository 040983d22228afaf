"""Driving the real splittable DoFns outside a runner, with the splits runners make."""
from __future__ import annotations

from typing import Callable, Optional

from transforms.types import Chunk


def run_splittable(fn, element, split_at: Callable[[int], Optional[float]] = lambda n: None
                   ) -> tuple[list, int]:
    """Processes `element` with the DoFn's own initial splits and restriction trackers, the
    way Dataflow and Prism do: after the n-th output of a restriction, `split_at(n)` may name
    a fraction of the remainder to split off (`tracker.try_split`); each residual is
    processed later as a restriction of its own. Returns every output and the number of
    splits the trackers accepted. Each restriction must end done (`check_done`)."""
    queue = list(fn.split(element, fn.initial_restriction(element)))
    outputs, splits = [], 0
    while queue:
        tracker = fn.create_tracker(queue.pop(0))
        for n, out in enumerate(fn.process(element, tracker=tracker), 1):
            outputs.append(out)
            fraction = split_at(n)
            if fraction is not None:
                split = tracker.try_split(fraction)
                if split is not None:
                    queue.append(split[1])
                    splits += 1
        tracker.check_done()
    return outputs, splits


def chunks_of(outputs: list) -> list[tuple[int, int, str, str]]:
    """(start, end, text, chunk_id) of the Chunk outputs, sorted."""
    return sorted((c.start, c.end, c.text, c.chunk_id) for c in outputs if isinstance(c, Chunk))
