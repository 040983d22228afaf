"""Property tests of the chunk rule, through the real text DoFn: split points, dynamic splits
and windows never change the chunks."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.helpers import chunks_of, run_splittable
from transforms.chunk import ChunkerSettings, ChunkRule
from transforms.decode import TextEncoding, detect_encoding
from transforms.read_text import ReadTextChunks, TextReadOptions, plan_ranges
from transforms.store import LocalStore, StoreConfig

ENCODINGS = {
    'utf-8': (TextEncoding('utf-8', 0, 1, 'utf8'), b''),
    'utf-8-bom': (TextEncoding('utf-8', 3, 1, 'utf8'), b'\xef\xbb\xbf'),
    'utf-16-le': (TextEncoding('utf-16-le', 2, 2, 'wide'), b'\xff\xfe'),
    'utf-16-be': (TextEncoding('utf-16-be', 2, 2, 'wide'), b'\xfe\xff'),
    'utf-32-le': (TextEncoding('utf-32-le', 4, 4, 'wide'), b'\xff\xfe\x00\x00'),
    'cp1252': (TextEncoding('cp1252', 0, 1, 'single'), b''),
    'big5': (TextEncoding('big5', 0, 1, 'multibyte'), b''),
    'gb18030': (TextEncoding('gb18030', 0, 1, 'multibyte'), b''),
}
PIECES = ['word', 'Ünïcödé', 'слово', '漢字テキスト', '😀🎉', ' ', '  ', '\n', '\r\n', '\r', '\n\n',
          '. ', '! ', '? ', '。', '\t', '\x00', 'a' * 300, '1234567890', 'é']
FILES = Path(tempfile.mkdtemp(prefix='ragbeam-chunk-test-'))


def _text(codec: str, min_pieces: int = 0, max_pieces: int = 400):
    def encodable(piece: str) -> bool:
        try:
            piece.encode(codec)
            return True
        except UnicodeEncodeError:
            return False
    usable = [p for p in PIECES if encodable(p)]
    return st.lists(st.sampled_from(usable), min_size=min_pieces, max_size=max_pieces).map(''.join)


@st.composite
def objects(draw, min_pieces: int = 0, max_chunk: int = 600):
    """(bytes in some encoding, its TextEncoding, chunker settings)."""
    name = draw(st.sampled_from(sorted(ENCODINGS)))
    enc, bom = ENCODINGS[name]
    data = bom + draw(_text(enc.codec, min_pieces, max(400, 2 * min_pieces))).encode(enc.codec)
    size = draw(st.integers(64, max_chunk))
    return data, enc, ChunkerSettings(size, draw(st.integers(0, size // 2)))


class _File:
    """`data` as a local file for the duration of a test example."""

    def __init__(self, data: bytes):
        self.path = Path(tempfile.mkstemp(dir=FILES)[1])
        self.path.write_bytes(data)
        self.ref = next(LocalStore().list(str(self.path)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.path.unlink()

    def read(self, chunker: ChunkerSettings, window: int, split_bytes: int,
             split_at=lambda n: None) -> tuple[list, int]:
        """Chunks of the real ReadTextChunks over the file's planned ranges, and the splits
        made."""
        fn = ReadTextChunks(chunker, TextReadOptions(window, split_bytes), StoreConfig())
        outputs, splits = [], 0
        for part in plan_ranges(self.ref, split_bytes):
            more, made = run_splittable(fn, part, split_at)
            outputs, splits = outputs + more, splits + made
        return chunks_of(outputs), splits


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects(min_pieces=150, max_chunk=300), st.integers(1, 5000), st.integers(64, 4000),
       st.randoms(use_true_random=False))
def test_dynamic_splits_do_not_change_chunks(obj, window, split_bytes, rnd):
    """Initial splits, windows and try_split at random points while a restriction runs (what
    Dataflow and Prism do) give the same chunks as one unsplit read."""
    data, _, chunker = obj
    decide = lambda n: 0.5 if n == 1 else (rnd.random() if rnd.random() < 0.3 else None)  # noqa: E731
    with _File(data) as f:
        reference, _ = f.read(chunker, 1 << 30, 1 << 40)
        split, splits = f.read(chunker, window, max(split_bytes, chunker.size), decide)
    assert split == reference
    assert len({c[3] for c in split}) == len(split)  # each chunk once
    if reference:
        assert splits >= 1  # the first output of the first restriction always splits


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects())
def test_chunks_cover_the_text_in_order_and_decode(obj):
    """For every encoding family: full, ordered coverage of [bom, end) with byte-exact,
    decodable spans of bounded size that never split a character."""
    data, enc, chunker = obj
    rule = ChunkRule(chunker, enc, len(data))
    spans = list(rule.spans(lambda a, b: data[a:b], lambda pos: pos < len(data), 0))
    pos = enc.bom
    for start, end in spans:
        assert enc.bom <= start <= pos < end <= len(data)
        assert end - start <= 2 * (chunker.size + chunker.overlap) + 16 or enc.family == 'multibyte'
        data[start:end].decode(enc.codec)
        if enc.unit > 1:
            assert (start - enc.bom) % enc.unit == 0 and (end - enc.bom) % enc.unit == 0
        pos = end
    assert pos == len(data) or len(data) == enc.bom


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=300), st.sampled_from(['utf-8-sig', 'utf-16', 'utf-32']))
def test_byte_order_marks_decide_the_encoding(text, codec):
    if codec == 'utf-16' and text.startswith('\x00') and len(text) % 2 == 1:
        return  # FF FE 00 00 + a whole number of UTF-32 units: truly ambiguous, read as UTF-32
    data = text.encode(codec)  # Python writes the BOM for these codecs
    enc = detect_encoding(data[:65536], len(data))
    assert data[enc.bom:].decode(enc.codec) == text


@settings(max_examples=200, deadline=None)
@given(st.text(st.characters(codec='utf-8', exclude_categories=['Cs']), min_size=1, max_size=300))
def test_valid_utf8_is_utf8(text):
    data = text.encode('utf-8')
    if data.count(0) * 4 > len(data):  # mostly NULs could look like UTF-16; covered elsewhere
        return
    enc = detect_encoding(data, len(data))
    assert enc.codec == 'utf-8' and data.decode(enc.codec) == text


@given(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), min_size=8, max_size=300),
       st.sampled_from(['utf-16-le', 'utf-16-be']))
def test_utf16_without_bom_is_recognised(text, codec):
    data = text.encode(codec)
    assert detect_encoding(data, len(data)).codec == codec


def test_a_single_line_without_spaces_still_chunks():
    data = b'x' * 4_000_000  # a 4 MB single line, no separator at all
    rnd = random.Random(7)
    with _File(data) as f:
        split, splits = f.read(ChunkerSettings(), 16384, 1_000_003,
                               lambda n: rnd.random() if n % 500 == 0 else None)
        reference, _ = f.read(ChunkerSettings(), 1 << 30, 1 << 40)
    assert split == reference and splits > 0
    assert reference[0][:2] == (0, 1000) and reference[-1][1] == len(data)
    assert all(e - s <= 1100 for s, e, _, _ in reference)


def test_lone_carriage_returns_are_line_breaks():
    data = ('line of text\r' * 400).encode()
    with _File(data) as f:
        chunks, _ = f.read(ChunkerSettings(), 1 << 20, 1 << 40)
    assert chunks and all(text.endswith('\r') for _, _, text, _ in chunks)
