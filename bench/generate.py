"""Deterministic generated text objects of any size, written in bounded pieces."""
from __future__ import annotations

import random

_WORDS = ('ingest bucket object chunk split window range worker runner beam parquet vector index '
          'query embedding manifest version retry memory bounded restriction offset page '
          'document corpus text byte stream shard merge train search model batch the a of to '
          'and in is for on with as by at from that this be are it or an was not').split()


def paragraph(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 8)):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(6, 24))]
        sentences.append(' '.join(words).capitalize() + rng.choice('.!?.'))
    return ' '.join(sentences) + '\n\n'


def write_text(path: str, size: int, seed: int = 7) -> None:
    """Writes exactly `size` bytes of ASCII paragraphs to `path`."""
    rng = random.Random(seed)
    written = 0
    with open(path, 'w', encoding='ascii', newline='') as f:
        while written < size:
            block = ''.join(paragraph(rng) for _ in range(2000))[:size - written]
            f.write(block)
            written += len(block)


def write_pdf(path: str, pages: int, image_bytes: int = 400_000, seed: int = 7) -> None:
    """Writes a PDF of `pages` pages, each with a line of text and an incompressible image.

    Written object by object (bounded memory), with a classic cross-reference table, so that
    a reader must seek to the end and then to each page's objects.
    """
    rng = random.Random(seed)
    side = int((image_bytes // 3) ** 0.5)
    offsets: list[int] = []
    with open(path, 'wb') as f:
        def obj(number: int, body: bytes, stream: bytes = None) -> None:
            offsets.append(f.tell())
            f.write(b'%d 0 obj\n' % number + body)
            if stream is not None:
                f.write(b'\nstream\n' + stream + b'\nendstream')
            f.write(b'\nendobj\n')

        f.write(b'%PDF-1.4\n%\xe2\xe3\xcf\xd3\n')
        kids = b' '.join(b'%d 0 R' % (4 + 3 * i) for i in range(pages))
        obj(1, b'<< /Type /Catalog /Pages 2 0 R >>')
        obj(2, b'<< /Type /Pages /Count %d /Kids [%s] >>' % (pages, kids))
        obj(3, b'<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>')
        for i in range(pages):
            page, content, image = 4 + 3 * i, 5 + 3 * i, 6 + 3 * i
            obj(page, b'<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R '
                      b'/Resources << /Font << /F1 3 0 R >> /XObject << /Im1 %d 0 R >> >> >>'
                % (content, image))
            words = ' '.join(rng.choice(_WORDS) for _ in range(40))
            text = f'BT /F1 10 Tf 40 760 Td (Page {i + 1}: {words}) Tj ET q 200 0 0 200 100 400 cm /Im1 Do Q'
            obj(content, b'<< /Length %d >>' % len(text), text.encode('ascii'))
            pixels = rng.randbytes(side * side * 3)
            obj(image, b'<< /Type /XObject /Subtype /Image /Width %d /Height %d /ColorSpace '
                       b'/DeviceRGB /BitsPerComponent 8 /Length %d >>' % (side, side, len(pixels)),
                pixels)
        xref = f.tell()
        f.write(b'xref\n0 %d\n0000000000 65535 f \n' % (len(offsets) + 1))
        for offset in offsets:
            f.write(b'%010d 00000 n \n' % offset)
        f.write(b'trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n'
                % (len(offsets) + 1, xref))


def vocabulary(paths) -> list[str]:
    """The words of some real texts, each as often as it occurs (sampling them is Zipfian)."""
    words = []
    for path in paths:
        with open(path, encoding='utf-8', errors='replace') as f:
            words += [w for w in f.read().split() if w.isalpha()]
    return words


def real_paragraph(rng: random.Random, words: list[str]) -> str:
    sentences = []
    for _ in range(rng.randint(2, 6)):
        sentence = ' '.join(rng.choice(words) for _ in range(rng.randint(8, 24)))
        sentences.append(sentence[:1].upper() + sentence[1:] + '.')
    return ' '.join(sentences) + '\n\n'


_NAMES = ('Berlin Lisbon Osaka Quito Lagos Perth Oslo Lima Cairo Dakar Hanoi Kyiv Minsk Porto '
          'Ada Grace Alan Edsger Barbara Donald Frances Ken Dennis Margaret Niklaus Tony').split()


def write_hash_adversarial(folder: str, words: list[str], files: int = 8,
                           seed: int = 13) -> None:
    """A corpus built to defeat feature hashing, `files` objects of each kind, ~24 KB each:
    prose from a real vocabulary; genome-like lines of `acgt` and gaps of `n`; tables of
    figures and of small counts; and one boilerplate paragraph repeated with a name or a
    number changed every four to six words."""
    import os

    rng = random.Random(seed)
    os.makedirs(folder, exist_ok=True)
    boilerplate = ('This message {} and any attachment are confidential {} and intended solely '
                   'for the addressee {} under reference {} . If you received it {} in error '
                   'please notify the office in {} quoting case {} and delete it {} ; the '
                   'sender {} accepts no liability {} for changes made after dispatch on {} .'
                   ).split()
    for n in range(files):
        kinds = {
            'prose': lambda: real_paragraph(rng, words),
            # an assembly's sequence lines, many of them gaps (runs of n): few distinct tokens
            'genome': lambda: ''.join(('n' * 60 if rng.random() < 0.7 else
                                       ''.join(rng.choice('acgt') for _ in range(60))) + '\n'
                                      for _ in range(8)) + '\n',
            # tables of figures, and of small counts (few distinct tokens)
            'table': lambda: ''.join(
                (f'| {rng.randint(1900, 2030)} | {rng.randint(0, 99999):,} | '
                 f'{rng.random() * 100:.2f} | {rng.randint(0, 100)} % | '
                 f'{rng.randint(-999, 999)} |\n') if rng.random() < 0.5 else
                ' '.join(str(rng.randint(0, 3)) for _ in range(16)) + '\n'
                for _ in range(6)) + '\n',
            'boilerplate': lambda: ' '.join(
                w if w != '{}' else rng.choice((rng.choice(_NAMES), str(rng.randint(10, 99999))))
                for w in boilerplate) + '\n\n',
        }
        for kind, make in kinds.items():
            with open(os.path.join(folder, f'{kind}-{n:02d}.txt'), 'w', encoding='utf-8') as f:
                size = 0
                while size < 24_000:
                    block = make()
                    f.write(block)
                    size += len(block)


def small_object_name(i: int, per_folder: int = 100) -> str:
    """The relative name of small object `i`: `per_folder` objects to a folder."""
    return f'f{i // per_folder:06d}/o{i:08d}.txt'


def small_object_text(i: int, size: int = 650, edit: int = 0) -> str:
    """About `size` bytes of paragraphs, different for each object and each `edit`."""
    rng = random.Random(i * 7919 + edit)
    text = f'Object {i} edit {edit}. '
    while len(text) < size:
        text += paragraph(rng)
    return text[:size]


def write_small_objects(root, n: int, per_folder: int = 100, size: int = 650) -> None:
    """A bucket of `n` small text objects under `root`, `per_folder` to a folder."""
    import os
    for i in range(n):
        path = os.path.join(root, small_object_name(i, per_folder))
        if i % per_folder == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, 'w', encoding='ascii') as f:
            f.write(small_object_text(i, size))


def pick(n: int, count: int, clustered: bool, seed: int = 11) -> list[int]:
    """`count` of the objects 0..n-1: consecutive ones (one prefix) from the middle when
    `clustered`, else spread uniformly at random."""
    if clustered:
        start = (n - count) // 2
        return list(range(start, start + count))
    return sorted(random.Random(seed).sample(range(n), count))


def edit_small_objects(root, which: list[int], edit: int, per_folder: int = 100,
                       size: int = 650) -> None:
    """Rewrites the objects `which` with other text (their version changes)."""
    import os
    for i in which:
        with open(os.path.join(root, small_object_name(i, per_folder)), 'w',
                  encoding='ascii') as f:
            f.write(small_object_text(i, size, edit))


def delete_small_objects(root, which: list[int], per_folder: int = 100) -> None:
    import os
    for i in which:
        os.remove(os.path.join(root, small_object_name(i, per_folder)))
