"""Memory you can watch: per-stage peaks and warnings from the workers, the driver's series of
the process tree, the progress line, and `ragbeam report`."""
from __future__ import annotations

import io
import json
import re
import time
from collections import Counter

import pytest

from pipeline.monitor import RunMonitor, progress_line
from tests.conftest import CORPUS, ragbeam
from transforms.monitor import WORK

PDF = 'pdf/sf-pdflatex-4-pages.pdf'
TEXT = 'text/rfc3986.txt'


@pytest.fixture(scope='module')
def warned_run(tmp_path_factory):
    """A text and a PDF with --memory-warn-mb 1: every stage passes the limit at once."""
    out = tmp_path_factory.mktemp('warned') / 'out'
    proc = ragbeam('run', '--input', CORPUS / TEXT, '--input', CORPUS / PDF, '--output', out,
                   '--embedder', 'hash', '--memory-warn-mb', '1', '--entities', 'spacy')
    return out, proc


def test_memory_warn_mb_warns_once_per_stage_and_fails_nothing(warned_run):
    out, proc = warned_run
    warned = Counter(re.findall(r'memory warning: stage (\w+) at \d+ MB', proc.stderr))
    assert warned == {'read': 1, 'pdf_child': 1, 'entities': 1, 'embed': 1, 'write': 1}, \
        proc.stderr[-3000:]
    assert re.search(r'stage read at \d+ MB \(over --memory-warn-mb 1\) while on \S+', proc.stderr)
    report = json.loads((out / 'report.json').read_text())
    assert report['objects_ok'] == 2 and report['objects_failed'] == 0


def test_report_json_carries_each_stage_and_the_tree_series(warned_run):
    report = json.loads((warned_run[0] / 'report.json').read_text())
    assert set(report['stages']) == {'read', 'pdf_child', 'entities', 'embed', 'write'}
    for name, stage in report['stages'].items():
        assert stage['peak_rss_mb'] > 1
        # the PDF child's time is the read's: it is sampled for its memory only
        assert stage['seconds'] is None if name == 'pdf_child' else stage['seconds'] >= 0
    # the embedding stage holds the spaCy model's process: more than a bare child's pages
    assert report['stages']['entities']['peak_rss_mb'] > report['stages']['pdf_child']['peak_rss_mb']
    series = report['rss_series']
    assert len(series) >= 2 and all(len(s) == 4 for s in series)
    assert [s[0] for s in series] == sorted(s[0] for s in series)  # seconds, increasing
    assert max(s[1] for s in series) <= report['peak_rss_mb'] + 1


def test_ragbeam_report_prints_the_table(warned_run):
    out = ragbeam('report', '--output', warned_run[0]).stdout
    report = json.loads((warned_run[0] / 'report.json').read_text())
    assert re.search(rf"objects listed\s+{report['objects_listed']}\b", out)
    assert re.search(rf"chunks\s+{report['chunks']:,}\b", out)
    for stage, row in report['stages'].items():
        seconds = '-' if row['seconds'] is None else f"{row['seconds']:.1f}"
        assert re.search(rf"^{stage}\s+{row['peak_rss_mb']:.0f}\s+{seconds}$", out, re.M), out


def test_ragbeam_report_draws_a_png(warned_run, tmp_path):
    from PIL import Image

    from pipeline.report import PNG_SIZE

    png = tmp_path / 'run.png'
    ragbeam('report', '--output', warned_run[0], '--png', png)
    with Image.open(png) as image:
        assert image.format == 'PNG' and image.size == PNG_SIZE


def test_report_without_a_run_is_a_usage_error(tmp_path):
    proc = ragbeam('report', '--output', tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.count('\n') == 1
    assert 'no report in' in proc.stderr


def test_failures_by_reason_are_in_the_table(tmp_path):
    (tmp_path / 'in').mkdir()
    (tmp_path / 'in' / 'broken.pdf').write_bytes(b'%PDF-1.4\nnot really a pdf\n')
    (tmp_path / 'in' / 'ok.txt').write_text('some text. ' * 50)
    ragbeam('run', '--input', tmp_path / 'in', '--output', tmp_path / 'out', '--embedder', 'hash')
    out = ragbeam('report', '--output', tmp_path / 'out').stdout
    assert re.search(r'not ok: \S.*\s1$', out, re.M), out


def test_progress_line_counts_against_the_listing():
    line = progress_line({'objects_listed': 78, 'objects_done': 12, 'bytes_listed': 66_100_000,
                          'bytes_read': 3_300_000, 'chunks_written': 1234}, elapsed=2.0)
    assert line == ('ragbeam: 12/78 objects, 3.3/66.1 MB read (5%), 1,234 chunks, 1.6 MB/s, '
                    'ETA 38 s')


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_is_redrawn_in_place_on_a_terminal():
    """Counts that workers add (here: this process, as on the in-process FnApiRunner) reach the
    driver's line, which is redrawn with a carriage return."""
    term = _Terminal()
    with RunMonitor(stream=term, sample_seconds=0.05) as monitor:
        WORK.add(objects_listed=2, bytes_listed=2000)
        WORK.add(bytes_read=1000, chunks_written=7)
        WORK.flush()
        deadline = time.monotonic() + 10
        while '7 chunks' not in term.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    shown = term.getvalue()
    assert '\r' in shown and '0/2 objects, 0.0/0.0 MB read (50%), 7 chunks' in shown
    assert monitor.series[-1][2:] == [1000, 7]


def test_progress_reaches_the_driver_from_worker_processes(tmp_path):
    """In multi-processing mode the counts come from the worker processes: the driver's series
    ends with the bytes they read."""
    out = tmp_path / 'out'
    ragbeam('run', '--input', CORPUS / 'text', '--output', out, '--embedder', 'hash',
            '--index-type', 'none', '--direct_num_workers', '2',
            '--direct_running_mode', 'multi_processing')
    report = json.loads((out / 'report.json').read_text())
    assert max(s[2] for s in report['rss_series']) > 0.5 * report['bytes_read']
