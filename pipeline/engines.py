"""The programs behind the portable runners: Prism's binary and Flink's job-server jar.

`--runner PrismRunner` without `--prism_location` and `--runner FlinkRunner` without
`--flink_job_server_jar` take them from ragbeam's engine cache ($RAGBEAM_ENGINE_CACHE, default
~/.cache/ragbeam/engines) or from Maven's ~/.m2. A missing one is built with `go`, or
assembled from Maven's jars with `mvn`, once, when that tool is on the PATH; otherwise the
error is one line naming the command to run. Beam's own fallback, a download from GitHub or
the Beam site, does not work offline. `python -m pipeline.engines` warms the cache
(./run_local.sh calls it).

Both must be of the SDK's own Beam version: Beam promises no compatibility between an SDK
and a job server of another version.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from apache_beam.version import __version__ as BEAM_VERSION

from pipeline.options import UsageError

_log = logging.getLogger(__name__)

CACHE_ENV = 'RAGBEAM_ENGINE_CACHE'
PRISM_PACKAGE = 'github.com/apache/beam/sdks/v2/go/cmd/prism'
# The JVM flags Beam's own Flink tests give the job server on Java 17.
FLINK_JVM_PROPERTIES = ('--add-opens=java.base/java.lang=ALL-UNNAMED',
                        '--add-opens=java.base/java.nio=ALL-UNNAMED',
                        '--add-opens=java.base/java.util=ALL-UNNAMED')
_BUILD_SECONDS = 900
PRISM_JOB_SERVER_TIMEOUT = 7 * 24 * 3600
"""`--job_server_timeout` on Prism unless given. Beam 2.62's PortableRunner opens the job's
state and message streams with that timeout as their deadline (default 60 s), and Prism,
unlike Flink's job server, serves them by preparation id, so every Prism job longer than a
minute failed with DEADLINE_EXCEEDED (seen: a 1 GiB text, `bench.bench_text engines`; Beam
issue #35867). The other calls it bounds are to the Prism process ragbeam itself started,
and a Prism that dies still ends the streams at once (UNAVAILABLE)."""


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV)
                or Path.home() / '.cache' / 'ragbeam' / 'engines')


def prism_path() -> Path:
    """Where the Prism binary of this Beam version lives in the engine cache."""
    return cache_root() / 'prism' / BEAM_VERSION / 'prism'


def prism_binary() -> str:
    """The Prism binary of the SDK's Beam version, built with `go install` the first time."""
    path = prism_path()
    if path.is_file():
        return str(path)
    command = f'go install {PRISM_PACKAGE}@v{BEAM_VERSION}'
    go = shutil.which('go')
    if go is None:
        raise UsageError(f'--runner PrismRunner needs the Prism binary of Beam {BEAM_VERSION}: '
                         f'install Go and run `python -m pipeline.engines` (it runs `{command}`), '
                         'or pass --prism_location')
    print(f'ragbeam: building Prism {BEAM_VERSION} with `{command}` into {path.parent} '
          '(once; about two minutes)', file=sys.stderr, flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as bin_dir:
        env = dict(os.environ, GOBIN=bin_dir, GOFLAGS='-mod=mod')
        proc = _run([go, 'install', f'{PRISM_PACKAGE}@v{BEAM_VERSION}'], env)
        built = Path(bin_dir) / 'prism'
        if proc.returncode != 0 or not built.is_file():
            raise UsageError(f'`{command}` failed: {_last_line(proc.stdout)}')
        os.replace(built, path)  # atomic: a concurrent build finds a whole binary or none
    return str(path)


FLINK_LAUNCHER_MAIN = 'org.apache.beam.runners.flink.FlinkJobServerDriver'
# What the job server is made of: Maven Central serves no shaded job-server jar of any Beam
# version here, but at 2.62.0 it serves the Flink runner and the job service, which resolve
# with their dependencies (README, "Runners").
_LAUNCHER_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>ragbeam</groupId>
  <artifactId>flink-job-server-launcher</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.beam</groupId>
      <artifactId>beam-runners-flink-{flink}</artifactId><version>{beam}</version></dependency>
    <dependency><groupId>org.apache.beam</groupId>
      <artifactId>beam-runners-java-job-service</artifactId><version>{beam}</version></dependency>
    <dependency><groupId>org.slf4j</groupId>
      <artifactId>slf4j-simple</artifactId><version>1.7.30</version></dependency>
  </dependencies>
</project>
"""


def flink_jar_path(flink_version: str) -> Path:
    """Beam's own shaded job-server jar, where Maven would put it (used when present)."""
    name = f'beam-runners-flink-{flink_version}-job-server'
    return (Path.home() / '.m2' / 'repository' / 'org' / 'apache' / 'beam' / name / BEAM_VERSION
            / f'{name}-{BEAM_VERSION}.jar')


def flink_launcher_path(flink_version: str) -> Path:
    """ragbeam's job-server launcher for one Flink minor version, in the engine cache."""
    return (cache_root() / 'flink' / BEAM_VERSION
            / f'beam-runners-flink-{flink_version}-job-server-launcher.jar')


def flink_job_server_jar(flink_version: str) -> str:
    """A jar that starts the Flink job server of the SDK's Beam version: Beam's own from
    ~/.m2 when it is there; otherwise a launcher that ragbeam assembles once, with Maven,
    from the runner's modules (a manifest naming their jars in ~/.m2)."""
    for path in (flink_jar_path(flink_version), flink_launcher_path(flink_version)):
        if path.is_file():
            return str(path)
    return _assemble_launcher(flink_version)


def _assemble_launcher(flink_version: str) -> str:
    path = flink_launcher_path(flink_version)
    runner = f'org.apache.beam:beam-runners-flink-{flink_version}:{BEAM_VERSION}'
    command = 'python -m pipeline.engines'
    mvn = shutil.which('mvn')
    if mvn is None:
        raise UsageError(f'--runner FlinkRunner needs the Flink job server of Beam {BEAM_VERSION} '
                         f'({runner}): install Maven and Java 17 and run `{command}`, or pass '
                         '--flink_job_server_jar')
    if shutil.which('java') is None:
        raise UsageError('--runner FlinkRunner needs Java 17 (java is not on the PATH)')
    print(f'ragbeam: fetching the Flink {flink_version} job server of Beam {BEAM_VERSION} '
          f'({runner} and its dependencies) with Maven into ~/.m2 (once)', file=sys.stderr,
          flush=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as work:
        pom = Path(work) / 'pom.xml'
        pom.write_text(_LAUNCHER_POM.format(flink=flink_version, beam=BEAM_VERSION))
        classpath = Path(work) / 'classpath.txt'
        proc = _run([mvn, '-B', '-q', '-f', str(pom), 'dependency:build-classpath',
                     f'-Dmdep.outputFile={classpath}'], None)
        if proc.returncode != 0 or not classpath.is_file():
            raise UsageError(f'Maven could not fetch {runner} and its dependencies '
                             f'({_maven_reason(proc.stdout)}); pass --flink_job_server_jar, or '
                             'use --flink_version for another Flink')
        jars = [j for j in classpath.read_text().strip().split(os.pathsep) if j]
        launcher = Path(work) / path.name
        write_launcher(launcher, FLINK_LAUNCHER_MAIN, jars)
        os.replace(launcher, path)  # atomic, as for Prism
    return str(path)


def write_launcher(path: Path, main_class: str, jars: list[str]) -> None:
    """A jar holding only a manifest: its main class, and a class path of the given jars
    (file: URLs; manifest lines wrapped at 72 bytes, as the jar format requires)."""
    def line(text: str) -> bytes:
        raw = text.encode()
        parts = [raw[:72]] + [b' ' + raw[i:i + 71] for i in range(72, len(raw), 71)]
        return b'\r\n'.join(parts) + b'\r\n'
    manifest = (line('Manifest-Version: 1.0') + line(f'Main-Class: {main_class}')
                + line('Class-Path: ' + ' '.join(Path(j).resolve().as_uri() for j in jars))
                + b'\r\n')
    with zipfile.ZipFile(path, 'w') as z:
        z.writestr('META-INF/MANIFEST.MF', manifest)


def runner_args(args: list[str]) -> list[str]:
    """Beam args with the Prism binary or Flink job server filled in when the runner needs
    one and none is given (and Prism's job-server timeout: PRISM_JOB_SERVER_TIMEOUT)."""
    runner = _flag_value(args, '--runner')
    if runner in ('PrismRunner', 'prism'):
        extra = []
        if _flag_value(args, '--prism_location') is None:
            extra.append(f'--prism_location={prism_binary()}')
        if not any(_flag_value(args, f) for f in ('--job_server_timeout', '--job-server-timeout')):
            extra.append(f'--job_server_timeout={PRISM_JOB_SERVER_TIMEOUT}')
        return args + extra
    if runner in ('FlinkRunner', 'flink'):
        extra = []
        if _flag_value(args, '--flink_job_server_jar') is None:
            version = _flag_value(args, '--flink_version') or default_flink_version()
            extra.append(f'--flink_job_server_jar={flink_job_server_jar(version)}')
        if _flag_value(args, '--job_server_jvm_property') is None and \
                _flag_value(args, '--job_server_jvm_properties') is None:
            extra += [f'--job_server_jvm_property={p}' for p in FLINK_JVM_PROPERTIES]
        if _flag_value(args, '--environment_type') is None:
            # Beam's default for Flink is DOCKER; the SDK workers run in this process instead
            # (a cluster on other machines takes EXTERNAL, README "Runners")
            extra.append('--environment_type=LOOPBACK')
        return args + extra
    return args


def default_flink_version() -> str:
    from apache_beam.options.pipeline_options import FlinkRunnerOptions
    return FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS[-1]


def _flag_value(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + '='):
            return a[len(flag) + 1:]
    return None


def _run(cmd: list[str], env) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=_BUILD_SECONDS, check=False)
    except subprocess.TimeoutExpired:
        raise UsageError(f'`{" ".join(cmd[:3])}` did not finish in {_BUILD_SECONDS} s')


def _last_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    return lines[-1] if lines else 'no output'


def _maven_reason(output: str) -> str:
    for line in output.splitlines():
        if 'Could not find artifact' in line or 'was not found' in line:
            return 'the repository does not serve it'
    return _last_line(output).removeprefix('[ERROR] ')[:300]


def warm() -> int:
    """Builds or fetches what this machine's toolchain allows; one line for each engine."""
    logging.basicConfig(level=logging.WARNING)
    for name, get in (('Prism', prism_binary), ('Flink job server',
                                                lambda: flink_job_server_jar(
                                                    default_flink_version()))):
        try:
            print(f'ragbeam engines: {name}: {get()}', file=sys.stderr)
        except UsageError as e:
            print(f'ragbeam engines: {name} unavailable: {e}', file=sys.stderr)
    return 0


if __name__ == '__main__':
    sys.exit(warm())
