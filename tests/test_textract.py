"""--ocr textract: scanned pages of S3 PDFs read by AWS Textract on the object itself.

moto's Textract answers with canned blocks, at once and in one page: the run on moto proves
the calls, the chunks made of the answer, the accounting and a failed job's error records,
not OCR quality. Paging with NextToken, throttling and a job still in progress are proven
against botocore's Stubber, with a clock that does not wait."""
from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import CORPUS, check_output, ragbeam
from transforms.textract import TextractError, TextractOptions, TextractPages
from transforms.types import ObjectRef

SCAN = CORPUS / 'pdf' / 'ocrmypdf-c02-22.pdf'  # one scanned page, no text layer


def _line(page: int, text: str) -> dict:
    return {'BlockType': 'LINE', 'Page': page, 'Text': text, 'Id': f'{page}-{text}'}


class _Clock:
    """A clock that sleeps by moving on."""

    def __init__(self):
        self.now, self.sleeps = 0.0, []

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _stubbed(responses: list[tuple[str, dict, dict | str]], timeout: float = 900):
    """TextractPages over a stubbed client that expects `responses` in order: (operation,
    expected parameters, response, or an error code)."""
    import boto3
    from botocore.stub import ANY, Stubber

    client = boto3.client('textract', region_name='us-east-1', aws_access_key_id='x',
                          aws_secret_access_key='x')
    stub = Stubber(client)
    for operation, params, answer in responses:
        params = {k: (ANY if v is ANY else v) for k, v in params.items()}
        if isinstance(answer, str):
            stub.add_client_error(operation, service_error_code=answer, http_status_code=400,
                                  expected_params=params)
        else:
            stub.add_response(operation, answer, params)
    stub.activate()
    clock = _Clock()
    pages = TextractPages(TextractOptions(timeout=timeout), lambda: client, sleep=clock.sleep,
                          clock=lambda: clock.now)
    return pages, stub, clock


def _start(job='job-1'):
    from botocore.stub import ANY
    return ('start_document_text_detection',
            {'DocumentLocation': {'S3Object': {'Bucket': 'scans', 'Name': 'a/scan.pdf'}},
             'ClientRequestToken': ANY}, {'JobId': job})


def _get(status, blocks=(), token=None, next_token=None, job='job-1'):
    params = {'JobId': job, 'MaxResults': 1000, **({'NextToken': token} if token else {})}
    answer = {'JobStatus': status, 'Blocks': list(blocks),
              **({'NextToken': next_token} if next_token else {})}
    return 'get_document_text_detection', params, answer


REF = ObjectRef('s3://scans/a/scan.pdf', 1000, '"etag-1"', 0.0)


def test_a_job_is_retried_when_throttled_polled_while_in_progress_and_paged_to_its_end():
    from botocore.stub import ANY
    pages, stub, clock = _stubbed([
        ('start_document_text_detection', {'DocumentLocation': ANY, 'ClientRequestToken': ANY},
         'ProvisionedThroughputExceededException'),
        _start(),
        _get('IN_PROGRESS'),
        ('get_document_text_detection', {'JobId': 'job-1', 'MaxResults': 1000},
         'ThrottlingException'),
        _get('IN_PROGRESS'),
        _get('SUCCEEDED', [_line(1, 'first line'), _line(1, 'second line'),
                           {'BlockType': 'WORD', 'Page': 1, 'Text': 'first', 'Id': 'w'}],
             next_token='t1'),
        _get('SUCCEEDED', [_line(3, 'page three')], token='t1'),
    ])
    assert pages.page(REF, 3, 0) == 'first line\nsecond line'
    assert pages.page(REF, 3, 1) == ''  # Textract found no line there
    assert pages.page(REF, 3, 2) == 'page three'  # the same job's results, no more calls
    stub.assert_no_pending_responses()
    # backoff: each wait at most double the one before, all within the first poll's doubling
    assert len(clock.sleeps) == 4 and clock.sleeps[1] == 1.0 and clock.sleeps[3] == 2.0


