"""Dataflow, offline: a dry run on DataflowRunner with the corpus on gs:// (the shared GCS
emulator) translates the job, and its request stays small and flat in the committed corpus."""
from __future__ import annotations

import json
import re

import pyarrow as pa

from tests.conftest import ROOT, ragbeam

IMAGE = 'europe-docker.pkg.dev/my-project/ragbeam/worker:0.1.0'  # as README, "Dataflow", tags it


def _committed(gcs, output: str, n: int) -> None:
    """A committed corpus of `n` objects' manifest rows (an empty chunk table beside it),
    written straight into the bucket: the dry run reads the tables' versions, never a row."""
    from deltalake import write_deltalake

    from transforms.store import StoreConfig
    from transforms.types import MANIFEST_SCHEMA, chunk_schema

    options = StoreConfig(gcs_endpoint_url=gcs.endpoint).delta_storage_options(output)
    rows = {name: [None] * n for name in MANIFEST_SCHEMA.names}
    rows.update(uri=[f'gs://docs/f{i // 100:06d}/o{i:08d}.txt' for i in range(n)],
                version=[str(i) for i in range(n)], status=['ok'] * n, chunks=[1] * n)
    write_deltalake(f'{output}/manifest', pa.table(rows, schema=MANIFEST_SCHEMA),
                    storage_options=options)
    write_deltalake(f'{output}/chunks', chunk_schema(384).empty_table(),
                    storage_options=options)


def test_a_dataflow_dry_run_over_gcs_is_a_small_job_flat_in_the_committed_corpus(gcs, tmp_path):
    gcs.create_bucket('dataflow')
    sizes = {}
    for n in (1_000, 100_000):
        output = f'gs://dataflow/corpus{n}'
        _committed(gcs, output, n)
        job_file = tmp_path / f'job-{n}.json'
        # --sdk_location container: the image holds the SDK (no download from PyPI);
        # --no_auth: offline, the emulator needs none
        proc = ragbeam('run', '--input', 'gs://corpus/text/**', '--output', output,
                       '--runner', 'DataflowRunner', '--dry_run', '--project', 'my-project',
                       '--region', 'europe-west1', '--temp_location', 'gs://dataflow/tmp',
                       '--sdk_container_image', IMAGE, '--sdk_location', 'container',
                       '--setup_file', ROOT / 'setup.py', '--no_auth',
                       '--dataflow_job_file', job_file, timeout=300)
        assert 'translated, not run' in proc.stderr
        proto = int(re.search(r'pipeline proto is (\d+) bytes', proc.stderr).group(1))
        assert f'job request {job_file.stat().st_size} bytes' in proc.stderr
        job = json.loads(job_file.read_text())
        sizes[n] = proto + job_file.stat().st_size
        pool, = job['environment']['workerPools']
        assert [i['containerImage'] for i in pool['sdkHarnessContainerImages']] == [IMAGE]
        # the setup the README names: ragbeam's sdist, staged beside the pipeline proto
        staged = {p['name'] for p in pool['packages']}
        assert 'workflow.tar.gz' in staged, staged
    assert sizes[100_000] < 1 << 20, sizes
    assert abs(sizes[100_000] - sizes[1_000]) < 10_000, sizes


def test_the_flex_template_takes_every_run_flag_as_a_parameter():
    from pipeline.cli import run_options
    from pipeline.flex import metadata, run_argv

    assert json.loads((ROOT / 'dataflow' / 'metadata.json').read_text()) == metadata(), (
        'dataflow/metadata.json is stale: python -m pipeline.flex --metadata > '
        'dataflow/metadata.json')
    argv = run_argv(['--input=gs://docs/**', '--output=gs://corpus/docs', '--chunk_size=500',
                     '--full=true', '--s3_path_style=false', '--temp_location=gs://t/tmp'])
    assert argv == ['run', '--input=gs://docs/**', '--output=gs://corpus/docs',
                    '--chunk-size=500', '--full', '--temp_location=gs://t/tmp']
    opts = run_options(argv[1:])
    assert (opts.inputs, opts.chunker.size, opts.backfill.full) == (['gs://docs/**'], 500,
                                                                        True)
    assert '--temp_location=gs://t/tmp' in opts.beam_args


def test_the_worker_image_recipe_lints_clean_and_names_the_tested_beam():
    """The image cannot be built here (no registry to pull Beam's image from): hadolint
    checks the Dockerfile, and its Beam is the one constraints.txt tests."""
    import subprocess
    import sys
    from pathlib import Path

    dockerfile = ROOT / 'dataflow' / 'Dockerfile'
    hadolint = Path(sys.executable).parent / 'hadolint'
    proc = subprocess.run([str(hadolint), '--no-color', str(dockerfile)], capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    beam, = re.findall(r'^apache-beam==(\S+)$', (ROOT / 'constraints.txt').read_text(), re.M)
    assert f'ARG BEAM_VERSION={beam}\n' in dockerfile.read_text()
