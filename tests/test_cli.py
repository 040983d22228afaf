"""User mistakes end in one line on stderr and a non-zero exit, never a traceback."""
from __future__ import annotations

import json

import pytest

from tests.conftest import CORPUS, ROOT, ragbeam


@pytest.mark.parametrize('args,message', [
    (['run', '--input', '/no/such/path', '--output', '{tmp}/o'], 'matches no files'),
    (['run', '--input', str(CORPUS / 'text'), '--output', '/proc/forbidden/o'], 'cannot write'),
    (['run', '--input', str(CORPUS / 'text'), '--output', '{tmp}/o', '--chunk-size', '10'],
     '--chunk-size'),
    (['run', '--input', str(CORPUS / 'text'), '--output', '{tmp}/o', '--no-such-flag', '1'],
     'unknown option --no-such-flag'),
    (['run', '--input', str(CORPUS / 'text'), '--output', '{tmp}/o', '--window-bytes', 'lots'],
     'not a byte size'),
    (['run', '--output', '{tmp}/o'], '--input'),
    (['query', '--output', '{tmp}/nothing', 'hello'], 'no index'),
    (['index', '--output', '{tmp}/o', '--direct_num_wokers', '2'],
     'unknown option --direct_num_wokers'),
    (['index', '--output', '{tmp}/never-ran'], 'no chunk table'),
    (['query', '--output', '{tmp}/o', '-k', '0', 'hello'], 'must be at least 1'),
    (['query', '--output', '{tmp}/o', '-k', '-3', 'hello'], 'must be at least 1'),
    (['query', '--output', '{tmp}/o', '--entity', 'Paris', 'hello'], 'LABEL:TEXT'),
    (['run', '--input', str(CORPUS / 'text'), '--output', '{tmp}/o', '--runner', 'DataflowRunner',
      '--dry_run', '--project', 'p', '--region', 'us-central1', '--temp_location', 'gs://b/tmp'],
     'not a valid GCS bucket name'),
])
def test_usage_errors_are_one_line(tmp_path, args, message):
    proc = ragbeam(*[a.format(tmp=tmp_path) for a in args], check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('ragbeam: error:') and message in lines[0]
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('command', [['run', '--input', str(CORPUS / 'text')], ['query', 'hello'],
                                     ['index'], ['report'], ['history']])
def test_an_s3_output_without_credentials_is_a_one_line_error(monkeypatch, command):
    """Before Beam's s3io is asked anything (it retried for minutes on `query`)."""
    for name in ('AWS_ACCESS_KEY_ID', 'AWS_SECRET_ACCESS_KEY', 'AWS_SESSION_TOKEN', 'AWS_PROFILE'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv('AWS_SHARED_CREDENTIALS_FILE', '/nonexistent')
    monkeypatch.setenv('AWS_CONFIG_FILE', '/nonexistent')
    monkeypatch.setenv('AWS_EC2_METADATA_DISABLED', 'true')
    monkeypatch.setenv('AWS_DEFAULT_REGION', 'us-east-1')
    proc = ragbeam(command[0], '--output', 's3://results/run1', *command[1:], check=False,
                   timeout=60)
    assert proc.returncode == 2
    line, = proc.stderr.strip().splitlines()
    assert line == ('ragbeam: error: s3://results/run1: no AWS credentials found (set '
                    'AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, as for the '
                    'aws command)'), proc.stderr


def test_the_readme_option_table_is_the_help(capsys):
    """Every `ragbeam run` flag is in the README's table with its default, and nothing else."""
    from pipeline.cli import parser
    from pipeline.options import RunOptions, default_text, flag_fields

    readme = (ROOT / 'README.md').read_text()
    table = readme[readme.index('| option | default | meaning |'):]
    table = table[:table.index('\n\n')]
    rows = {}
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip('|').split('|')]
        rows[cells[0].strip('`')] = cells[1]
    documented = {f.metadata['flag']: default_text(f) for _, f, _ in flag_fields(RunOptions)}
    assert rows == documented
    with pytest.raises(SystemExit):
        parser().parse_args(['run', '--help'])
    help_text = ' '.join(capsys.readouterr().out.split())
    for flag, default in documented.items():
        assert flag in help_text and f'(default: {default})' in help_text


def test_query_finds_known_chunks(text_run):
    import pyarrow.dataset as ds

    rows = ds.dataset(text_run / 'chunks').to_table(columns=['chunk_id', 'text']).to_pylist()
    probes = [r for r in rows if len(r['text'].split()) > 60][::97][:10]
    found = 0
    for row in probes:
        words = row['text'].split()
        span = ' '.join(words[len(words) // 2:len(words) // 2 + 12])
        hits = json.loads(ragbeam('query', '--output', text_run, '-k', '10', '--json', span).stdout)
        assert hits and {'score', 'chunk_id', 'uri', 'page', 'start', 'end', 'text'} <= set(hits[0])
        found += row['chunk_id'] in {h['chunk_id'] for h in hits}
    assert found >= 0.9 * len(probes)


def test_query_prints_readable_results(text_run):
    out = ragbeam('query', '--output', text_run, '-k', '3', 'uniform resource identifier').stdout
    assert out.startswith(' 1. ') and 'rfc3986.txt' in out
