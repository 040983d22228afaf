"""The input patterns as the listing sees them: URIs, their literal prefix, and a check
before any pipeline starts that each pattern matches something.

The listing itself runs on the workers, in URI ranges (transforms.corpus.diff)."""
from __future__ import annotations

import os
from typing import Iterable, Optional

from transforms.store import StoreConfig, StoreError, glob_to_prefix, key_after_all, store_for
from transforms.types import ObjectRef


def scopes(patterns: Iterable[str]) -> list[str]:
    """The input patterns as the listing's URIs spell them (local paths absolute)."""
    return [p if '://' in p else os.path.abspath(os.path.expanduser(p)) for p in patterns]


def first_object(pattern: str, config: StoreConfig) -> Optional[ObjectRef]:
    """The first object, in URI order, that `pattern` matches; listed page by page, so a
    pattern over millions of objects costs one page when it matches early."""
    pattern, = scopes([pattern])
    literal, matches = glob_to_prefix(pattern)
    store = store_for(pattern, config)
    return next((r for r in store.walk(store.root(literal), literal or None,
                                       key_after_all(literal)) if matches(r.uri)), None)


class NoMatchError(ValueError):
    """An --input pattern that matches nothing."""


def check_patterns(patterns: list[str], config: StoreConfig) -> None:
    """Fails fast, before a pipeline starts, on a pattern that matches no object."""
    for pattern in patterns:
        try:
            first = first_object(pattern, config)
        except (StoreError, OSError) as e:
            raise NoMatchError(f'--input {pattern} cannot be listed: {e}') from e
        if first is None:
            raise NoMatchError(f'--input {pattern} matches no files')
