"""PDFs: the shared corpus as its manifest describes it, ranged reads, page timeouts, memory."""
from __future__ import annotations

import json
import os
import random
import shutil
import sys
from collections import Counter

import pyarrow.dataset as ds
import pypdf
import pypdfium2.version
import pytesseract
import pytest

from bench.generate import write_pdf
from bench.measure import run_measured
from tests.conftest import CORPUS, ROOT, check_output, corpus_manifest, ragbeam
from tests.servers import S3_ENV, MotoS3
from transforms.pdf import WORK_LOG_ENV
from transforms.pdf_sandbox import CRASH_PAGE_ENV, PdfLimits, PdfSandbox
from transforms.store import S3Store, StoreConfig


def _manifest_rows() -> dict[str, dict]:
    return {row['path'].split('/', 1)[1]: row for row in corpus_manifest('pdf')}


def _manifest(out) -> dict[str, dict]:
    return {r['uri'].rsplit('/', 1)[1]: r for r in ds.dataset(out / 'manifest').to_table().to_pylist()}


def _errors(out) -> list[dict]:
    return [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
            for line in f.read_text().splitlines()]


# Three PDFs pypdf cannot open (startxref missing, a bad xref) that PDFium repairs and reads.
PDFIUM_REPAIRS = {'pdfminer-issue-1113-evil-xobjects.pdf', 'pdfminer-simple1.pdf', 'qpdf-bad-xref.pdf'}


# pypdf's run leaves out the files it takes over 3 s on (MANIFEST's pypdf_seconds; PDFium's
# run has them all): their 180 s of pypdf would be most of this module's time, and they are
# well-formed PDFs, not the broken, encrypted and scanned ones whose endings are checked here.
PYPDF_SLOW = {name for name, row in _manifest_rows().items() if float(row['pypdf_seconds'] or 0) > 3}
EXPECTED = {'pdfium': {'ok': 45, 'failed': 9}, 'pypdf': {'ok': 42 - len(PYPDF_SLOW), 'failed': 12}}


def _corpus_run(tmp_path_factory, engine: str):
    base = tmp_path_factory.mktemp(f'pdf-{engine}')
    src, out = base / 'in', base / 'out'
    src.mkdir()
    for path in (CORPUS / 'pdf').iterdir():
        if engine == 'pdfium' or path.name not in PYPDF_SLOW:
            os.symlink(path, src / path.name)
    ragbeam('run', '--input', src, '--output', out, '--pdf-page-timeout', '300',
            '--pdf-engine', engine,
            '--direct_num_workers', '2', '--direct_running_mode', 'multi_processing', timeout=900)
    return out


@pytest.fixture(scope='module')
def pdf_run(tmp_path_factory):
    return _corpus_run(tmp_path_factory, 'pdfium')


@pytest.fixture(scope='module')
def pypdf_run(tmp_path_factory):
    return _corpus_run(tmp_path_factory, 'pypdf')


def _run_of(request, engine: str):
    return request.getfixturevalue({'pdfium': 'pdf_run', 'pypdf': 'pypdf_run'}[engine])


@pytest.fixture(params=['pdfium', 'pypdf'])
def engine_run(request):
    return request.param, _run_of(request, request.param)


def test_pdf_corpus_meets_the_contracts(engine_run):
    """check_output re-extracts every page with the engine each chunk names."""
    engine, out = engine_run
    summary = check_output(out, '--input', out.parent / 'in')
    assert all(f"'{k}': {v}" in summary for k, v in EXPECTED[engine].items()), summary
    extractors = set(ds.dataset(out / 'chunks').to_table(columns=['extractor']).column('extractor').to_pylist())
    version = {'pdfium': pypdfium2.version.PDFIUM_INFO.build, 'pypdf': pypdf.__version__}[engine]
    assert extractors == {f'{engine}-{version}'}
    assert {r['extractor'] for r in _manifest(out).values() if r['status'] == 'ok'} == extractors


@pytest.mark.parametrize('engine,name,row', [
    (engine, name, row) for engine in ('pdfium', 'pypdf') for name, row in sorted(_manifest_rows().items())
    if engine == 'pdfium' or name not in PYPDF_SLOW])
