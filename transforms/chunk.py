"""The split-invariant chunk rule.

Chunk k of an object has the nominal start k * size (bytes from the object's first byte).
Its real start B_k is the best break in the look-back window [k*size - lookback, k*size]:
paragraph > line > sentence > space > character boundary, the latest of the best class.
B_k is computed from a fixed slice of bytes around k*size alone, so it is the same whatever
window, split point or worker saw it. Chunk k spans [B_k - overlap', B_(k+1)), where the
overlap start is the first word start at or after B_k - overlap.

Like textio's records, chunk k belongs to the restriction holding its nominal start, and
that restriction reads past its end to finish the chunk.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

from transforms.decode import TextEncoding

CONTEXT = 16  # bytes of context around a candidate break (UTF-32 needs 4 per character)

# Break classes, best first; a break is the position right after the match.
_NL = r'(?:\r\n|\n|\r(?!\n))'
_PATTERNS = (
    ('paragraph', _NL + r'[ \t\f\v]*' + _NL),
    ('line', _NL),
    ('sentence', r'[.!?]["\')\]]*[ \t]+'),
    ('space', r'[ \t\f\v]+'),
)
_CJK_SENTENCE = '[\u3002\uff01\uff1f]'


def _compile_str(cjk: bool) -> tuple:
    pats = []
    for name, pat in _PATTERNS:
        if name == 'sentence' and cjk:
            pat = f'(?:{pat}|{_CJK_SENTENCE})'
        pats.append(re.compile(f'(?=({pat}))'))
    return tuple(pats)


def _compile_bytes(utf8: bool) -> tuple:
    pats = []
    for name, pat in _PATTERNS:
        p = pat.encode('ascii')
        if name == 'sentence' and utf8:
            enders = b'|'.join(re.escape(c.encode('utf-8')) for c in '\u3002\uff01\uff1f')
            p = b'(?:' + p + b'|' + enders + b')'
        pats.append(re.compile(b'(?=(' + p + b'))'))
    return tuple(pats)


_STR_PATTERNS = _compile_str(cjk=True)
_UTF8_PATTERNS = _compile_bytes(utf8=True)
_ASCII_PATTERNS = _compile_bytes(utf8=False)


@dataclass(frozen=True)
class ChunkerSettings:
    """Chunk size and overlap, in bytes of source text."""
    size: int = field(default=1000, metadata={
        'flag': '--chunk-size', 'help': 'target chunk size in bytes of source text (at least 64)'})
    overlap: int = field(default=100, metadata={
        'flag': '--chunk-overlap',
        'help': 'bytes of overlap with the previous chunk (at most half the chunk size)'})

    @property
    def lookback(self) -> int:
        """How far before a nominal start the chunker looks for a good break."""
        return self.size // 5

    def reach(self) -> int:
        """How far past a restriction's end its last chunk usually reads (without long runs
        of text that has no character boundary)."""
        return self.size + self.lookback + 2 * CONTEXT

    def validate(self) -> None:
        if self.size < 64:
            raise ValueError('--chunk-size must be at least 64 bytes')
        if not 0 <= self.overlap <= self.size // 2:
            raise ValueError('--chunk-overlap must be between 0 and half of --chunk-size')

    def tag(self) -> str:
        """The settings as they enter chunk IDs; bump the rule version when the rule changes."""
        return f'chunk-rule-v1/size={self.size}/overlap={self.overlap}'


def chunk_id(uri: str, version: str, page: Optional[int], start: int, end: int,
             settings_tag: str) -> tuple[str, int]:
    """The deterministic (hex digest, signed 64-bit id) of one chunk."""
    key = '\x1f'.join(('ragbeam', uri, version, '' if page is None else str(page),
                       str(start), str(end), settings_tag))
    digest = hashlib.sha256(key.encode('utf-8')).digest()
    return digest.hex(), int.from_bytes(digest[:8], 'big', signed=True)


Fetch = Callable[[int, int], bytes]


class ChunkRule:
    """Computes chunk spans of one object from bytes fetched around each nominal start."""

    def __init__(self, settings: ChunkerSettings, encoding: TextEncoding, size: int):
        self.settings = settings
        self.enc = encoding
        self.size = size
        if encoding.family in ('utf8', 'multibyte'):
            self._patterns = _UTF8_PATTERNS if encoding.family == 'utf8' else _ASCII_PATTERNS
        else:
            self._patterns = _STR_PATTERNS

    def first_chunk_at_or_after(self, pos: int) -> int:
        """Index of the first chunk whose nominal start is >= pos."""
        return -(-pos // self.settings.size)

    def nominal(self, k: int) -> int:
        return k * self.settings.size

    def first_byte_needed(self, k: int) -> int:
        """The lowest byte that chunk k's start depends on; reads for k can begin there."""
        if k == 0:
            return 0
        return max(0, self.nominal(k) - self.settings.lookback - self.settings.overlap - 2 * CONTEXT)

    def bytes_to_keep(self) -> int:
        """How far before a chunk's end the next chunk's start may still look."""
        return self.settings.overlap + 2 * CONTEXT

    def spans(self, fetch: Fetch, claim: Callable[[int], bool], first: int
              ) -> Iterator[tuple[int, int]]:
        """Yields (start, end) of chunks first, first+1, ... while `claim(nominal start)` holds.

        A chunk whose look-back window has no character boundary has no start of its own: it
        is merged into the previous chunk and yields nothing.
        """
        k = first
        boundary = self._boundary(fetch, k)
        while claim(self.nominal(k)):
            nxt = k + 1
            end = self._boundary(fetch, nxt)
            while end is None:
                nxt += 1
                end = self._boundary(fetch, nxt)
            if boundary is not None and boundary < end:
                yield self._overlap_start(fetch, boundary, k), end
            # chunks k+1 .. nxt-1 have no boundary: claim them with nothing to yield
            for skipped in range(k + 1, nxt):
                if not claim(self.nominal(skipped)):
                    return
            k, boundary = nxt, end

    def _boundary(self, fetch: Fetch, k: int) -> Optional[int]:
        """B_k (the object's end past the last chunk), or None when no character boundary exists."""
        if k == 0:
            return self.enc.bom
        nominal = self.nominal(k)
        if nominal >= self.size:
            return self.size
        return self._find_break(fetch, nominal - self.settings.lookback, nominal, best=True)

    def _overlap_start(self, fetch: Fetch, boundary: int, k: int) -> int:
        """The first word start at or after boundary - overlap (the boundary itself if none)."""
        if k == 0 or self.settings.overlap == 0:
            return boundary
        found = self._find_break(fetch, boundary - self.settings.overlap, boundary, best=False)
        return boundary if found is None else found

    def _find_break(self, fetch: Fetch, lo: int, hi: int, best: bool) -> Optional[int]:
        """A break p in [lo, hi], from the fixed slice [lo - CONTEXT, hi + CONTEXT) alone.

        best=True: the latest break of the best class, falling back to the latest character
        boundary. best=False: the earliest break of any class, else the earliest boundary.
        """
        unit, bom = self.enc.unit, self.enc.bom
        lo = max(lo, bom + 1)
        a = max(bom, lo - CONTEXT)
        a = bom + (a - bom) // unit * unit
        data = fetch(a, min(self.size, hi + CONTEXT))
        view = data if self._patterns is not _STR_PATTERNS else self._decode_view(data)
        found = []
        for pattern in self._patterns:
            for m in pattern.finditer(view):
                i = m.start() + len(m.group(1))
                p = a + i * unit
                if lo <= p <= hi and self._is_char_boundary(view, i, p):
                    found.append(p)
            if found and best:
                return max(found)
        if found:
            return min(found)
        first_aligned = lo + (-(lo - bom)) % unit
        last_aligned = hi - (hi - bom) % unit
        positions = (range(last_aligned, lo - 1, -unit) if best
                     else range(first_aligned, hi + 1, unit))
        for p in positions:
            if self._is_char_boundary(view, (p - a) // unit, p):
                return p
        return None

    def _decode_view(self, data: bytes) -> str:
        """Decodes an aligned slice so that character i starts at byte i * unit."""
        if self.enc.family == 'wide':
            return data[:len(data) - len(data) % self.enc.unit].decode(
                self.enc.codec, errors='surrogatepass' if self.enc.unit == 2 else 'replace')
        return data.decode(self.enc.codec, errors='replace')  # single-byte: one char per byte

    def _is_char_boundary(self, view, i: int, p: int) -> bool:
        """Whether absolute position p (index i of the view) falls between two characters."""
        if i >= len(view):
            return p >= self.size
        family = self.enc.family
        if family == 'utf8':
            return not 0x80 <= view[i] <= 0xBF
        if family == 'multibyte':
            return i > 0 and view[i - 1] < 0x30
        if family == 'wide' and self.enc.unit == 2:
            return not ('\udc00' <= view[i] <= '\udfff' and i > 0 and '\ud800' <= view[i - 1] <= '\udbff')
        return True


_UTF32 = TextEncoding('utf-32-le', 0, 4, 'wide')


def text_spans(text: str, settings: ChunkerSettings) -> list[tuple[int, int]]:
    """Chunk spans of an in-memory text (a PDF page), in character offsets.

    The same rule as for text objects, applied to the text's UTF-32 code units, so that
    `chunk_size` counts characters here.
    """
    data = text.encode('utf-32-le', errors='surrogatepass')
    wide = ChunkerSettings(settings.size * 4, settings.overlap * 4)
    rule = ChunkRule(wide, _UTF32, len(data))
    fetch = lambda a, b: data[a:b]  # noqa: E731
    return [(s // 4, e // 4) for s, e in rule.spans(fetch, lambda pos: pos < len(data), 0)]
