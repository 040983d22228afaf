"""A standalone Flink cluster on this machine: one JobManager and one TaskManager, started
from the Flink distribution that the PyPI wheels `apache-flink` and `apache-flink-libraries`
carry, of the Flink minor version ragbeam's job server is built for.

The tests and benchmarks start one with `LocalCluster`; `ragbeam run --runner FlinkRunner
--flink_master=localhost:PORT` then submits to it, with Python workers from an EXTERNAL worker
pool (`worker_pool`). README, "Runners", gives the same steps for a cluster of one's own.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pipeline import engines
from pipeline.options import UsageError

# The newest 1.19 release on PyPI; the job server's own Flink is 1.19.0, and Flink keeps its
# client and cluster compatible within a minor version.
FLINK_RELEASE = '1.19.3'


def flink_home(release: str = FLINK_RELEASE) -> Path:
    """FLINK_HOME of a Flink distribution in the engine cache, installed with pip the first
    time (`--no-deps --target`: the wheel `apache-flink` itself pins an old apache-beam)."""
    target = engines.cache_root() / 'flink-dist' / release
    home = target / 'pyflink'
    if (home / 'bin' / 'jobmanager.sh').is_file():
        return home
    if shutil.which('java') is None:
        raise UsageError('a Flink cluster needs Java 17 (java is not on the PATH)')
    print(f'ragbeam: installing the Flink {release} distribution (apache-flink and '
          f'apache-flink-libraries from PyPI, about 260 MB) into {target} (once)',
          file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + '.partial')
    shutil.rmtree(partial, ignore_errors=True)
    proc = subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps',
                           '--target', str(partial), f'apache-flink=={release}',
                           f'apache-flink-libraries=={release}'],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          check=False)
    if proc.returncode != 0:
        raise UsageError(f'pip could not install the Flink {release} distribution: '
                         f'{proc.stdout.strip().splitlines()[-1:]}')
    for script in (partial / 'pyflink' / 'bin').iterdir():
        script.chmod(0o755)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(partial, target)
    return home


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class ClusterSettings:
    """The cluster's size, and how it restarts a job whose TaskManager died."""
    slots: int = 2
    taskmanager_mb: int = 3072  # the process size Flink plans in; the RSS is far lower
    network_mb: int = 512
    restart_attempts: int = 100  # each failed task counts: one lost TaskManager fails dozens
    restart_delay_s: int = 2


