"""PDFs: the shared corpus as its manifest describes it, ranged reads, page timeouts, memory."""
from __future__ import annotations

import json
import os
import shutil
import sys

import pyarrow.dataset as ds
import pytest

from bench.generate import write_pdf
from bench.measure import run_measured
from tests.conftest import CORPUS, ROOT, check_output, corpus_manifest, ragbeam
from tests.servers import S3_ENV, MotoS3
from transforms.pdf_sandbox import PdfLimits, PdfSandbox
from transforms.store import S3Store, StoreConfig


def _manifest_rows() -> dict[str, dict]:
    return {row['path'].split('/', 1)[1]: row for row in corpus_manifest('pdf')}


def _manifest(out) -> dict[str, dict]:
    return {r['uri'].rsplit('/', 1)[1]: r for r in ds.dataset(out / 'manifest').to_table().to_pylist()}


def _errors(out) -> list[dict]:
    return [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
            for line in f.read_text().splitlines()]


@pytest.fixture(scope='module')
def pdf_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('pdf-run') / 'out'
    ragbeam('run', '--input', CORPUS / 'pdf', '--output', out, '--pdf-page-timeout', '300',
            '--direct_num_workers', '2', '--direct_running_mode', 'multi_processing', timeout=900)
    return out


def test_pdf_corpus_meets_the_contracts(pdf_run):
    summary = check_output(pdf_run, '--input', CORPUS / 'pdf')
    assert "'ok': 42" in summary and "'failed': 12" in summary


@pytest.mark.parametrize('name,row', sorted(_manifest_rows().items()))
def test_each_pdf_ends_as_its_manifest_row_says(pdf_run, name, row):
    got = _manifest(pdf_run)[name]
    error_class = row['error'].split(':', 1)[0]
    if row['password']:
        assert (got['status'], got['reason']) == ('failed', 'password required')
    elif row['error'] and not row['pages']:
        assert got['status'] == 'failed'
        assert got['reason'].startswith(f'unreadable pdf: {error_class}'), got['reason']
    else:
        assert got['status'] == 'ok' and got['pages'] == int(row['pages'])
        notes = row['notes']
        failing = int(notes.split('pages_failing=')[1].split(';')[0]) if 'pages_failing=' in notes else 0
        assert got['errors'] == failing
        if 'image-only' in row['expected_property']:
            assert got['ocr_needed_pages'] >= 1
        elif int(row['extracted_chars'] or 0) > 0:
            assert got['chunks'] >= 1


def test_page_errors_carry_their_page_numbers(pdf_run):
    fuzzed = [e for e in _errors(pdf_run) if e['uri'].endswith('poppler-90-0-fuzzed.pdf')]
    assert len(fuzzed) == 14 and all(e['stage'] == 'extract' and 1 <= e['page'] <= 16 for e in fuzzed)
    ocr = [e for e in _errors(pdf_run) if e['error_type'] == 'ocr_needed']
    assert {e['uri'].rsplit('/', 1)[1] for e in ocr} >= {'ocrmypdf-c02-22.pdf', 'sf-cmyk-image.pdf'}


