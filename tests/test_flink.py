"""ragbeam on Flink: the MiniCluster embedded in Beam's job server, and a standalone cluster
on 127.0.0.1 (one JobManager, one TaskManager with two slots, started once for this module)
with Python workers from an EXTERNAL worker pool. Each gives the FnApiRunner's chunks and
accounting; a job whose TaskManager is killed recovers and commits what an undisturbed run
commits; one object's ranges spread over the subtasks; a 300 MB object stays under 512 MB of
Python RSS."""
from __future__ import annotations

import json
import time

import pytest

from pipeline.flink import ClusterSettings, LocalCluster, worker_pool
from pipeline.options import UsageError
from tests.conftest import (CORPUS, REQUIRE_ENGINES, accounting, check_output, measured_run,
                            ragbeam, run_in_background, wait_for)
from tests.servers import free_port

EMBEDDED = ('--runner', 'FlinkRunner', '--flink_master=[local]', '--parallelism=2')


@pytest.fixture(scope='session')
def cluster(flink_engine, tmp_path_factory):
    """A standalone Flink cluster and a worker pool, and the ragbeam flags that submit to it."""
    try:
        flink = LocalCluster(tmp_path_factory.mktemp('flink-cluster'),
                             ClusterSettings(slots=2)).start()
    except UsageError as e:
        if REQUIRE_ENGINES:
            pytest.fail(f'RAGBEAM_REQUIRE_ENGINES=1: {e}')
        pytest.skip(f'needs Java 17 and pip for a Flink cluster ({e})')
    port = free_port()
    pool = worker_pool(port)
    yield flink, ('--runner', 'FlinkRunner', f'--flink_master={flink.master}',
                  '--environment_type=EXTERNAL', f'--environment_config=localhost:{port}',
                  '--parallelism=2')
    pool.terminate()
    pool.wait(timeout=30)
    flink.stop()


def _same_as_fnapi(out, corpus_run) -> None:
    check_output(out, '--input', CORPUS)
    check_output(out, '--same-as', corpus_run)
    expected = accounting(corpus_run)
    assert expected['totals']['objects_failed'] > 0 and expected['errors']  # not vacuous
    assert accounting(out) == expected  # the counters came back from the job server


def test_flink_embedded_gives_the_chunks_and_the_accounting_of_the_fnapi_runner(
        flink_engine, corpus_run, tmp_path):
    out = tmp_path / 'flink'
    # no --flink_job_server_jar: the job server comes from the engine cache
    ragbeam('run', '--input', CORPUS, '--output', out, *EMBEDDED)
    _same_as_fnapi(out, corpus_run)


def test_a_300mb_object_on_flink_embedded_keeps_python_under_512mb(flink_engine, tmp_path):
    """The Python process (driver and its LOOPBACK workers) of a 300 MB object at
    parallelism 2 stays under 512 MB RSS; the JVM is reported apart. (Before the chunk sink
    stopped taking a side input, Flink's fuser sent every chunk through the JVM: 1149 MB of
    Python and 3.1 GB of JVM on this object.)"""
    import pyarrow.dataset as ds

    from bench.engines import process_group
    from bench.generate import write_text

    size = 300 << 20
    src = tmp_path / 'big.txt'
    write_text(str(src), size)
    out = tmp_path / 'out'
    m = measured_run('300 MB on Flink embedded', out, '--input', src, '--embedder', 'hash',
                     '--index-type', 'none', *EMBEDDED, group=process_group)
    print(f'peak RSS by group: {m.peak_rss_mb_by}')
    assert m.peak_rss_mb_by['python'] <= 512, m.peak_rss_mb_by  # seen: 258 MB at 150 MB
    assert ds.dataset(out / 'chunks').count_rows() > size // 1000 * 0.95
    assert json.loads((out / 'report.json').read_text())['objects_ok'] == 1


def test_a_flink_cluster_gives_the_chunks_and_the_accounting_of_the_fnapi_runner(
        cluster, corpus_run, tmp_path):
    flink, flags = cluster
    out = tmp_path / 'cluster'
    ragbeam('run', '--input', CORPUS, '--output', out, *flags)
    _same_as_fnapi(out, corpus_run)
    assert any(j['state'] == 'FINISHED' for j in flink.jobs())  # it ran there, not in-process