class LocalCluster:
    """A JobManager and a TaskManager on 127.0.0.1, each a foreground process of this one,
    with their config, logs and temporary files under `folder`."""

    def __init__(self, folder: Path, settings: ClusterSettings = ClusterSettings()):
        self.folder = Path(folder)
        self.settings = settings
        self.rest_port = free_port()
        self._rpc_port = free_port()
        self._home = flink_home()
        self.jobmanager: subprocess.Popen | None = None
        self.taskmanagers: list[subprocess.Popen] = []

    @property
    def master(self) -> str:
        """What `--flink_master` names."""
        return f'localhost:{self.rest_port}'

    def _conf(self) -> Path:
        conf = self.folder / 'conf'
        shutil.copytree(self._home / 'conf', conf, dirs_exist_ok=True)
        s = self.settings
        tmp = self.folder / 'tmp'
        tmp.mkdir(parents=True, exist_ok=True)
        (conf / 'config.yaml').write_text('\n'.join([
            f'env.java.opts.all: {_java_opts(self._home)}',
            'jobmanager.bind-host: localhost',
            'jobmanager.rpc.address: localhost',
            f'jobmanager.rpc.port: {self._rpc_port}',
            'jobmanager.memory.process.size: 1024m',
            'taskmanager.bind-host: localhost',
            'taskmanager.host: localhost',
            f'taskmanager.numberOfTaskSlots: {s.slots}',
            f'taskmanager.memory.process.size: {s.taskmanager_mb}m',
            f'taskmanager.memory.network.min: {s.network_mb}m',
            f'taskmanager.memory.network.max: {s.network_mb}m',
            # a Beam batch job deploys all its stages at once, each channel with its buffers:
            # small buffers make enough of them at parallelism 2
            'taskmanager.memory.segment-size: 8kb',
            f'parallelism.default: {s.slots}',
            'rest.address: localhost',
            'rest.bind-address: localhost',
            f'rest.port: {self.rest_port}',
            f'io.tmp.dirs: {tmp}',
            'restart-strategy.type: fixed-delay',
            f'restart-strategy.fixed-delay.attempts: {s.restart_attempts}',
            f'restart-strategy.fixed-delay.delay: {s.restart_delay_s} s',
            # a lost TaskManager is noticed in seconds, not the default 50
            'heartbeat.timeout: 10000',
            'heartbeat.interval: 2000',
            '']))
        return conf

    def _start(self, script: str) -> subprocess.Popen:
        env = dict(os.environ, FLINK_CONF_DIR=str(self.folder / 'conf'),
                   FLINK_LOG_DIR=str(self.folder / 'log'), FLINK_PID_DIR=str(self.folder))
        (self.folder / 'log').mkdir(parents=True, exist_ok=True)
        # start-foreground execs the JVM: the process is the JobManager or TaskManager itself
        return subprocess.Popen(['bash', str(self._home / 'bin' / script), 'start-foreground'],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)

    def start(self, timeout: float = 120) -> 'LocalCluster':
        self.folder.mkdir(parents=True, exist_ok=True)
        self._conf()
        self.jobmanager = self._start('jobmanager.sh')
        self.add_taskmanager(timeout)
        return self

    def add_taskmanager(self, timeout: float = 120) -> subprocess.Popen:
        """Starts one more TaskManager and waits until the JobManager has registered it."""
        if self.overview_or_none(wait=timeout) is None:
            self.stop()
            raise UsageError(f'the Flink JobManager did not answer on 127.0.0.1:'
                             f'{self.rest_port} in {timeout:.0f} s; see {self.folder / "log"}')
        known = self._taskmanager_ids()
        tm = self._start('taskmanager.sh')
        self.taskmanagers.append(tm)
        deadline = time.time() + timeout
        while time.time() < deadline and tm.poll() is None:
            if self._taskmanager_ids() - known:
                return tm
            time.sleep(0.5)
        self.stop()
        raise UsageError(f'the Flink TaskManager did not register in {timeout:.0f} s; see '
                         f'{self.folder / "log"}')

    def _taskmanager_ids(self) -> set[str]:
        try:
            with urllib.request.urlopen(f'http://127.0.0.1:{self.rest_port}/taskmanagers',
                                        timeout=2) as r:
                return {tm['id'] for tm in json.loads(r.read())['taskmanagers']}
        except OSError:
            return set()

    def overview_or_none(self, wait: float = 0) -> dict | None:
        """The JobManager's /overview (task managers, slots, jobs), or None when it does not
        answer (within `wait` seconds)."""
        deadline = time.time() + wait
        while True:
            try:
                with urllib.request.urlopen(f'http://127.0.0.1:{self.rest_port}/overview',
                                            timeout=2) as r:
                    return json.loads(r.read())
            except OSError:
                if time.time() >= deadline:
                    return None
                if self.jobmanager is not None and self.jobmanager.poll() is not None:
                    return None
                time.sleep(0.5)

    def jobs(self) -> list[dict]:
        """The jobs the JobManager knows: id, name, state."""
        with urllib.request.urlopen(f'http://127.0.0.1:{self.rest_port}/jobs/overview',
                                    timeout=5) as r:
            return json.loads(r.read())['jobs']

    def exceptions(self, jid: str) -> list[dict]:
        """The failures a job recovered from (or died of), oldest first."""
        with urllib.request.urlopen(f'http://127.0.0.1:{self.rest_port}/jobs/{jid}/exceptions',
                                    timeout=5) as r:
            return json.loads(r.read()).get('exceptionHistory', {}).get('entries', [])

    def vertex_records(self, jid: str) -> list[tuple[str, list[int]]]:
        """Each vertex of a job: its name, and the records each of its subtasks read."""
        base = f'http://127.0.0.1:{self.rest_port}/jobs/{jid}'
        with urllib.request.urlopen(base, timeout=5) as r:
            vertices = json.loads(r.read())['vertices']
        found = []
        for v in vertices:
            with urllib.request.urlopen(f'{base}/vertices/{v["id"]}', timeout=5) as r:
                subtasks = json.loads(r.read())['subtasks']
            found.append((v['name'], [s['metrics']['read-records'] for s in subtasks]))
        return found

    def kill_taskmanager(self) -> None:
        """SIGKILLs the live TaskManagers, as a crashed machine would go."""
        for tm in self.taskmanagers:
            if tm.poll() is None:
                tm.send_signal(signal.SIGKILL)
                tm.wait(timeout=30)

    def stop(self) -> None:
        for p in [*self.taskmanagers, self.jobmanager]:
            if p is not None and p.poll() is None:
                p.terminate()
        for p in [*self.taskmanagers, self.jobmanager]:
            if p is not None:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()

    def __enter__(self) -> 'LocalCluster':
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _java_opts(home: Path) -> str:
    """The distribution's own JVM flags (the --add-opens Flink needs on Java 17)."""
    for line in (home / 'conf' / 'config.yaml').read_text().splitlines():
        if line.strip().startswith('all:') and '--add-' in line:
            return line.split('all:', 1)[1].strip()
    return ' '.join(engines.FLINK_JVM_PROPERTIES)


def worker_pool(port: int) -> subprocess.Popen:
    """Beam's EXTERNAL worker pool on 127.0.0.1:port: it starts one SDK worker process of
    this Python (ragbeam importable) for each the cluster asks for."""
    bin_dir = str(Path(sys.executable).parent)
    # the pool starts its workers as `python`: this one
    env = dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get('PATH', ''))
    return subprocess.Popen([sys.executable, '-m',
                             'apache_beam.runners.worker.worker_pool_main',
                             f'--service_port={port}'], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
