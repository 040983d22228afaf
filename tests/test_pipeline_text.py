"""End to end on the shared text corpus: contracts, accounting, determinism across settings."""
from __future__ import annotations

import json

import pyarrow.dataset as ds
import pytest

from tests.conftest import CORPUS, check_output, ragbeam


def test_corpus_run_meets_the_contracts(text_run):
    summary = check_output(text_run, '--input', CORPUS / 'text')
    assert 'objects {\'ok\': 22}' in summary
    report = json.loads((text_run / 'report.json').read_text())
    assert report['objects_listed'] == 22 == report['objects_ok']
    assert report['bytes_read'] == report['bytes_listed']  # every byte read once, no more
    manifest = ds.dataset(text_run / 'manifest').to_table().to_pylist()
    by_name = {row['uri'].rsplit('/', 1)[1]: row for row in manifest}
    assert by_name['empty.txt']['status'] == 'ok' and by_name['empty.txt']['chunks'] == 0
    assert by_name['ru-koi8-r.txt']['encoding'] == 'koi8-r'
    assert by_name['utf16le-nobom.txt']['encoding'] == 'utf-16-le'
    chunks = ds.dataset(text_run / 'chunks').to_table(columns=['uri', 'text'])
    assert sum(row['chunks'] for row in manifest) == chunks.num_rows


def test_split_and_worker_settings_do_not_change_chunks(text_run, tmp_path):
    out = tmp_path / 'split'
    ragbeam('run', '--input', CORPUS / 'text', '--output', out, '--split-bytes', '65536',
            '--window-bytes', '16384', '--direct_num_workers', '2',
            '--direct_running_mode', 'multi_processing')
    check_output(out, '--input', CORPUS / 'text')
    check_output(out, '--same-as', text_run)


def test_bad_objects_are_accounted_for_and_the_run_goes_on(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    (src / 'good.txt').write_text('A perfectly good line of text.\n' * 50)
    (src / 'binary.bin').write_bytes(bytes(range(256)) * 12)
    (src / 'report.PDF').write_bytes(b'%PDF-1.4\n% truncated: no cross-reference table\n')
    (src / 'big.txt').write_text('x' * 5000)
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--max-object-bytes', '4000')
    check_output(out, '--input', src)
    rows = {r['uri'].rsplit('/', 1)[1]: r for r in ds.dataset(out / 'manifest').to_table().to_pylist()}
    assert rows['good.txt']['status'] == 'ok' and rows['good.txt']['chunks'] >= 1
    assert rows['binary.bin']['status'] == 'failed'
    assert rows['binary.bin']['reason'].startswith('undecodable')
    assert rows['big.txt']['status'] == 'skipped' and 'max-object-bytes' in rows['big.txt']['reason']
    assert rows['report.PDF']['status'] == 'failed' and rows['report.PDF']['kind'] == 'pdf'
    assert rows['report.PDF']['reason'].startswith('unreadable pdf: PdfStreamError')
    errors = [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
              for line in f.read_text().splitlines()]
    assert [(e['stage'], e['error_type']) for e in errors if e['uri'].endswith('binary.bin')] == [
        ('decode', 'UndecodableError')]
    assert [(e['stage'], e['error_type']) for e in errors if e['uri'].endswith('.PDF')] == [
        ('open', 'PdfStreamError')]
    report = json.loads((out / 'report.json').read_text())
    assert (report['objects_ok'], report['objects_failed'], report['objects_skipped']) == (1, 2, 1)
    assert report['bytes_skipped'] == 5000


def test_overlapping_patterns_list_each_object_once(tmp_path):
    out = tmp_path / 'out'
    ragbeam('run', '--input', CORPUS / 'text', '--input', CORPUS / 'text' / '*.txt',
            '--output', out, '--index-type', 'none')
    manifest = ds.dataset(out / 'manifest').to_table(columns=['uri'])
    assert manifest.num_rows == 22


def test_chunk_ids_and_texts_are_those_of_the_fixture(tmp_path):
    """The same input and settings give byte-identical chunk IDs and texts as the commit that
    made tests/fixtures/chunk_ids.json (the whole shared corpus: texts and PDFs)."""
    from tests.fixtures import chunk_ids

    copy = chunk_ids.prepare(CORPUS)
    proc = chunk_ids.run(copy, tmp_path / 'out')
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = chunk_ids.digests(ds.dataset(tmp_path / 'out' / 'chunks'), copy)
    expected = json.loads(chunk_ids.FIXTURE.read_text())
    assert {k: v for k, v in got.items() if got[k] != expected.get(k)} == {}
    assert got.keys() == expected.keys()


def test_pdf_magic_in_prose_is_text_and_a_bad_pdf_header_falls_back_to_text(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    (src / 'notes.txt').write_text('Every PDF file starts with the %PDF- marker and a version.\n'
                                   * 30)
    (src / 'header.txt').write_text('%PDF-1.7 is the first line of every PDF file.\n'
                                    'This one is only a note about that header.\n' * 30)
    (src / 'real-pdf.txt').write_bytes((CORPUS / 'pdf' / 'sf-minimal-document.pdf').read_bytes())
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out)
    check_output(out, '--input', src)
    rows = {r['uri'].rsplit('/', 1)[1]: r for r in ds.dataset(out / 'manifest').to_table().to_pylist()}
    assert (rows['notes.txt']['kind'], rows['notes.txt']['status'], rows['notes.txt']['errors']) \
        == ('text', 'ok', 0)
    assert (rows['header.txt']['kind'], rows['header.txt']['status']) == ('text', 'ok')
    assert rows['header.txt']['chunks'] >= 1 and rows['notes.txt']['chunks'] >= 1
    assert (rows['real-pdf.txt']['kind'], rows['real-pdf.txt']['status']) == ('pdf', 'ok')
    errors = [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
              for line in f.read_text().splitlines()]
    # the PDF attempt is on record for the object that fell back to text
    assert [(e['uri'].rsplit('/', 1)[1], e['stage']) for e in errors] == [('header.txt', 'open')]
    assert rows['header.txt']['errors'] == 1


def test_a_bug_in_the_reader_fails_the_run_instead_of_failing_an_object(tmp_path, monkeypatch):
    """Only the store's and the decoder's errors make an object fail; a bug (here the chunk
    rule raising ValueError) must fail the whole run, not pass as an "unreadable" object."""
    from pipeline import build
    from pipeline.options import RunOptions
    from transforms.chunk import ChunkRule
    from transforms.embed import EmbedOptions

    def broken(self, k):
        raise ValueError('a bug in the chunk rule')
    monkeypatch.setattr(ChunkRule, 'first_chunk_at_or_after', broken)
    src = tmp_path / 'in'
    src.mkdir()
    (src / 'a.txt').write_text('Some text to chunk. ' * 100)
    opts = RunOptions(inputs=[str(src)], output=str(tmp_path / 'out'),
                      embed=EmbedOptions(embedder='hash'))
    with pytest.raises(Exception, match='a bug in the chunk rule'):
        build.run(opts)
    assert not (tmp_path / 'out' / 'report.json').exists()