def test_the_ranges_of_one_big_object_spread_over_the_cluster(cluster, tmp_path):
    """Flink runs a restriction's initial splits in the task that holds its element and never
    splits one while it runs: ReadText's Spread of planned ranges (a GroupByKey on hashed
    keys) is what spreads one object's 32 ranges over both subtasks (without it: all 32 in
    one, seen as [8, 0] on a smaller object; with Beam's Reshuffle after the listing ranges'
    own, [32, 0]). Flink's REST API counts the records each subtask read."""
    from bench.generate import write_text

    flink, flags = cluster
    src = tmp_path / 'src'
    src.mkdir()
    write_text(str(src / 'one.txt'), 2 << 20)
    before = {j['jid'] for j in flink.jobs()}
    # past one window, so that it is read in ranges (an object of one window is read whole)
    ragbeam('run', '--input', src, '--output', tmp_path / 'out', '--split-bytes', '64KiB',
            '--window-bytes', '64KiB', '--embedder', 'hash', *flags)
    jid, = {j['jid'] for j in flink.jobs()} - before
    reads = [records for name, records in flink.vertex_records(jid)
             if 'ReadText/{Spread, Read}' in name]
    assert len(reads) == 1, flink.vertex_records(jid)
    assert sum(reads[0]) == 32 and len(reads[0]) == 2 and min(reads[0]) > 0, reads
    check_output(tmp_path / 'out', '--input', src)


def test_a_job_whose_taskmanager_dies_recovers_and_commits_the_same_output(cluster, tmp_path):
    """SIGKILL of the only TaskManager while the job runs, and a new one started (as a
    supervisor would): Flink restarts the job (fixed-delay strategy), and the committed output
    equals an undisturbed FnApiRunner run of the same input."""
    from bench.generate import write_text

    flink, flags = cluster
    flags = (*flags, '--number_of_execution_retries=100', '--execution_retry_delay=2000')
    src = tmp_path / 'src'
    src.mkdir()
    write_text(str(src / 'big.txt'), 24 << 20)
    (src / 'small.txt').write_text('a small object beside the big one. ' * 300)
    reference = tmp_path / 'reference'
    ragbeam('run', '--input', src, '--output', reference)
    jobs_before = {j['jid'] for j in flink.jobs()}
    out = tmp_path / 'out'
    proc = run_in_background('run', '--input', src, '--output', out, *flags)
    job = wait_for(lambda: next((j for j in flink.jobs()
                                 if j['jid'] not in jobs_before and j['state'] == 'RUNNING'),
                                None), proc, timeout=180, every=0.5)
    assert job is not None, 'the job never ran on the cluster'
    time.sleep(4)  # its tasks are reading
    assert proc.poll() is None, 'the job ended before its TaskManager could be killed'
    flink.kill_taskmanager()
    flink.add_taskmanager()
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    check_output(out, '--input', src)
    check_output(out, '--same-as', reference)
    restarts = flink.exceptions(job['jid'])
    assert restarts, 'Flink recorded no failure: the TaskManager was not killed mid-job'


def test_an_incremental_run_over_20k_committed_objects_on_flink_embedded(flink_engine, tmp_path):
    """The listing ranges, the workers' reads of the committed manifest and the commit on
    Flink: a re-run with a few changes, adds and deletes over a committed corpus of 20,000
    objects gives the tables of the same re-run on the FnApiRunner."""
    import shutil

    from bench.generate import (delete_small_objects, edit_small_objects, small_object_text,
                                write_small_objects)

    src, fnapi, flink = tmp_path / 'src', tmp_path / 'fnapi', tmp_path / 'flink'
    lean = ('--index-type', 'none', '--lexical-index', 'none')
    write_small_objects(src, 20_000)
    ragbeam('run', '--input', src, '--output', fnapi, *lean)
    shutil.copytree(fnapi, flink)  # the same committed corpus (its paths are relative)
    edit_small_objects(src, [3, 4_000, 12_345, 19_999], edit=1)
    delete_small_objects(src, [7, 8_001])
    (src / 'f000050' / 'added.txt').write_text(small_object_text(99_999))
    ragbeam('run', '--input', src, '--output', fnapi, *lean)
    ragbeam('run', '--input', src, '--output', flink, *lean, *EMBEDDED)
    run = json.loads((flink / 'report.json').read_text())['run']
    assert (run['objects_changed'], run['objects_new'], run['objects_deleted']) == (4, 1, 2)
    assert run['list_ranges'] > 1
    check_output(flink, '--input', src)
    check_output(flink, '--same-as', fnapi)