def test_a_slow_page_is_cut_off_and_the_run_goes_on(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    for name in ('pdfjs-issue6961.pdf', 'sf-minimal-document.pdf'):
        shutil.copy(CORPUS / 'pdf' / name, src / name)
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--pdf-page-timeout', '1')
    rows = _manifest(out)
    assert rows['sf-minimal-document.pdf']['chunks'] >= 1
    timeouts = [e for e in _errors(out) if e['error_type'] == 'PageTimeout']
    assert timeouts and all(e['uri'].endswith('issue6961.pdf') and e['page'] for e in timeouts)
    assert rows['pdfjs-issue6961.pdf']['status'] == 'ok'


def test_a_pdf_with_a_pdf_extension_in_capitals_or_none_is_still_a_pdf(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    shutil.copy(CORPUS / 'pdf' / 'sf-minimal-document.pdf', src / 'LOUD.PDF')
    shutil.copy(CORPUS / 'pdf' / 'sf-minimal-document.pdf', src / 'no-extension')
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out)
    rows = _manifest(out)
    assert rows['LOUD.PDF']['kind'] == rows['no-extension']['kind'] == 'pdf'
    assert rows['LOUD.PDF']['chunks'] == rows['no-extension']['chunks'] >= 1


@pytest.fixture(scope='module')
def s3():
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoS3()
    yield server
    server.stop()
    for k, v in saved.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


SAMPLE = ('sf-pdflatex-4-pages.pdf', 'pdfminer-dmca.pdf', 'pypdf-r6-empty-password.pdf',
          'pdfminer-rc4-128.pdf', 'qpdf-bad-xref.pdf', 'pdfjs-poppler-90-0-fuzzed.pdf',
          'debian-lshort-zh-cn.pdf')


def test_pdfs_from_s3_give_the_same_chunks(s3, tmp_path):
    src = tmp_path / 'pdf'
    src.mkdir()
    for name in SAMPLE:
        shutil.copy(CORPUS / 'pdf' / name, src / name)
    s3.upload_tree('pdfs', src, 'pdf')
    local, remote = tmp_path / 'local', tmp_path / 'remote'
    ragbeam('run', '--input', src, '--output', local, '--pdf-page-timeout', '300')
    ragbeam('run', '--input', 's3://pdfs/pdf/**', '--output', remote, '--pdf-page-timeout', '300',
            '--s3-endpoint-url', s3.endpoint)
    check_output(remote, '--input', src)

    def chunks(out):
        t = ds.dataset(out / 'chunks').to_table(columns=['uri', 'page', 'start', 'end', 'text'])
        return {(u.rsplit('/', 1)[1], p, s, e, x) for u, p, s, e, x in zip(
            *(t.column(c).to_pylist() for c in ('uri', 'page', 'start', 'end', 'text')))}
    assert chunks(local) == chunks(remote) and len(chunks(local)) > 100
    statuses = lambda out: {k: (r['status'], r['reason']) for k, r in _manifest(out).items()}  # noqa: E731
    assert statuses(local) == statuses(remote)


def test_a_few_pages_of_a_big_pdf_on_s3_cost_a_few_reads(s3, tmp_path):
    path = tmp_path / 'big.pdf'
    write_pdf(str(path), pages=100)  # about 40 MB
    s3.client().create_bucket(Bucket='big')
    s3.client().upload_file(str(path), 'big', 'big.pdf')
    store = S3Store(StoreConfig(s3_endpoint_url=s3.endpoint))
    ref = next(store.list('s3://big/big.pdf'))
    sandbox = PdfSandbox(PdfLimits())
    try:
        assert sandbox.open(lambda a, b: store.read_range(ref, a, b), ref.size) == 100
        texts = [sandbox.page(i)[0] for i in (0, 50, 99)]
    finally:
        sandbox.close()
    assert [t.split(':')[0] for t in texts] == ['Page 1', 'Page 51', 'Page 100']
    assert sandbox.bytes_read < ref.size * 0.05, (sandbox.bytes_read, ref.size)


def test_a_big_pdf_runs_in_bounded_memory(tmp_path):
    path = tmp_path / 'big.pdf'
    write_pdf(str(path), pages=600)  # about 240 MB
    out = tmp_path / 'out'
    m = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(path),
                      '--output', str(out), '--index-type', 'none', '--embedder', 'hash'],
                     cwd=ROOT)
    assert m.returncode == 0, m.output[-3000:]
    assert m.peak_rss_mb <= 512, f'peak RSS {m.peak_rss_mb:.0f} MB for a {path.stat().st_size >> 20} MB PDF'
    pages = ds.dataset(out / 'chunks').to_table(columns=['page']).column('page').to_pylist()
    assert sorted(set(pages)) == list(range(1, 601))


@pytest.mark.skipif(shutil.which('tesseract') is None,
                    reason='tesseract is not installed (./run_local.sh installs it where apt-get works)')
def test_scanned_pages_are_ocrd_on_request(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    shutil.copy(CORPUS / 'pdf' / 'ocrmypdf-c02-22.pdf', src / 'scan.pdf')
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--ocr', 'tesseract')
    text = ' '.join(ds.dataset(out / 'chunks').to_table(columns=['text']).column('text').to_pylist())
    assert 'garden' in text and 'shoulders' in text  # words of the scanned page
    assert _manifest(out)['scan.pdf']['ocr_needed_pages'] == 0
