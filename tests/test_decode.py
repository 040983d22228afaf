"""Encoding detection on the shared corpus's real texts."""
from __future__ import annotations

import csv

import pytest

from tests.conftest import CORPUS
from transforms.decode import UndecodableError, detect_encoding

# what the corpus manifest calls an encoding -> the codecs that decode it alike
SAME = {'ascii': {'utf-8'}, 'utf-8': {'utf-8'}, 'utf-8-sig': {'utf-8'}, 'utf-16': {'utf-16-le'},
        'utf-16-le': {'utf-16-le'}, 'latin-1': {'cp1252', 'iso8859-1'}, 'koi8-r': {'koi8-r'},
        'big5': {'big5'}}


def _texts():
    with open(CORPUS / 'MANIFEST.tsv', newline='') as f:
        for row in csv.DictReader(f, delimiter='\t'):
            if row['kind'] == 'text':
                yield row['path'], row['notes'].split(';')[0].removeprefix('encoding=')


@pytest.mark.parametrize('path,expected', list(_texts()))
def test_corpus_encodings(path, expected):
    data = (CORPUS / path).read_bytes()
    enc = detect_encoding(data[:65536], len(data))
    assert enc.codec in SAME[expected]
    text = data[enc.bom:].decode(enc.codec)
    assert len(text) == len(data[enc.bom:].decode(expected if expected != 'utf-8-sig' else 'utf-8'))


def test_binary_is_not_text():
    data = bytes(range(256)) * 64
    with pytest.raises(UndecodableError):
        detect_encoding(data, len(data))