def test_each_pdf_ends_as_its_manifest_row_says(request, engine, name, row):
    out = _run_of(request, engine)
    got = _manifest(out)[name]
    error_class = row['error'].split(':', 1)[0]
    if row['password']:
        assert (got['status'], got['reason']) == ('failed', 'password required')
    elif row['error'] and not row['pages'] and not (engine == 'pdfium' and name in PDFIUM_REPAIRS):
        assert got['status'] == 'failed'
        # with PDFium, the reason is that of pypdf, the fallback engine, which failed too
        assert got['reason'].startswith(f'unreadable pdf: {error_class}'), got['reason']
    elif row['error'] and not row['pages']:
        assert got['status'] == 'ok' and got['pages'] >= 1 and got['chunks'] >= 1, got
    else:
        assert got['status'] == 'ok' and got['pages'] == int(row['pages'])
        notes = row['notes']
        failing = int(notes.split('pages_failing=')[1].split(';')[0]) if 'pages_failing=' in notes else 0
        assert got['errors'] == (failing if engine == 'pypdf' else 0)  # PDFium reads every page
        if 'image-only' in row['expected_property']:
            assert got['ocr_needed_pages'] >= 1
        elif int(row['extracted_chars'] or 0) > 0:
            assert got['chunks'] >= 1


def test_page_errors_carry_their_page_numbers(pypdf_run):
    fuzzed = [e for e in _errors(pypdf_run) if e['uri'].endswith('poppler-90-0-fuzzed.pdf')]
    assert len(fuzzed) == 14 and all(e['stage'] == 'extract' and 1 <= e['page'] <= 16 for e in fuzzed)


def test_scans_are_recorded_as_needing_ocr(pdf_run):
    ocr = [e for e in _errors(pdf_run) if e['error_type'] == 'ocr_needed']
    assert {e['uri'].rsplit('/', 1)[1] for e in ocr} >= {'ocrmypdf-c02-22.pdf', 'sf-cmyk-image.pdf'}
    assert all(e['page'] for e in ocr)


def test_each_byte_of_a_pdf_is_read_about_once(pdf_run):
    """PDFium over the block cache, each document open once per worker: at most 1.3x an
    object's size, and 1.1x over the corpus (on two workers)."""
    rows = list(_manifest(pdf_run).values())
    over = {r['uri'].rsplit('/', 1)[1]: round(r['bytes_read'] / r['size'], 2)
            for r in rows if r['bytes_read'] > 1.3 * r['size']}
    assert over == {}
    assert sum(r['bytes_read'] for r in rows) <= 1.1 * sum(r['size'] for r in rows)


def test_a_slow_page_is_cut_off_and_the_run_goes_on(tmp_path):
    src = tmp_path / 'in'
    src.mkdir()
    for name in ('pdfjs-issue6961.pdf', 'sf-minimal-document.pdf'):
        shutil.copy(CORPUS / 'pdf' / name, src / name)
    out = tmp_path / 'out'
    # pypdf takes ~10 s on a page of issue6961.pdf (PDFium 0.14 s for the file)
    ragbeam('run', '--input', src, '--output', out, '--pdf-page-timeout', '1', '--pdf-engine', 'pypdf')
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
    sandbox = PdfSandbox(PdfLimits(), 'pdfium')
    try:
        pages, extractor = sandbox.open(lambda a, b: store.read_range(ref, a, b), ref.size)
        texts = [sandbox.page(i)[0] for i in (0, 50, 99)]
    finally:
        sandbox.close()
    assert pages == 100 and extractor.startswith('pdfium-')
    assert [t.split(':')[0] for t in texts] == ['Page 1', 'Page 51', 'Page 100']
    # PDFium walks the 99 page objects before page 100 (a 4 KiB block each) and loads the
    # three pages' 400 KB images
    assert sandbox.bytes_read < ref.size * 0.05, (sandbox.bytes_read, ref.size)


