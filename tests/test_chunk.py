"""Property tests of the chunk rule: split points and windows never change the chunks."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from tests.helpers import chunk_spans
from transforms.chunk import ChunkerSettings
from transforms.decode import TextEncoding, detect_encoding

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


def _text(codec: str):
    def encodable(piece: str) -> bool:
        try:
            piece.encode(codec)
            return True
        except UnicodeEncodeError:
            return False
    usable = [p for p in PIECES if encodable(p)]
    return st.lists(st.sampled_from(usable), min_size=0, max_size=400).map(''.join)


@st.composite
def objects(draw):
    name = draw(st.sampled_from(sorted(ENCODINGS)))
    enc, bom = ENCODINGS[name]
    codec = enc.codec
    text = draw(_text(codec))
    data = bom + text.encode(codec)
    size = draw(st.integers(64, 600))
    chunker = ChunkerSettings(size, draw(st.integers(0, size // 2)))
    splits = draw(st.lists(st.integers(0, max(1, len(data))), max_size=6))
    window = draw(st.integers(1, 3000))
    return data, enc, chunker, splits, window


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(objects())
def test_chunks_do_not_depend_on_splits_or_windows(obj):
    data, enc, chunker, splits, window = obj
    reference = chunk_spans(data, enc, chunker, [], 1 << 30)
    assert chunk_spans(data, enc, chunker, splits, window) == reference
    # full, ordered coverage of [bom, end) with byte-exact, decodable spans
    pos = enc.bom
    for start, end in reference:
        assert enc.bom <= start <= pos < end <= len(data)
        assert end - start <= 2 * (chunker.size + chunker.overlap) + 16 or enc.family == 'multibyte'
        data[start:end].decode(enc.codec)  # never splits a character
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
    enc = detect_encoding(data[:65536], len(data))
    spans = chunk_spans(data, enc, ChunkerSettings(), [1_000_003, 2_500_000], 16384)
    assert spans == chunk_spans(data, enc, ChunkerSettings(), [], 1 << 30)
    assert spans[0] == (0, 1000) and spans[-1][1] == len(data)
    assert all(e - s <= 1100 for s, e in spans)


def test_lone_carriage_returns_are_line_breaks():
    data = ('line of text\r' * 400).encode()
    spans = chunk_spans(data, detect_encoding(data, len(data)), ChunkerSettings(), [], 1 << 30)
    assert all(data[e - 1:e] == b'\r' for _, e in spans[:-1])
