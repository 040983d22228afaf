"""Text encoding detection from a bounded prefix of an object.

The decision uses only the first DETECT_BYTES of the object (and its size), so every
restriction of one object reaches the same answer without reading the whole object.
"""
from __future__ import annotations

import codecs
from dataclasses import dataclass

DETECT_BYTES = 64 * 1024

# Legacy multi-byte codecs: a byte below 0x30 is never part of a multi-byte character in
# any of them (GB18030 uses 0x30-0x39 as trail bytes, so digits are not safe).
MULTIBYTE_CODECS = frozenset({
    'big5', 'big5hkscs', 'cp950', 'gb2312', 'gbk', 'gb18030', 'cp936', 'shift_jis', 'cp932',
    'shift_jis_2004', 'shift_jisx0213', 'euc_jp', 'euc_jis_2004', 'euc_jisx0213', 'euc_kr',
    'cp949', 'johab',
})
# Codecs whose meaning of a byte depends on earlier escape sequences: no local decoding.
STATEFUL_CODECS = frozenset({
    'iso2022_jp', 'iso2022_jp_1', 'iso2022_jp_2', 'iso2022_jp_2004', 'iso2022_jp_3',
    'iso2022_jp_ext', 'iso2022_kr', 'utf_7', 'hz',
})

_BOMS = (  # longest first: the UTF-32 LE BOM starts with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, 'utf-32-le'),
    (codecs.BOM_UTF32_BE, 'utf-32-be'),
    (codecs.BOM_UTF8, 'utf-8'),
    (codecs.BOM_UTF16_LE, 'utf-16-le'),
    (codecs.BOM_UTF16_BE, 'utf-16-be'),
)


class UndecodableError(ValueError):
    """The object is not text in any encoding ragbeam can chunk."""


@dataclass(frozen=True)
class TextEncoding:
    """How an object's bytes decode: codec, byte-order-mark length, code unit and family."""
    codec: str   # Python codec name written to the chunk's `encoding` column
    bom: int     # bytes of byte-order mark at offset 0, never part of a chunk
    unit: int    # bytes per code unit: 1, 2 (UTF-16) or 4 (UTF-32)
    family: str  # 'utf8' | 'single' | 'multibyte' | 'wide'


def detect_encoding(head: bytes, size: int) -> TextEncoding:
    """Decides the encoding from `head` (the object's first bytes) and its total `size`.

    Order: byte-order mark; UTF-16 without BOM (NUL bytes on one parity only); valid UTF-8;
    else a legacy codec from charset-normalizer. Raises UndecodableError for binary data.
    """
    for bom, codec in _BOMS:
        if head.startswith(bom) and not _utf16_bom_then_nul(bom, size):
            return _encoding(codec, len(bom))
    wide = _utf16_without_bom(head, size)
    if wide:
        return _encoding(wide, 0)
    try:
        codecs.getincrementaldecoder('utf-8')().decode(head, final=len(head) >= size)
        return _encoding('utf-8', 0)
    except UnicodeDecodeError:
        pass
    return _legacy_encoding(head)


def _utf16_bom_then_nul(bom: bytes, size: int) -> bool:
    """FF FE 00 00 is also UTF-16 LE's mark before a NUL: not UTF-32 when the size says so."""
    return bom == codecs.BOM_UTF32_LE and (size - len(bom)) % 4 != 0


def _encoding(codec: str, bom: int) -> TextEncoding:
    name = codecs.lookup(codec).name
    if name.startswith('utf-16'):
        return TextEncoding(codec, bom, 2, 'wide')
    if name.startswith('utf-32'):
        return TextEncoding(codec, bom, 4, 'wide')
    if name == 'utf-8':
        return TextEncoding('utf-8', bom, 1, 'utf8')
    py_name = name.replace('-', '_')
    if py_name in STATEFUL_CODECS:
        raise UndecodableError(f'stateful encoding {name} cannot be decoded in ranges')
    family = 'multibyte' if py_name in MULTIBYTE_CODECS else 'single'
    return TextEncoding(name, bom, 1, family)


def _utf16_without_bom(head: bytes, size: int) -> str | None:
    """'utf-16-le'/'utf-16-be' when NUL bytes sit on one byte parity only, as in ASCII-heavy UTF-16."""
    n = len(head) - len(head) % 2
    if size % 2 or n < 4:
        return None
    even_nul = head[0:n:2].count(0) / (n // 2)
    odd_nul = head[1:n:2].count(0) / (n // 2)
    for codec, high, low in (('utf-16-le', odd_nul, even_nul), ('utf-16-be', even_nul, odd_nul)):
        if high >= 0.3 and low <= 0.05:
            try:
                codecs.getincrementaldecoder(codec)().decode(head[:n], final=False)
                return codec
            except UnicodeDecodeError:
                return None
    return None


# charset-normalizer's own ranking puts coherence (a language model) before small chaos
# differences: it read a short French ISO-8859-1 text as cp775 (Baltic). We rank by chaos
# first. A Western code page wins when its chaos is within WESTERN_TOLERANCE of the best
# (the mess detector gives Portuguese "maçã" 0.03 in cp1252 and its mojibake "maçă" 0.0 in
# cp1250), unless a codec with the best chaos is clearly more coherent (Turkish in cp1254).
# Otherwise the most coherent codec of the best chaos wins, ties to the most widely used.
_WESTERN = ('cp1252', 'latin_1', 'iso8859_15')
WESTERN_TOLERANCE = 0.05
COHERENCE_MARGIN = 0.03
_PREFERRED = ('cp1251', 'koi8_r', 'cp1250', 'iso8859_2', 'shift_jis', 'cp932', 'euc_jp',
              'gb18030', 'gbk', 'big5', 'euc_kr', 'cp949')


def _legacy_encoding(head: bytes) -> TextEncoding:
    from charset_normalizer import from_bytes

    # every codec that decodes the head exactly as a match does, with that match's scores
    scores: dict[str, tuple[float, float]] = {}
    for match in from_bytes(head):
        for codec in match.could_be_from_charset:
            scores.setdefault(codec, (match.chaos, match.coherence))
    if not scores:
        raise UndecodableError('not text: no known encoding decodes its first bytes')
    best_chaos = min(chaos for chaos, _ in scores.values())
    tied = {c for c, (chaos, _) in scores.items() if chaos == best_chaos}
    most_coherent = max(scores[c][1] for c in tied)
    western = [c for c in _WESTERN if c in scores
               and scores[c][0] <= best_chaos + WESTERN_TOLERANCE
               and scores[c][1] >= most_coherent - COHERENCE_MARGIN]
    rank = lambda c: (-scores[c][1], _PREFERRED.index(c) if c in _PREFERRED  # noqa: E731
                      else len(_PREFERRED), c)
    return _encoding(western[0] if western else min(tied, key=rank), 0)
