"""Shared fixtures: the shared corpus, running the `ragbeam` command, checking outputs."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import settings

# The same examples on every run: CI must not turn red by the luck of the draw.
# HYPOTHESIS_PROFILE=explore draws new, more examples (for a developer's look, not CI).
settings.register_profile('ragbeam', derandomize=True, deadline=None, print_blob=True)
settings.register_profile('explore', max_examples=3000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ragbeam'))

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / 'shared'
CORPUS = SHARED / 'corpus'
CHECK = SHARED / 'checks' / 'check_output.py'
HAVE_SHARED = (CORPUS / 'MANIFEST.tsv').is_file() and CHECK.is_file()
# .ci/run sets this: there, a missing shared corpus is an error, not a reason to skip
REQUIRE_SHARED = os.environ.get('RAGBEAM_REQUIRE_SHARED') == '1'
SHARED_MISSING = (f'needs the shared corpus and contract checker at {SHARED} '
                  '(a checkout beside the workspace\'s shared/ folder)')


def pytest_configure(config):
    if REQUIRE_SHARED and not HAVE_SHARED:
        raise pytest.UsageError(f'RAGBEAM_REQUIRE_SHARED=1 and the shared corpus or contract '
                                f'checker is missing under {SHARED}')


# How the workers of `./run_local.sh test` (pytest-xdist, --dist loadfile) share the suite:
# a unit is a file, or files that share a costly session fixture (the engine tests all compare
# with corpus_run, which each worker would otherwise make again); the units that took longest
# in CI go first (seconds, roughly, on 2 cores; a file not listed goes last), so the two
# workers finish close together.
UNITS = {'test_runners.py': 'engines', 'test_flink.py': 'engines'}
UNIT_SECONDS = {'engines': 990, 'test_backfill.py': 400, 'test_pdf.py': 185, 'test_index.py': 180,
                'test_backfill_buckets.py': 450, 'test_stores.py': 110, 'test_memory.py': 110,
                'test_cli.py': 90, 'test_minilm.py': 130, 'test_hybrid.py': 75,
                'test_pipeline_text.py': 70, 'test_entities.py': 70, 'test_monitor.py': 60,
                'test_chunk.py': 60, 'test_scale.py': 130, 'test_api.py': 60,
                'test_serve.py': 60, 'test_browser.py': 40, 'test_dataflow.py': 20,
                'test_textract.py': 20}


def _unit(path: str) -> str:
    name = Path(path).name
    return UNITS.get(name, name)


@pytest.hookimpl(optionalhook=True)  # without xdist (`-p no:xdist`), the suite runs as usual
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile over the units above, in the order the collection gives them."""
    if config.getoption('dist') != 'loadfile':
        return None
    from xdist.scheduler import LoadFileScheduling

    class Units(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _unit(super()._split_scope(nodeid))

    config.option.loadscopereorder = False  # xdist's own order: most tests first
    return Units(config, log)


def pytest_collection_modifyitems(config, items):
    """The longest units first (UNIT_SECONDS), each unit's tests together; without
    ../shared, the tests of modules that use the corpus skip, with one reason."""
    items.sort(key=lambda item: (-UNIT_SECONDS.get(_unit(item.nodeid.split('::')[0]), 0),
                                 _unit(item.nodeid.split('::')[0])))
    if HAVE_SHARED:
        return
    skip = pytest.mark.skip(reason=SHARED_MISSING)
    for item in items:
        if getattr(item.module, 'CORPUS', None) is CORPUS:
            item.add_marker(skip)


def corpus_manifest(kind: str) -> list[dict]:
    """The shared corpus's MANIFEST.tsv rows of one kind (text or pdf), each with its `file`
    path added; none without the shared corpus (tests parametrized by them then skip)."""
    if not HAVE_SHARED:
        return []
    with open(CORPUS / 'MANIFEST.tsv', newline='') as f:
        return [dict(row, file=CORPUS / row['path'])
                for row in csv.DictReader(f, delimiter='\t') if row['kind'] == kind]


def corpus_params(kind: str) -> list:
    """corpus_manifest(kind) as pytest parameters; one skipped parameter without the corpus."""
    rows = corpus_manifest(kind)
    return rows or [pytest.param(None, marks=pytest.mark.skip(reason=SHARED_MISSING))]


def ragbeam(*args: str, check: bool = True, timeout: int = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `python -m pipeline ARGS` as a user would; fails the test on a non-zero exit.

    Runs use the fast hash embedder unless a test names one: the model is tested on its own.
    """
    if args and args[0] == 'run' and '--embedder' not in args:
        args = (*args, '--embedder', 'hash')
    proc = subprocess.run([sys.executable, '-m', 'pipeline', *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        pytest.fail(f'ragbeam {" ".join(map(str, args))} exited {proc.returncode}:\n'
                    f'{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}')
    return proc


def run_in_background(*args: str) -> subprocess.Popen:
    """`python -m pipeline ARGS` (hash embedder) started, not waited for: a test that kills
    something while it runs."""
    return subprocess.Popen([sys.executable, '-m', 'pipeline', *map(str, args), '--embedder',
                             'hash'], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(find, proc: subprocess.Popen, timeout: float = 120, every: float = 0.2):
    """What `find()` returns once it is not None, polled while `proc` runs; None when `proc`
    ended or the time ran out first."""
    import time
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        found = find()
        if found is not None:
            return found
        time.sleep(every)
    return None


def measured_run(what: str, out: Path, *args: str, group=None):
    """`ragbeam run ARGS --output OUT` with its whole process tree sampled as bench/measure.py
    does (a Measurement); prints the peak RSS under `what`, fails the test on a non-zero exit."""
    from bench.measure import run_measured

    m = run_measured([sys.executable, '-m', 'pipeline', 'run', *map(str, args), '--output',
                      str(out)], cwd=ROOT, group=group)
    assert m.returncode == 0, m.output[-3000:]
    print(f'\n{what}: peak RSS {m.peak_rss_mb:.0f} MB ({m.peak_anon_mb:.0f} MB anonymous), '
          f'{m.wall_seconds:.1f} s')
    return m


def check_output(out: Path, *args: str) -> str:
    """Runs the shared contract checker; fails the test unless every check holds."""
    proc = subprocess.run([sys.executable, str(CHECK), str(out), *map(str, args)],
                          capture_output=True, text=True, timeout=600)
    # The checker reads Delta tables with deltalake, whose threads sometimes abort the
    # interpreter's teardown after it printed its verdict (delta-io/delta-rs#2184): that
    # abort is the checker process's exit, not a check.
    torn_down = (proc.returncode == -6 and proc.stderr.strip() ==
                 'terminate called without an active exception')
    assert proc.returncode == 0 or (torn_down and proc.stdout.strip().splitlines()[-1]
                                    .startswith('OK:')), proc.stdout[-4000:] + proc.stderr[-2000:]
    return proc.stdout


@pytest.fixture(scope='session')
def text_run(tmp_path_factory) -> Path:
    """One default run over the shared text corpus, shared by the tests that only read it."""
    out = tmp_path_factory.mktemp('text-run') / 'out'
    ragbeam('run', '--input', CORPUS / 'text', '--output', out)
    return out


@pytest.fixture(scope='session')
def shared_texts() -> Path:
    """The shared text corpus, for a module that does not skip whole without it (the minilm
    run); the test skips with one reason where it is missing."""
    if not HAVE_SHARED:
        pytest.skip(SHARED_MISSING)
    return CORPUS / 'text'


@pytest.fixture(scope='session')
def model_texts(shared_texts, tmp_path_factory) -> Path:
    """The shared texts but world192.txt, for the spaCy run (tests/test_entities.py): that file
    is 2,400 of the texts' 2,969 chunks, near-identical factbook entries, minutes of spaCy on
    2 cores, and no case the others lack. The minilm run takes the whole text corpus."""
    folder = tmp_path_factory.mktemp('model-texts')
    for path in shared_texts.iterdir():
        if path.name != 'world192.txt':
            shutil.copy2(path, folder / path.name)
    return folder


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    monkeypatch.setenv('RAGBEAM_CACHE', str(tmp_path / 'ragbeam-cache'))  # not the user's
    os.environ.setdefault('PYTHONHASHSEED', '0')


@pytest.fixture(scope='module')
def s3():
    """moto's S3 server on 127.0.0.1, with the shared texts in s3://corpus/text/, and the
    S3 environment (fake credentials, the region) for the module's tests."""
    from tests.servers import S3_ENV, MotoS3

    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update(S3_ENV)
    server = MotoS3()
    server.upload_tree('corpus', CORPUS / 'text', 'text')
    yield server
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


FAKE_GCS = SHARED / 'tools' / 'fake-gcs-server' / 'fake-gcs-server'


@pytest.fixture(scope='module')
def gcs():
    """The shared GCS emulator (fake-gcs-server) on 127.0.0.1, with the shared texts in
    gs://corpus/text/; STORAGE_EMULATOR_HOST names it for the module's tests."""
    from tests.servers import FakeGCS

    if not HAVE_SHARED:
        pytest.skip(SHARED_MISSING)
    if not FAKE_GCS.is_file():
        pytest.fail(f'the GCS emulator {FAKE_GCS} is missing from the shared folder')
    server = FakeGCS(FAKE_GCS)
    server.upload_tree('corpus', CORPUS / 'text', 'text')
    yield server
    server.stop()


# .ci/run sets this: there, a missing toolchain (go, mvn, java) fails the tests of the engines
# instead of skipping them
REQUIRE_ENGINES = os.environ.get('RAGBEAM_REQUIRE_ENGINES') == '1'


def _engine(get, needs: str):
    from pipeline.options import UsageError
    try:
        return get()
    except UsageError as e:
        if REQUIRE_ENGINES:
            pytest.fail(f'RAGBEAM_REQUIRE_ENGINES=1: {e}')
        pytest.skip(f'needs {needs} ({e})')


@pytest.fixture(scope='session')
def prism_engine() -> str:
    """The Prism binary from ragbeam's engine cache, built with Go the first time."""
    from pipeline import engines
    return _engine(engines.prism_binary, 'Go 1.26+ on the PATH to build Prism')


@pytest.fixture(scope='session')
def flink_engine() -> str:
    """The Flink job-server jar from ragbeam's engine cache, assembled with Maven the first
    time."""
    from pipeline import engines
    return _engine(lambda: engines.flink_job_server_jar(engines.default_flink_version()),
                   'Maven and Java 17 on the PATH for the Flink job server')


@pytest.fixture(scope='session')
def corpus_run(tmp_path_factory):
    """The whole shared corpus (texts and PDFs) on the FnApiRunner, what the other engines'
    runs are compared with."""
    out = tmp_path_factory.mktemp('fnapi') / 'out'
    ragbeam('run', '--input', CORPUS, '--output', out)
    return out


def accounting(out) -> dict:
    """What must not depend on the engine: each object's outcome, the error records, the
    counters and the report's totals, and the stages whose memory came back as metrics.
    Bytes read and timings depend on the split points; they are left out."""
    import pyarrow.dataset as ds
    report = json.loads((out / 'report.json').read_text())
    manifest = sorted((r['uri'], r['status'], r['reason'], r['chunks'], r['errors'], r['pages'],
                       r['ocr_needed_pages'], r['extractor'])
                      for r in ds.dataset(out / 'manifest').to_table().to_pylist())
    errors = sorted((e['uri'], e['stage'], e['error_type'], e.get('page'), e.get('start'),
                     e.get('end')) for f in (out / 'errors').glob('*.jsonl')
                    for e in map(json.loads, f.read_text().splitlines()))
    counters = {k: v for k, v in report['counters'].items()
                if not k.startswith('stage_ms_') and k not in ('bytes_read', 'dynamic_splits')}
    totals = {k: report[k] for k in ('objects_listed', 'objects_ok', 'objects_failed',
                                     'objects_skipped', 'chunks', 'chunks_embedded',
                                     'failure_reasons')}
    return {'manifest': manifest, 'errors': errors, 'counters': counters, 'totals': totals,
            'stages': sorted(report['stages'])}