def test_a_big_pdf_runs_in_bounded_memory(tmp_path):
    path = tmp_path / 'big.pdf'
    write_pdf(str(path), pages=600)  # about 240 MB
    out = tmp_path / 'out'
    m = run_measured([sys.executable, '-m', 'pipeline', 'run', '--input', str(path),
                      '--output', str(out), '--index-type', 'none', '--embedder', 'hash'],
                     cwd=ROOT)
    assert m.returncode == 0, m.output[-3000:]
    # PDFium keeps what it parsed until the document closes, so its process re-opens the
    # document as it grows (REOPEN_GROWTH_MB). The anonymous memory is the bound: the summed RSS
    # counts the shared libraries' clean pages once in each of the two processes, and how many
    # are resident depends on the page cache (seen: 276 and 503 MB RSS, 187 and 246 anonymous)
    size_mb = path.stat().st_size >> 20
    assert m.peak_anon_mb < 320, f'peak anonymous {m.peak_anon_mb:.0f} MB for a {size_mb} MB PDF'
    assert m.peak_rss_mb < 640, f'peak RSS {m.peak_rss_mb:.0f} MB for a {size_mb} MB PDF'
    pages = ds.dataset(out / 'chunks').to_table(columns=['page']).column('page').to_pylist()
    assert sorted(set(pages)) == list(range(1, 601))
    row = _manifest(out)['big.pdf']
    assert row['bytes_read'] <= 1.1 * row['size']


def test_an_engine_crash_costs_its_page_and_a_fresh_engine_goes_on(tmp_path, monkeypatch):
    src = tmp_path / 'in'
    src.mkdir()
    shutil.copy(CORPUS / 'pdf' / 'sf-pdflatex-4-pages.pdf', src / 'four.pdf')
    monkeypatch.setenv(CRASH_PAGE_ENV, '1')  # the engine process segfaults on page 2
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--index-type', 'none')
    row = _manifest(out)['four.pdf']
    assert (row['status'], row['pages'], row['errors']) == ('ok', 4, 1)
    [crash] = _errors(out)
    assert (crash['error_type'], crash['page'], crash['stage']) == ('EngineCrashed', 2, 'extract')
    assert 'SIGSEGV' in crash['message']
    pages = set(ds.dataset(out / 'chunks').to_table(columns=['page']).column('page').to_pylist())
    assert pages == {1, 3, 4}
    report = json.loads((out / 'report.json').read_text())
    assert report['counters']['pdf_engine_restarts'] == 1


def test_two_workers_share_a_folder_of_pdfs_and_the_ranges_of_a_big_one(tmp_path, monkeypatch):
    """Planned page ranges cross a Reshuffle, so the FnApiRunner (which never splits a
    restriction while it runs) gives both workers a share; every page is read once."""
    src = tmp_path / 'in'
    src.mkdir()
    for i in range(8):
        write_pdf(str(src / f'small-{i}.pdf'), pages=20, image_bytes=20_000, seed=i)
    write_pdf(str(src / 'big.pdf'), pages=200, image_bytes=40_000)  # 8 MB: planned as ranges
    log = tmp_path / 'work.jsonl'
    monkeypatch.setenv(WORK_LOG_ENV, str(log))
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--index-type', 'none',
            '--direct_num_workers', '2', '--direct_running_mode', 'multi_processing')
    work = [json.loads(line) for line in log.read_text().splitlines()]
    small = {w['pid'] for w in work if 'small-' in w['uri']}
    big = [w for w in work if w['uri'].endswith('big.pdf')]
    assert len(small) == 2, work
    assert len({w['pid'] for w in big}) == 2 and len(big) > 2, big
    pages = sorted(p for w in big for p in range(w['start'], w['stop']))
    assert pages == list(range(200))
    assert sum(r['chunks'] for r in _manifest(out).values()) == 8 * 20 + 200


def _mutations(sources: list, count: int, seed: int):
    """(name, bytes) of `count` broken PDFs: truncated, bytes flipped in the cross-reference
    data or in a stream, the trailer zeroed, or an object duplicated."""
    rng = random.Random(seed)
    kinds = ('truncate', 'xref', 'stream', 'trailer', 'duplicate')
    for n in range(count):
        source = rng.choice(sources)
        data, kind = bytearray(source.read_bytes()), kinds[n % len(kinds)]
        if kind == 'truncate':
            data = data[:rng.randrange(1, len(data))]
        elif kind == 'xref':
            at = max(0, data.rfind(b'startxref') - 2048)
            for _ in range(8):
                data[rng.randrange(at, len(data))] = rng.randrange(256)
        elif kind == 'stream':
            starts = [i for i in range(len(data)) if data.startswith(b'stream', i)] or [0]
            at = rng.choice(starts)
            for _ in range(16):
                data[min(len(data) - 1, at + rng.randrange(6, 400))] = rng.randrange(256)
        elif kind == 'trailer':
            at = data.rfind(b'trailer')
            at = at if at >= 0 else max(0, len(data) - 256)
            data[at:] = bytes(len(data) - at)
        else:
            first = data.find(b' obj')
            end = data.find(b'endobj', first)
            if 0 < first < end:
                start = data.rfind(b'\n', 0, first) + 1
                data[end + 6:end + 6] = b'\n' + data[start:end + 6]
        yield f'{kind}-{n:03d}-{source.stem}.pdf', bytes(data)


