"""The same pipeline under the portable job service (Flink/Dataflow's Fn API) and Dataflow translation."""
from __future__ import annotations

import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import CORPUS, check_output, ragbeam


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.fixture
def job_service():
    port = _free_port()
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
