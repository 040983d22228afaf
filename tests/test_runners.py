"""The same pipeline on other engines: Prism (Beam's Go runner, the one here that splits
restrictions while they run), the portable job service, and Dataflow's translation; the
one-line errors when an engine's binary or jar is missing."""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings, strategies as st

from tests.conftest import (CORPUS, ROOT, accounting, check_output, ragbeam,
                            run_in_background, wait_for)
from tests.servers import free_port

@pytest.fixture
def job_service():
    port = free_port()
    proc = subprocess.Popen([sys.executable, '-m',
                             'apache_beam.runners.portability.local_job_service_main',
                             '--port', str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(('127.0.0.1', port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail('the Beam job service did not start')
    yield f'localhost:{port}'
    proc.terminate()
    proc.wait(timeout=30)


def test_portable_runner_gives_the_same_chunks(job_service, text_run, tmp_path):
    out = tmp_path / 'portable'
    ragbeam('run', '--input', CORPUS / 'text', '--output', out, '--split-bytes', '262144',
            '--runner', 'PortableRunner', '--job_endpoint', job_service,
            '--environment_type', 'LOOPBACK')
    check_output(out, '--input', CORPUS / 'text')
    check_output(out, '--same-as', text_run)


def test_dataflow_dry_run_translates_offline(tmp_path):
    out = tmp_path / 'dataflow'
    proc = ragbeam('run', '--input', CORPUS / 'text', '--output', out,
                   '--runner', 'DataflowRunner', '--dry_run', '--project', 'ragbeam-test',
                   '--region', 'us-central1', '--temp_location', 'gs://ragbeam-test/tmp',
                   timeout=300)
    assert 'translated, not run' in proc.stderr
    assert not (out / 'report.json').exists()


def test_prism_gives_the_chunks_and_the_accounting_of_the_fnapi_runner(prism_engine, corpus_run,
                                                                       tmp_path):
    import psutil

    def engines_running():
        return {p.pid for p in psutil.process_iter(['cmdline'])
                if p.info['cmdline'] and p.info['cmdline'][0] == prism_engine}

    before = engines_running()
    out = tmp_path / 'prism'
    # no --prism_location: the binary comes from the engine cache
    ragbeam('run', '--input', CORPUS, '--output', out, '--runner', 'PrismRunner')
    assert engines_running() <= before, 'the run left its Prism process running'
    check_output(out, '--input', CORPUS)
    check_output(out, '--same-as', corpus_run)
    expected = accounting(corpus_run)
    assert expected['totals']['objects_failed'] > 0 and expected['errors']  # not vacuous
    assert accounting(out) == expected
    assert {'read', 'embed', 'write'} <= set(expected['stages'])


def _multibyte_texts(folder) -> None:
    """Two generated texts whose characters are 1 to 4 bytes (UTF-8) or 2 and 4 (UTF-16)."""
    rng = random.Random(11)
    words = ['naïve', 'café', 'Straße', 'ελληνικά', 'кириллица', '日本語の文章', '中文文本',
             '한국어', 'עברית', 'العربية', 'emoji😀🚀', '𝔘𝔫𝔦𝔠𝔬𝔡𝔢', 'plain', 'ascii', 'words']

    def text(n_words: int) -> str:
        lines = []
        while n_words > 0:
            k = rng.randint(3, 40)
            lines.append(' '.join(rng.choice(words) for _ in range(k)))
            n_words -= k
        return '\n'.join(lines)

    folder.mkdir()
    (folder / 'utf8.txt').write_text(text(700_000), encoding='utf-8')
    (folder / 'utf16.txt').write_bytes(b'\xff\xfe' + text(350_000).encode('utf-16-le'))


@pytest.fixture(scope='module')
def multibyte(tmp_path_factory):
    """The generated texts and their FnApiRunner output at the default split and window."""
    root = tmp_path_factory.mktemp('multibyte')
    _multibyte_texts(root / 'in')
    ragbeam('run', '--input', root / 'in', '--output', root / 'reference')
    return root / 'in', root / 'reference'


def test_prism_splits_while_reading_and_the_chunks_do_not_change(prism_engine, multibyte,
                                                                tmp_path_factory):
    """Random split and window sizes on Prism give the chunks of the FnApiRunner's run, and
    restrictions that Prism cuts while they run give them too.

    Prism splits a bundle whose progress stalls for one tick (100 ms, backing off 4x after
    each split). With the hash embedder that happens only now and then (0 to 1 cut in a run
    here), so the cuts are made certain on a part of the same texts with the model: its
    batches of 8 hold the reader for longer than a tick. `dynamic_splits` counts the cuts.
    """
    texts, reference = multibyte

    @settings(max_examples=4)
    @given(split=st.integers(64 << 10, 6 << 20), window=st.integers(4096, 1 << 20))
    def same_chunks(split, window):
        out = tmp_path_factory.mktemp('prism-split') / 'out'
        ragbeam('run', '--input', texts, '--output', out, '--runner', 'PrismRunner',
                '--split-bytes', str(split), '--window-bytes', str(window),
                '--embed-batch-size', '4096', '--embed-batch-bytes', '64M')
        check_output(out, '--same-as', reference)

    same_chunks()
    part = tmp_path_factory.mktemp('prism-cut')
    (part / 'in').mkdir()
    text = (texts / 'utf8.txt').read_text(encoding='utf-8')[:150_000]
    (part / 'in' / 'utf8.txt').write_text(text[:text.rindex('\n') + 1], encoding='utf-8')
    model = ('--embedder', 'minilm', '--embed-batch-size', '8', '--window-bytes', '65536',
             '--index-type', 'none')
    ragbeam('run', '--input', part / 'in', '--output', part / 'fnapi', *model)
    cuts = []
    while len(cuts) < 3 and not any(cuts):  # a cut needs a stall Prism sees: up to 3 runs
        out = part / f'prism{len(cuts)}'
        ragbeam('run', '--input', part / 'in', '--output', out, '--runner', 'PrismRunner',
                *model)
        check_output(out, '--same-as', part / 'fnapi')
        cuts.append(json.loads((out / 'report.json').read_text())['counters']
                    .get('dynamic_splits', 0))
    print(f'\nrestrictions Prism cut, per run: {cuts}')
    assert any(cuts), 'Prism cut no restriction in 3 runs: nothing was exercised'


def test_prism_jobs_get_a_job_server_timeout_past_beams_60_second_stream_deadline(tmp_path):
    """Beam 2.62 gives Prism's state and message streams the job-server timeout as their
    deadline: at its default of 60 s, every longer Prism job failed (a 1 GiB text in
    `bench.bench_text engines`). ragbeam passes a week unless the user gives a timeout."""
    from pipeline.engines import PRISM_JOB_SERVER_TIMEOUT, runner_args

    binary = str(tmp_path / 'prism')
    assert PRISM_JOB_SERVER_TIMEOUT >= 24 * 3600
    assert runner_args(['--runner', 'PrismRunner', f'--prism_location={binary}']) == [
        '--runner', 'PrismRunner', f'--prism_location={binary}',
        f'--job_server_timeout={PRISM_JOB_SERVER_TIMEOUT}']
    for timeout in (['--job_server_timeout', '30'], ['--job-server-timeout=30']):
        args = ['--runner', 'PrismRunner', f'--prism_location={binary}', *timeout]
        assert runner_args(args) == args
    assert not any('timeout' in a for a in runner_args(['--runner', 'FlinkRunner',
                                                        '--flink_job_server_jar=x.jar']))


def _without_toolchains(tmp_path) -> dict:
    """An environment whose PATH has no go, mvn or java, and an empty engine cache."""
    empty = tmp_path / 'bin'
    empty.mkdir()
    return dict(os.environ, PATH=str(empty), RAGBEAM_ENGINE_CACHE=str(tmp_path / 'cache'),
                HOME=str(tmp_path / 'home'))


@pytest.mark.parametrize('runner, names', [
    ('PrismRunner', 'python -m pipeline.engines'),
    ('FlinkRunner', 'python -m pipeline.engines'),
])
def test_a_missing_engine_is_a_one_line_error_naming_the_command(runner, names, tmp_path):
    proc = subprocess.run([sys.executable, '-m', 'pipeline', 'run', '--input', CORPUS / 'text',
                           '--output', tmp_path / 'out', '--embedder', 'hash',
                           '--runner', runner], cwd=ROOT, env=_without_toolchains(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('ragbeam: error:'), proc.stderr[-2000:]
    assert names in lines[0]
    assert not (tmp_path / 'out' / 'report.json').exists()


def _engine_process(parent, name: str, marker: str):
    """The first process under `parent` that is named `name` and has `marker` in an argument
    (the job server, not a version probe or a shell): a short-lived child may end between
    the listing and the look at it, and is passed over."""
    import psutil
    for child in parent.children(recursive=True):
        try:
            if child.name().startswith(name) and any(marker in a for a in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            continue
    return None


@pytest.mark.parametrize('engine', ['prism', 'flink'])
def test_an_engine_killed_mid_run_fails_the_run_and_keeps_the_last_commit(engine, request,
                                                                          tmp_path):
    """The engine's process (Prism, or the Flink job server's JVM with its MiniCluster)
    killed while the pipeline runs: the run exits non-zero with a one-line error, commits
    nothing, and the committed version stays whole."""
    import psutil
    from deltalake import DeltaTable

    from bench.generate import write_text

    request.getfixturevalue(f'{engine}_engine')  # built or fetched, or the reason to skip
    runner, process, marker = {
        'prism': (['--runner', 'PrismRunner'], 'prism', 'prism'),
        'flink': (['--runner', 'FlinkRunner', '--flink_master=[local]'], 'java', 'job-server'),
    }[engine]

    src = tmp_path / 'src'
    src.mkdir()
    (src / 'small.txt').write_text('a first object, committed before the engine dies. ' * 200)
    out = tmp_path / 'out'
    ragbeam('run', '--input', src, '--output', out)
    committed = check_output(out, '--input', src)
    write_text(str(src / 'big.txt'), 40 << 20)  # long enough to be killed in the middle of
    proc = run_in_background('run', '--input', src, '--output', out, *runner)
    victim = wait_for(lambda: _engine_process(psutil.Process(proc.pid), process, marker), proc,
                      every=0.1)
    assert victim is not None, f'the {process} process never started'
    # the job is running: the engine has its workers' bundles (Flink's JVM starts slower)
    time.sleep(2 if engine == 'prism' else 15)
    assert proc.poll() is None, 'the run ended before the engine could be killed'
    victim.kill()
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode not in (0, None), stderr[-2000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('ragbeam: error:'), stderr[-3000:]
    # the driver's own failure is that line (Beam's SDK worker still prints the traceback of
    # an instruction that was in flight when the engine died: that print is Beam's own)
    assert 'pipeline/cli.py", line' not in stderr, stderr[-3000:]
    assert DeltaTable(str(out / 'chunks')).version() == 0
    (src / 'big.txt').unlink()
    assert check_output(out, '--input', src) == committed
