"""Encoding detection: the shared corpus's real texts, short Latin-1 texts, binary data."""
from __future__ import annotations

import pytest

from tests.conftest import corpus_params
from transforms.decode import UndecodableError, detect_encoding

# what the corpus manifest calls an encoding -> the codecs that decode it alike
SAME = {'ascii': {'utf-8'}, 'utf-8': {'utf-8'}, 'utf-8-sig': {'utf-8'}, 'utf-16': {'utf-16-le'},
        'utf-16-le': {'utf-16-le'}, 'latin-1': {'cp1252', 'iso8859-1'}, 'koi8-r': {'koi8-r'},
        'big5': {'big5'}}


@pytest.mark.parametrize('row', corpus_params('text'), ids=lambda r: r and r['path'])
def test_corpus_encodings(row):
    expected = row['notes'].split(';')[0].removeprefix('encoding=')
    data = row['file'].read_bytes()
    enc = detect_encoding(data[:65536], len(data))
    assert enc.codec in SAME[expected]
    text = data[enc.bom:].decode(enc.codec)
    assert len(text) == len(data[enc.bom:].decode(expected if expected != 'utf-8-sig' else 'utf-8'))


# Short everyday prose with the accented letters of each language, all in ISO-8859-1.
LATIN1 = {
    'fr': "Le petit chat est très content, il mange des crêpes à la crème et boit du thé "
          "glacé près de la fenêtre. Où est-il allé? À l'école, où les élèves étudient le "
          "français, l'histoire et la géographie. Ça va très bien, merci! Noël approche. ",
    'de': "Der größte Bär im Wald überquert die Straße, während die Kinder fröhlich über die "
          "Wiese laufen. Müller und Schäfer trinken Kaffee im Café, und die Mädchen spielen "
          "Fußball. Übermorgen fahren wir nach München. Schöne Grüße! ",
    'es': "El niño pequeño está muy contento; come piña y bebe café con leche en la montaña. "
          "¿Dónde está la estación? ¡Qué día más bonito! La señora García habló con el señor "
          "Núñez sobre la canción del año pasado. Mañana iremos a Cádiz. ",
    'pt': "A criança está muito feliz e come maçã enquanto o pai lê o jornal na varanda. Não "
          "há nada melhor que um café da manhã com pão, manteiga e açúcar. As lições de "
          "português são difíceis, mas a professora é ótima. ",
    'it': "Il bambino è felice perché può mangiare il gelato più buono della città. Così la "
          "giornata è più bella, e la società è contenta. Perché no? L'università è lì, "
          "vicino alla stazione. ",
    'nl': "Het meisje drinkt koffie in het café en eet een croissant; daarna gaat ze naar de "
          "bibliotheek om een boek te lenen. Coöperatie en reünie zijn woorden met een trema. ",
    'sv': "Flickan dricker kaffe på caféet och äter en kanelbulle; sedan går hon till "
          "biblioteket för att låna en bok. Räksmörgås är gott på sommaren när solen skiner. ",
}


@pytest.mark.parametrize('size', [300, 400, 600, 1000, 2000, 8000])
@pytest.mark.parametrize('lang', sorted(LATIN1))
def test_short_latin1_texts_decode_as_written(lang, size):
    """charset-normalizer alone read a 2 KB French Latin-1 text as cp775 (Baltic)."""
    text = (LATIN1[lang] * (size // len(LATIN1[lang]) + 1))[:size]
    data = text.encode('latin-1')
    enc = detect_encoding(data, len(data))
    assert data.decode(enc.codec) == text, enc.codec


def test_binary_is_not_text():
    data = bytes(range(256)) * 64
    with pytest.raises(UndecodableError):
        detect_encoding(data, len(data))