def test_a_mutated_corpus_ends_every_object_ok_or_failed_and_the_run_goes_on(tmp_path):
    sources = [CORPUS / 'pdf' / name for name, row in sorted(_manifest_rows().items())
               if row['pages'] and not row['password'] and (CORPUS / 'pdf' / name).stat().st_size < 200_000]
    src = tmp_path / 'in'
    src.mkdir()
    for name, data in _mutations(sources, 200, seed=14):
        (src / name).write_bytes(data)
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--pdf-page-timeout', '30', timeout=900)
    check_output(out, '--input', src)
    rows = _manifest(out)
    assert len(rows) == 200
    assert all(r['status'] == 'ok' or (r['status'] == 'failed' and r['reason']) for r in rows.values())
    statuses = Counter(r['status'] for r in rows.values())
    errors = _errors(out)
    crashes = [e for e in errors if e['error_type'] in ('EngineCrashed', 'PageTimeout', 'MemoryLimit')]
    report = json.loads((out / 'report.json').read_text())
    # every engine process that died was replaced, and each death is on record
    assert report['counters'].get('pdf_engine_restarts', 0) == len(crashes)
    print(f'mutated corpus: {dict(statuses)}, {len(crashes)} engine crashes recovered')
    assert statuses['ok'] >= 100  # most mutations leave a readable PDF


@pytest.mark.skipif(shutil.which('tesseract') is None,
                    reason='tesseract is not installed (./run_local.sh installs it where apt-get works)')
def test_scanned_pages_are_ocrd_on_request(tmp_path):
    """PDFium renders the scanned page at --ocr-dpi, tesseract reads it, and a query finds
    the page by its words among other PDFs."""
    src = tmp_path / 'in'
    src.mkdir()
    shutil.copy(CORPUS / 'pdf' / 'ocrmypdf-c02-22.pdf', src / 'scan.pdf')
    for name in ('sf-pdflatex-4-pages.pdf', 'pdfminer-naacl06-shinyama.pdf', 'sf-multicolumn.pdf'):
        shutil.copy(CORPUS / 'pdf' / name, src / name)
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out, '--ocr', 'tesseract')
    t = ds.dataset(out / 'chunks').to_table(columns=['uri', 'text', 'extractor']).to_pylist()
    scanned = [r for r in t if r['uri'].endswith('scan.pdf')]
    text = ' '.join(r['text'] for r in scanned)
    assert 'garden' in text and 'shoulders' in text  # words of the scanned page
    assert {r['extractor'] for r in scanned} == {f'tesseract-{pytesseract.get_tesseract_version()}'}
    assert _manifest(out)['scan.pdf']['ocr_needed_pages'] == 0
    hits = json.loads(ragbeam('query', '--output', out, '--json', '-k', '3',
                              "tip-toeing along a path amongst the trees back towards the end of "
                              "the widow's garden").stdout)
    assert hits[0]['uri'].endswith('scan.pdf'), hits
    check_output(out, '--input', src)  # OCR'd chunks are counted, not re-derived


@pytest.mark.skipif(shutil.which('tesseract') is None, reason='tesseract is not installed')
def test_an_ocr_language_that_is_not_installed_is_a_one_line_error(tmp_path):
    proc = ragbeam('run', '--input', CORPUS / 'pdf' / 'sf-minimal-document.pdf', '--output',
                   tmp_path / 'out', '--ocr', 'tesseract', '--ocr-lang', 'eng+xyz', check=False)
    assert proc.returncode == 2
    assert 'tesseract has no xyz' in proc.stderr and 'Traceback' not in proc.stderr
