"""How a run into a committed corpus decides what to redo: the backfill options."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Optional


@dataclass(frozen=True)
class BackfillOptions:
    """How a run into a committed corpus decides what to redo."""
    full: bool = field(default=False, metadata={
        'flag': '--full',
        'help': 're-read every object and replace the whole corpus, still in one commit'})
    max_delete_fraction: float = field(default=0.5, metadata={
        'flag': '--max-delete-fraction', 'metavar': 'SHARE',
        'help': 'a run that would delete more than this share of the committed objects '
                'deletes nothing and exits non-zero'})
    modified_since: str = field(default='', metadata={
        'flag': '--modified-since', 'metavar': 'ISO_TIME', 'default_text': 'none',
        'help': 're-read only objects last modified at or after this time (2026-11-30, or '
                '2026-11-30T02:00; UTC unless it names a zone); such a run deletes nothing'})
    modified_before: str = field(default='', metadata={
        'flag': '--modified-before', 'metavar': 'ISO_TIME', 'default_text': 'none',
        'help': 're-read only objects last modified before this time; deletes nothing'})
    list_ranges: int = field(default=64, metadata={
        'flag': '--list-ranges', 'metavar': 'N',
        'help': 'split each input into at most N URI ranges, listed and diffed on the workers '
                'in parallel (1: one range per input)'})

    def validate(self) -> None:
        if self.list_ranges < 1:
            raise ValueError('--list-ranges must be at least 1')
        if not 0 <= self.max_delete_fraction <= 1:
            raise ValueError('--max-delete-fraction must be between 0 and 1')
        since, before = self.window()
        if self.full and self.windowed:
            raise ValueError('--full re-reads every object: it does not go with '
                             '--modified-since or --modified-before')
        if since is not None and before is not None and since >= before:
            raise ValueError(f'--modified-since {self.modified_since} is not before '
                             f'--modified-before {self.modified_before}')

    @property
    def windowed(self) -> bool:
        """Whether the run re-reads only a window of last-modified times (and deletes nothing)."""
        return bool(self.modified_since or self.modified_before)

    def window(self) -> tuple[Optional[float], Optional[float]]:
        """[since, before) as seconds since the epoch; None for an open end."""
        return (_epoch('--modified-since', self.modified_since),
                _epoch('--modified-before', self.modified_before))


def _epoch(flag: str, text: str) -> Optional[float]:
    """An ISO date or time as seconds since the epoch; UTC unless it names a zone."""
    if not text:
        return None
    from datetime import datetime, timezone
    try:
        moment = datetime.fromisoformat(text.strip().replace('Z', '+00:00'))
    except ValueError:
        raise ValueError(f'{flag} {text!r}: expected an ISO date or time, for example '
                         '2026-11-30 or 2026-11-30T02:00:00+01:00') from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def in_window(modified: float, window: tuple[Optional[float], Optional[float]]) -> bool:
    """Whether a last-modified time is in [since, before); an unknown time (0) always is."""
    since, before = window
    if not modified:
        return True
    return (since is None or modified >= since) and (before is None or modified < before)


def fingerprint(settings: dict) -> str:
    """The settings fingerprint: what makes the same object give other chunks or vectors."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
