"""Scanned pages of PDFs on S3, read by AWS Textract on the object itself (no download).

One asynchronous text detection job per object version (`StartDocumentTextDetection` on the
S3 object, pinned to the listed version), its results paged with `NextToken`. Throttling is
retried with capped exponential backoff and jitter; a job still `IN_PROGRESS` is polled the
same way until `--textract-timeout`. The text of a page is its LINE blocks, one per line.

A worker keeps the page texts of one object at a time (Textract's limit, 3,000 pages, bounds
them), so the restrictions of one PDF that a worker reads in turn share one job. Workers that
read other restrictions of the same object send the same ClientRequestToken, which Textract
answers with the same job.
"""
from __future__ import annotations

import hashlib
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, TypeVar

from transforms.pdf_sandbox import PdfError
from transforms.types import ObjectRef

_log = logging.getLogger(__name__)
T = TypeVar('T')

EXTRACTOR = 'ocr-textract'  # the contract's OCR extractors start with "ocr" or "tesseract"
MAX_BYTES = 500 * 2**20  # Textract's limits for an asynchronous PDF job
MAX_PAGES = 3000
_THROTTLED = {'ProvisionedThroughputExceededException', 'ThrottlingException',
              'LimitExceededException', 'InternalServerError', 'ServiceUnavailable'}


@dataclass(frozen=True)
class TextractOptions:
    """Where Textract is and how long a job may take."""
    timeout: float = field(default=900.0, metadata={
        'flag': '--textract-timeout',
        'help': "seconds a Textract job may take before its object's scanned pages fail"})
    endpoint_url: Optional[str] = field(default=None, metadata={
        'flag': '--textract-endpoint-url', 'help': 'Textract endpoint (moto, a VPC endpoint)'})
    first_poll: float = 1.0
    max_poll: float = 30.0

    def validate(self) -> None:
        if self.timeout <= 0:
            raise ValueError('--textract-timeout must be positive')


class TextractError(PdfError):
    """A Textract job that failed, timed out, or an object beyond Textract's limits."""


def s3_location(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len('s3://'):].partition('/')
    return bucket, key


class TextractPages:
    """The OCR'd text of the pages of S3 PDFs, from one Textract job per object version."""

    def __init__(self, options: TextractOptions, client_factory: Callable[[], object],
                 sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self._options = options
        self._make_client = client_factory
        self._client = None
        self._sleep, self._clock = sleep, clock
        self._key: Optional[tuple[str, str]] = None
        self._pages: dict[int, str] = {}
        self._failure: Optional[TextractError] = None

    def page(self, ref: ObjectRef, pages: int, index: int) -> str:
        """The text of page `index` (0-based) of `ref`, a PDF of `pages` pages."""
        if (ref.uri, ref.version) != self._key:
            self._key, self._pages, self._failure = (ref.uri, ref.version), {}, None
            try:
                self._pages = self._detect(ref, pages)
            except TextractError as e:
                self._failure = e  # every scanned page of the object fails alike, one job
        if self._failure is not None:
            raise self._failure
        return self._pages.get(index + 1, '')

    def _detect(self, ref: ObjectRef, pages: int) -> dict[int, str]:
        if ref.size > MAX_BYTES or pages > MAX_PAGES:
            raise TextractError('TextractLimit', f'{ref.uri}: {ref.size} bytes, {pages} pages; '
                                f'Textract takes at most {MAX_BYTES >> 20} MB and '
                                f'{MAX_PAGES} pages')
        bucket, key = s3_location(ref.uri)
        # Textract reads the object's current version: a listing gives ETags, not the
        # version ids Textract could pin to
        s3_object = {'Bucket': bucket, 'Name': key}
        token = hashlib.sha256(f'{ref.uri}\0{ref.version}'.encode()).hexdigest()[:64]
        job = self._call('StartDocumentTextDetection', lambda c: c.start_document_text_detection(
            DocumentLocation={'S3Object': s3_object}, ClientRequestToken=token))['JobId']
        return self._results(ref, job)

    def _results(self, ref: ObjectRef, job: str) -> dict[int, str]:
        """Page number -> text, paging through the job's results once it has finished."""
        deadline = self._clock() + self._options.timeout
        delay = self._options.first_poll
        lines: dict[int, list[str]] = {}
        token = None
        while True:
            kwargs = {'JobId': job, 'MaxResults': 1000, **({'NextToken': token} if token else {})}
            answer = self._call('GetDocumentTextDetection',
                                lambda c: c.get_document_text_detection(**kwargs))
            status = answer['JobStatus']
            if status == 'IN_PROGRESS':
                if self._clock() + delay > deadline:
                    raise TextractError('TextractTimeout', f'{ref.uri}: job {job} still in '
                                        f'progress after {self._options.timeout:g} s')
                self._sleep(delay)
                delay = min(self._options.max_poll, delay * 2)
                continue
            if status == 'FAILED':
                raise TextractError('TextractFailed', f"{ref.uri}: job {job} failed: "
                                    f"{answer.get('StatusMessage', 'no reason given')}")
            if status == 'PARTIAL_SUCCESS':
                _log.warning('ragbeam: Textract job %s on %s succeeded in part: %s', job,
                             ref.uri, answer.get('StatusMessage', ''))
            for block in answer.get('Blocks', ()):
                if block.get('BlockType') == 'LINE':
                    lines.setdefault(block.get('Page', 1), []).append(block.get('Text', ''))
            token = answer.get('NextToken')
            if not token:
                return {page: '\n'.join(text) for page, text in lines.items()}

    def _call(self, what: str, call: Callable[[object], T]) -> T:
        """One Textract request, retried with backoff while it is throttled."""
        from botocore.exceptions import BotoCoreError, ClientError

        if self._client is None:
            self._client = self._make_client()
        delay = self._options.first_poll
        deadline = self._clock() + self._options.timeout
        while True:
            try:
                return call(self._client)
            except ClientError as e:
                code = e.response.get('Error', {}).get('Code', '')
                if code not in _THROTTLED or self._clock() + delay > deadline:
                    raise TextractError('TextractError', f'{what}: {code}: {e}') from e
                _log.warning('ragbeam: Textract %s throttled (%s); retrying', what, code)
            except BotoCoreError as e:  # connection errors, timeouts
                if self._clock() + delay > deadline:
                    raise TextractError('TextractError', f'{what}: {e}') from e
            self._sleep(random.uniform(delay / 2, delay))
            delay = min(self._options.max_poll, delay * 2)