def test_a_failed_job_fails_every_scanned_page_of_its_object_with_one_job():
    failed = ('get_document_text_detection', {'JobId': 'job-1', 'MaxResults': 1000},
              {'JobStatus': 'FAILED', 'StatusMessage': 'UNSUPPORTED_DOCUMENT'})
    pages, stub, _ = _stubbed([_start(), failed])
    for index in (0, 1):
        with pytest.raises(TextractError) as e:
            pages.page(REF, 2, index)
        assert e.value.error_type == 'TextractFailed' and 'UNSUPPORTED_DOCUMENT' in str(e.value)
    stub.assert_no_pending_responses()


def test_a_job_in_progress_past_the_timeout_is_an_error_not_a_hang():
    pages, _, clock = _stubbed([_start()] + [_get('IN_PROGRESS')] * 6, timeout=20)
    with pytest.raises(TextractError) as e:
        pages.page(REF, 1, 0)
    assert e.value.error_type == 'TextractTimeout' and clock.now <= 20


def test_an_object_over_textracts_limits_fails_without_a_call():
    pages, stub, _ = _stubbed([])
    big = ObjectRef(REF.uri, 600 * 2**20, '"e"', 0.0)
    with pytest.raises(TextractError) as e:
        pages.page(big, 10, 0)
    assert e.value.error_type == 'TextractLimit'
    with pytest.raises(TextractError):
        pages.page(ObjectRef('s3://scans/b.pdf', 1000, '"e"', 0.0), 3001, 0)
    stub.assert_no_pending_responses()


@pytest.fixture
def canned_textract():
    """moto's Textract answers (class-wide, in this process's server) set for one test."""
    from moto.textract.models import TextractBackend

    saved = TextractBackend.BLOCKS, TextractBackend.JOB_STATUS
    yield TextractBackend
    TextractBackend.BLOCKS, TextractBackend.JOB_STATUS = saved


def _errors(out) -> list[dict]:
    return [json.loads(line) for f in (out / 'errors').glob('*.jsonl')
            for line in f.read_text().splitlines()]


def test_a_scanned_s3_pdf_gets_its_pages_from_textract_and_a_failed_job_is_recorded(
        s3, canned_textract, tmp_path):
    client = s3.client()
    client.create_bucket(Bucket='scans')
    client.upload_file(str(SCAN), 'scans', 'a/scan.pdf')
    local = tmp_path / 'src'
    local.mkdir()
    shutil.copy(SCAN, local / 'scan.pdf')
    canned_textract.BLOCKS = [{'BlockType': 'PAGE', 'Page': 1, 'Id': 'p'},
                              _line(1, 'The garden wall stood on the shoulders of the hill.'),
                              _line(1, 'Textract read this line from the scanned page.')]
    canned_textract.JOB_STATUS = 'SUCCEEDED'
    args = ('--input', 's3://scans/a/**', *s3.endpoint_args, '--ocr', 'textract',
            '--textract-endpoint-url', s3.endpoint)
    out = tmp_path / 'out'
    ragbeam('run', *args, '--output', out)
    from deltalake import DeltaTable
    rows = DeltaTable(str(out / 'chunks')).to_pyarrow_table(
        columns=['page', 'text', 'extractor']).to_pylist()
    assert rows and {r['extractor'] for r in rows} == {'ocr-textract'}
    assert 'garden wall' in ' '.join(r['text'] for r in rows) and {r['page'] for r in rows} == {1}
    manifest, = DeltaTable(str(out / 'manifest')).to_pyarrow_table().to_pylist()
    assert (manifest['status'], manifest['ocr_needed_pages']) == ('ok', 0)
    assert not _errors(out)
    check_output(out, '--input', local)  # OCR'd chunks are counted, not re-derived

    canned_textract.JOB_STATUS = 'FAILED'
    failed = tmp_path / 'failed'
    ragbeam('run', *args, '--output', failed)  # one bad job never fails the run
    error, = _errors(failed)
    assert (error['uri'], error['page'], error['error_type']) == (
        's3://scans/a/scan.pdf', 1, 'TextractFailed')


def test_textract_on_an_input_that_is_not_on_s3_is_a_one_line_error(tmp_path):
    proc = ragbeam('run', '--input', SCAN, '--output', tmp_path / 'out', '--ocr', 'textract',
                   check=False)
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        'ragbeam: error: --ocr textract reads scans where they lie, on S3:')
