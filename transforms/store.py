"""Object stores behind one small interface: list objects, read a byte range of a version.

- local files: seek + read, pinned to size + mtime;
- S3 (boto3): lazy ListObjectsV2 pages, bounded `Range: bytes=a-b` GETs pinned with IfMatch;
- GCS (google-cloud-storage): lazy listing, ranged reads pinned with if_generation_match;
- any other Beam FileSystems scheme: a generic fallback, not pinned to a version.

Reads to S3 and GCS are retried with exponential backoff and jitter, a bounded number of
times, and each range must come back with exactly the bytes asked for. Writes go through
Beam's FileSystems (see transforms.outputs).
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, TypeVar

from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.types import ObjectRef

_log = logging.getLogger(__name__)
_retries = Metrics.counter('ragbeam', 'store_retries')
T = TypeVar('T')
GCS_EMULATOR_ENV = 'STORAGE_EMULATOR_HOST'  # google-cloud-storage's, which Beam's gcsio uses


class StoreError(IOError):
    """A store operation failed for good (after retries, or not retryable)."""


class ObjectChangedError(StoreError):
    """The object is no longer the version that was listed."""


class ObjectNotFoundError(StoreError):
    """The object was deleted after it was listed."""


class TransientError(StoreError):
    """A failure worth another attempt: throttling, 5xx, a dropped connection, a short body."""


@dataclass(frozen=True)
class StoreConfig:
    """How to reach object stores and how hard to retry."""
    s3_endpoint_url: Optional[str] = field(default=None, metadata={
        'flag': '--s3-endpoint-url', 'help': 'S3-compatible endpoint: MinIO, moto, Ceph, ...'})
    s3_region: Optional[str] = field(default=None, metadata={
        'flag': '--s3-region', 'default_text': 'AWS config', 'help': 'S3 region'})
    s3_path_style: bool = field(default=False, metadata={
        'flag': '--s3-path-style',
        'help': 'path-style S3 addressing (http://host/bucket/key), as MinIO usually needs'})
    gcs_endpoint_url: Optional[str] = field(default=None, metadata={
        'flag': '--gcs-endpoint-url', 'default_text': f'${GCS_EMULATOR_ENV}',
        'help': 'GCS endpoint reached with anonymous credentials, for every GCS client (an '
                'emulator such as fake-gcs-server)'})
    max_attempts: int = field(default=6, metadata={
        'flag': '--store-max-attempts',
        'help': 'attempts per S3/GCS request (throttling, 5xx, cut connections, short bodies) '
                'before the object fails'})
    backoff_seconds: float = 0.1
    max_backoff_seconds: float = 10.0

    def validate(self) -> None:
        if self.max_attempts < 1:
            raise ValueError('--store-max-attempts must be at least 1')

    def gcs_endpoint(self) -> Optional[str]:
        """The GCS emulator that every client is pointed at, if any: --gcs-endpoint-url, else
        $STORAGE_EMULATOR_HOST as google-cloud-storage reads it."""
        return self.gcs_endpoint_url or os.environ.get(GCS_EMULATOR_ENV) or None

    def delta_storage_options(self, uri: str) -> Optional[dict]:
        """deltalake's (delta-rs) storage options for a table at `uri`: the same endpoint and
        region; credentials come from the environment, as for boto3 and google-cloud."""
        if uri.startswith('gs://'):
            return self._delta_gcs_options()
        if not uri.startswith('s3://'):
            return None
        found = {'conditional_put': 'etag'}  # S3's If-None-Match: safe concurrent commits
        if self.s3_endpoint_url:
            found['AWS_ENDPOINT_URL'] = self.s3_endpoint_url
            if self.s3_endpoint_url.startswith('http://'):
                found['AWS_ALLOW_HTTP'] = 'true'
        region = self.s3_region or os.environ.get('AWS_REGION') or os.environ.get(
            'AWS_DEFAULT_REGION')
        if region:
            found['AWS_REGION'] = region
        if self.s3_path_style:
            found['AWS_VIRTUAL_HOSTED_STYLE_REQUEST'] = 'false'
        return found

    def _delta_gcs_options(self) -> Optional[dict]:
        # delta-rs commits through GCS's XML API with x-goog-if-generation-match: 0 on each log
        # entry, so concurrent commits are safe with no option. Without an emulator it finds
        # credentials itself (GOOGLE_APPLICATION_CREDENTIALS, the ADC file, the metadata server).
        endpoint = self.gcs_endpoint()
        if not endpoint:
            return None
        # object_store (delta-rs's storage layer) takes an endpoint only inside a service
        # account key; an empty key with OAuth disabled sends no credentials, as delta-rs's own
        # GCS tests do
        key = {'gcs_base_url': endpoint.rstrip('/'), 'disable_oauth': True, 'client_email': '',
               'private_key': '', 'private_key_id': ''}
        return {'google_service_account_key': json.dumps(key),
                'allow_http': str(endpoint.startswith('http://')).lower()}


def retrying(config: StoreConfig, what: str, call: Callable[[], T]) -> T:
    """Runs `call`, retrying TransientError with capped exponential backoff and full jitter."""
    for attempt in range(1, config.max_attempts + 1):
        try:
            return call()
        except TransientError as e:
            if attempt == config.max_attempts:
                raise StoreError(f'{what}: gave up after {attempt} attempts: {e}') from e
            delay = min(config.max_backoff_seconds, config.backoff_seconds * 2 ** (attempt - 1))
            _retries.inc()
            _log.warning('%s: attempt %d failed (%s); retrying', what, attempt, e)
            time.sleep(random.uniform(0, delay))
    raise AssertionError('unreachable')


def glob_to_prefix(pattern: str) -> tuple[str, Callable[[str], bool]]:
    """Splits a key pattern into its literal prefix and a matcher of whole keys.

    `*` and `?` stay within one path segment, `**` crosses segments; a pattern without
    wildcards matches that key and everything below it as a prefix.
    """
    wild = re.search(r'[*?\[]', pattern)
    if not wild:
        below = pattern.rstrip('/') + '/'
        return pattern, lambda key: key == pattern or key.startswith(below) or pattern in ('', '/')
    regex = ''
    for token in re.split(r'(\*\*|\*|\?)', pattern):
        regex += {'**': '.*', '*': '[^/]*', '?': '[^/]'}.get(token) or fnmatch.translate(
            token)[4:-3]  # fnmatch escapes the literal part: '(?s:' ... ')\\Z'
    compiled = re.compile(regex, re.S)
    return pattern[:wild.start()], lambda key: compiled.fullmatch(key) is not None


class Store:
    """Lists objects and reads byte ranges of one listed version (generic, unpinned).

    Besides `list`, a store lists in URI order: `children` names what is right under a
    root (a delimiter listing), and `walk` lists the objects under a root within a range
    [lo, hi) of URIs, page by page. The diff merges that order with the committed manifest's.
    """

    def list(self, pattern: str) -> Iterator[ObjectRef]:
        """Every object matching `pattern`; a directory or prefix means everything below it."""
        if FileSystems.get_scheme(pattern) is None and os.path.isdir(pattern):
            pattern = os.path.join(pattern, '**')
        for match in FileSystems.match([pattern])[0].metadata_list:
            yield self.ref(match)

    def root(self, literal: str) -> str:
        """Where a listing of URIs that start with `literal` begins: the literal itself on a
        bucket (a key prefix), the folder that holds it on a local disk."""
        return literal

    def children(self, root: str, limit: int) -> list[str]:
        """Up to `limit` names right under `root`, in URI order, a folder's with a trailing
        '/' (the first ones, or a sample spread over all of them where the store can take
        one); none where the store cannot tell (then the listing is one range)."""
        return []

    def walk(self, root: str, lo: Optional[str], hi: Optional[str]) -> Iterator[ObjectRef]:
        """The objects whose URI starts with `root` and lies in [lo, hi) (None: open), in URI
        order."""
        found = sorted(self.list(root), key=lambda r: r.uri)
        yield from (r for r in found if in_range(r.uri, lo, hi))

    def ref(self, meta: FileMetadata) -> ObjectRef:
        return ObjectRef(meta.path, meta.size_in_bytes,
                         f'{meta.size_in_bytes}-{int(meta.last_updated_in_seconds * 1e6)}',
                         meta.last_updated_in_seconds or 0.0)

    def read_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        """Bytes [start, end) of the listed version (fewer only at the object's end)."""
        with FileSystems.open(ref.uri, compression_type='uncompressed') as f:
            f.seek(start)
            return f.read(end - start)


def in_range(uri: str, lo: Optional[str], hi: Optional[str]) -> bool:
    """Whether `uri` lies in [lo, hi); None is an open end."""
    return (lo is None or uri >= lo) and (hi is None or uri < hi)


LIST_FAIL_ENV = 'RAGBEAM_TEST_LIST_FAIL'  # tests: a local folder whose path holds this fails


class LocalStore(Store):
    """Local files: absolute paths, version = size-mtime_ns, checked on every read.

    A folder is listed in URI order by sorting its entries with a '/' after each folder's
    name: every path below folder `a` starts with `a/`, so `a-b` comes before it, as in a
    sort of whole paths (and in S3's key order).
    """

    def root(self, literal: str) -> str:
        if os.path.isdir(literal):
            return literal.rstrip('/') + '/'
        return os.path.dirname(literal).rstrip('/') + '/'

    def children(self, root: str, limit: int) -> list[str]:
        """Every name of a folder of up to `limit` entries; of a bigger one, `limit` names
        sampled over the whole folder (a reservoir, seeded: the same names for the same
        folder), so that ranges cut at them split a flat folder of millions of files evenly
        while the planner holds `limit` names."""
        sample: list[str] = []
        pick = random.Random(root)
        for n, key in enumerate(key for key, _ in self._scan(root)):
            if n < limit:
                sample.append(key)
            elif (at := pick.randrange(n + 1)) < limit:
                sample[at] = key
        return sorted(key[len(root):] for key in sample)

    def walk(self, root: str, lo: Optional[str], hi: Optional[str]) -> Iterator[ObjectRef]:
        if not os.path.isdir(root):  # a pattern that names one file
            if os.path.isfile(root.rstrip('/')) and in_range(root.rstrip('/'), lo, hi):
                yield self._ref(root.rstrip('/'), os.stat(root.rstrip('/')))
            return
        for key, entry in self._entries(root, lo, hi):
            if key.endswith('/'):
                yield from self.walk(key, lo, hi)
            elif entry.is_file():  # in the range: _entries holds no other
                try:
                    st = entry.stat()
                except FileNotFoundError:  # deleted since the folder was read: not listed
                    continue
                yield self._ref(key, st)

    @classmethod
    def _entries(cls, folder: str, lo: Optional[str] = None, hi: Optional[str] = None) -> list:
        """(URI-order key, entry) of a folder's entries that may hold a URI in [lo, hi), sorted
        by key; a folder's key ends with '/'. Only those are held: a range of a flat folder of
        millions of files costs its own share of them."""
        def wanted(key: str) -> bool:
            if key.endswith('/'):  # below it, every path sorts before lo, or none does
                return (hi is None or key < hi) and (lo is None or key >= lo
                                                     or lo.startswith(key))
            return in_range(key, lo, hi)
        return sorted(((key, e) for key, e in cls._scan(folder) if wanted(key)),
                      key=lambda pair: pair[0])

    @staticmethod
    def _scan(folder: str) -> Iterator[tuple[str, os.DirEntry]]:
        """(URI-order key, entry) of a folder's entries as the OS gives them. A folder link is
        not followed, as in Beam's local listing."""
        hook = os.environ.get(LIST_FAIL_ENV)
        try:
            if hook and hook in folder:
                raise OSError(f'injected listing failure ({LIST_FAIL_ENV})')
            with os.scandir(folder) as found:
                for e in found:
                    yield e.path + '/' if e.is_dir(follow_symlinks=False) else e.path, e
        except OSError as e:
            raise StoreError(f'cannot list {folder}: {e}') from e

    @staticmethod
    def _ref(path: str, st: os.stat_result) -> ObjectRef:
        return ObjectRef(path, st.st_size, _local_version(st), st.st_mtime)

    def ref(self, meta: FileMetadata) -> ObjectRef:
        path = os.path.abspath(meta.path)
        st = os.stat(path)
        return ObjectRef(path, meta.size_in_bytes, _local_version(st), st.st_mtime)

    def read_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        try:
            with open(ref.uri, 'rb') as f:
                if _local_version(os.fstat(f.fileno())) != ref.version:
                    raise ObjectChangedError(f'{ref.uri} changed during read')
                f.seek(start)
                return f.read(end - start)
        except FileNotFoundError as e:
            raise ObjectNotFoundError(f'{ref.uri} not found') from e


def _local_version(st: os.stat_result) -> str:
    return f'{st.st_size}-{st.st_mtime_ns}'


def key_before(key: str) -> str:
    """A key that sorts just before `key`, for S3's StartAfter (which is exclusive): no real
    key lies between the two."""
    last = ord(key[-1])
    return key[:-1] + (chr(last - 1) + '\U0010ffff' if last > 1 else '')


def key_after_all(prefix: str) -> Optional[str]:
    """The first key past every key that starts with `prefix` (None: no such key)."""
    while prefix and ord(prefix[-1]) == 0x10ffff:
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None


def split_uri(uri: str) -> tuple[str, str]:
    """'s3://bucket/a/b' -> ('bucket', 'a/b')."""
    bucket, _, key = uri.split('://', 1)[1].partition('/')
    return bucket, key


class BucketStore(Store):
    """What S3 and GCS share: glob listing page by page, exact ranged reads with retries."""
    scheme = ''

    def __init__(self, config: StoreConfig):
        self._config = config

    def list(self, pattern: str) -> Iterator[ObjectRef]:
        bucket, key_pattern = split_uri(pattern)
        prefix, matches = glob_to_prefix(key_pattern)
        token = None
        while True:
            objects, token = retrying(self._config, f'list {pattern}',
                                      lambda: self._page(pattern, bucket, prefix, token))
            for key, size, version, modified in objects:
                if matches(key) and not key.endswith('/'):
                    yield ObjectRef(f'{self.scheme}://{bucket}/{key}', size, version, modified)
            if not token:
                return

    def children(self, root: str, limit: int) -> list[str]:
        bucket, prefix = split_uri(root)
        names, token = [], None
        while len(names) < limit:
            page, token = retrying(self._config, f'list {root}',
                                   lambda: self._folders(root, bucket, prefix, token))
            names += [name[len(prefix):] for name in page]
            if not token:
                break
        return sorted(names)[:limit]

    def walk(self, root: str, lo: Optional[str], hi: Optional[str]) -> Iterator[ObjectRef]:
        bucket, prefix = split_uri(root)
        base = f'{self.scheme}://{bucket}/'
        start = lo[len(base):] if lo is not None and lo > root else None
        stop = hi[len(base):] if hi is not None else None
        token = None
        while True:
            objects, token = retrying(self._config, f'list {root}', lambda: self._page(
                root, bucket, prefix, token, start=start, stop=stop))
            for key, size, version, modified in objects:
                uri = base + key
                if hi is not None and uri >= hi:
                    return
                if in_range(uri, lo, hi) and not key.endswith('/'):
                    yield ObjectRef(uri, size, version, modified)
            if not token:
                return

    def read_range(self, ref: ObjectRef, start: int, end: int) -> bytes:
        want = max(0, min(end, ref.size) - start)
        if want == 0:
            return b''
        bucket, key = split_uri(ref.uri)
        what = f'read {ref.uri} [{start}, {start + want})'

        def get() -> bytes:
            data = self._get(ref, bucket, key, start, start + want - 1)
            if len(data) != want:
                raise TransientError(f'{what} returned {len(data)} bytes')
            return data

        return retrying(self._config, what, get)

    def _page(self, pattern: str, bucket: str, prefix: str, token: Optional[str],
              start: Optional[str] = None, stop: Optional[str] = None
              ) -> tuple[list[tuple[str, int, str]], Optional[str]]:
        """One page of (key, size, version, last-modified seconds) under prefix, from key
        `start` on (a hint: the store may return earlier keys, or keys from `stop` on),
        and the next page's token."""
        raise NotImplementedError

    def _folders(self, root: str, bucket: str, prefix: str, token: Optional[str]
                 ) -> tuple[list[str], Optional[str]]:
        """One page of a delimiter listing under prefix: the keys and the common prefixes
        (ending with '/'), and the next page's token."""
        raise NotImplementedError

    def _get(self, ref: ObjectRef, bucket: str, key: str, first: int, last: int) -> bytes:
        """Bytes first..last (inclusive) of the listed version; TransientError to retry."""
        raise NotImplementedError


class S3Store(BucketStore):
    """S3 and S3-compatible stores through one boto3 client (retries are ours, not botocore's)."""
    scheme = 's3'
    _RETRY_CODES = {'SlowDown', 'Throttling', 'ThrottlingException', 'RequestTimeout',
                    'RequestTimeTooSkewed', 'InternalError', 'ServiceUnavailable', '500', '502',
                    '503', '504'}

    def __init__(self, config: StoreConfig):
        import boto3
        from botocore.config import Config

        super().__init__(config)
        self._client = boto3.session.Session().client(
            's3', endpoint_url=config.s3_endpoint_url, region_name=config.s3_region,
            config=Config(retries={'total_max_attempts': 1, 'mode': 'standard'},
                          s3={'addressing_style': 'path' if config.s3_path_style else 'auto'},
                          max_pool_connections=32, connect_timeout=10, read_timeout=60))

    def _page(self, pattern, bucket, prefix, token, start=None, stop=None):
        kwargs = {'Bucket': bucket, 'Prefix': prefix, 'MaxKeys': 1000}
        if token:
            kwargs['ContinuationToken'] = token
        elif start:
            kwargs['StartAfter'] = key_before(start)
        page = self._call(pattern, self._client.list_objects_v2, **kwargs)
        objects = [(o['Key'], o['Size'], o['ETag'].strip('"'), o['LastModified'].timestamp())
                   for o in page.get('Contents', ())]
        return objects, page.get('NextContinuationToken') if page.get('IsTruncated') else None

    def _folders(self, root, bucket, prefix, token):
        kwargs = {'Bucket': bucket, 'Prefix': prefix, 'Delimiter': '/', 'MaxKeys': 1000}
        if token:
            kwargs['ContinuationToken'] = token
        page = self._call(root, self._client.list_objects_v2, **kwargs)
        names = ([o['Key'] for o in page.get('Contents', ())]
                 + [p['Prefix'] for p in page.get('CommonPrefixes', ())])
        return names, page.get('NextContinuationToken') if page.get('IsTruncated') else None

    def _get(self, ref, bucket, key, first, last):
        resp = self._call(ref.uri, self._client.get_object, Bucket=bucket, Key=key,
                          Range=f'bytes={first}-{last}', IfMatch=f'"{ref.version}"')
        try:
            return resp['Body'].read()
        except Exception as e:  # a connection cut mid-body surfaces as many classes
            raise TransientError(f'body of {ref.uri} [{first}, {last + 1}) cut: {e}') from e

    def _call(self, uri: str, method, **kwargs):
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        try:
            return method(**kwargs)
        except ClientError as e:
            code = str(e.response.get('Error', {}).get('Code'))
            status = e.response.get('ResponseMetadata', {}).get('HTTPStatusCode')
            if code == 'PreconditionFailed' or status == 412:
                raise ObjectChangedError(f'{uri} changed during read') from e
            if code in ('NoSuchKey', 'NotFound', '404'):
                raise ObjectNotFoundError(f'{uri} not found') from e
            if code in self._RETRY_CODES or (status or 0) >= 500 or status == 429:
                raise TransientError(f'{code}: {e}') from e
            raise StoreError(f'{uri}: {code}: {e}') from e
        except NoCredentialsError as e:
            raise StoreError(f'{uri}: no AWS credentials found') from e
        except BotoCoreError as e:  # connection errors, timeouts, cut responses
            raise TransientError(f'{type(e).__name__}: {e}') from e


class GCSStore(BucketStore):
    """Google Cloud Storage through one google-cloud-storage client, pinned to generations."""
    scheme = 'gs'

    def __init__(self, config: StoreConfig):
        from google.cloud import storage

        super().__init__(config)
        endpoint = config.gcs_endpoint()
        if endpoint:
            from google.auth.credentials import AnonymousCredentials
            self._client = storage.Client(project='emulator', credentials=AnonymousCredentials(),
                                          client_options={'api_endpoint': endpoint})
        else:
            self._client = storage.Client()

    def _page(self, pattern, bucket, prefix, token, start=None, stop=None):
        def page():
            listing = self._client.list_blobs(bucket, prefix=prefix, page_size=1000,
                                              page_token=token, retry=None,
                                              start_offset=start, end_offset=stop)
            blobs = [(b.name, b.size, str(b.generation), b.updated.timestamp() if b.updated else 0.0)
                     for b in next(listing.pages, ())]
            return blobs, listing.next_page_token
        return self._call(pattern, page)

    def _folders(self, root, bucket, prefix, token):
        def page():
            listing = self._client.list_blobs(bucket, prefix=prefix, delimiter='/',
                                              page_size=1000, page_token=token, retry=None)
            names = [b.name for b in next(listing.pages, ())]
            return names + sorted(listing.prefixes), listing.next_page_token
        return self._call(root, page)

    def _get(self, ref, bucket, key, first, last):
        blob = self._client.bucket(bucket).blob(key)
        return self._call(ref.uri, lambda: blob.download_as_bytes(
            start=first, end=last, if_generation_match=int(ref.version), checksum=None,
            retry=None))

    @staticmethod
    def _call(uri: str, call: Callable[[], T]) -> T:
        from google.api_core import exceptions as gexc
        import requests

        try:
            return call()
        except gexc.PreconditionFailed as e:
            raise ObjectChangedError(f'{uri} changed during read') from e
        except gexc.NotFound as e:
            raise ObjectNotFoundError(f'{uri} not found') from e
        except (gexc.TooManyRequests, gexc.ServerError, requests.exceptions.ConnectionError,
                requests.exceptions.ChunkedEncodingError, requests.exceptions.Timeout) as e:
            raise TransientError(f'{type(e).__name__}: {e}') from e
        except gexc.GoogleAPICallError as e:
            raise StoreError(f'{uri}: {e}') from e


_S3_SETTINGS = ('s3_access_key_id', 's3_secret_access_key', 's3_session_token', 's3_endpoint_url',
                's3_disable_ssl', 's3_region_name', 's3_api_version', 's3_verify')


def adapt_beam_filesystems() -> None:
    """Beam's S3 and GCS filesystems, which read and write the outputs, made fit for a run:
    one shared boto3 client per setting, and with a GCS emulator, no batch requests.
    Idempotent; called where outputs are configured and in the workers' writing DoFns."""
    share_beam_s3_clients()
    if os.environ.get(GCS_EMULATOR_ENV):
        unbatch_beam_gcs()


def unbatch_beam_gcs() -> None:
    """Beam's GCS deletes and copies one request per object instead of GCS's batch endpoint,
    which emulators lack (fake-gcs-server answers a batch with a plain body, and Beam's file
    sinks fail at their final rename with `Bad response: not multi-part`). Each keeps the
    batch call's result: (path, error status) per delete, (src, dest, error status) per copy.
    """
    from apache_beam.io.gcp import gcsio
    from google.api_core.exceptions import GoogleAPICallError, NotFound

    if getattr(gcsio.GcsIO, 'ragbeam_unbatched', False):
        return

    def status(call) -> Optional[int]:
        try:
            call()
        except NotFound:
            return 404
        except GoogleAPICallError as e:
            return e.code or 500
        return None

    def delete_batch(self, paths):
        found = [(path, status(lambda path=path: self.delete(path))) for path in paths]
        return [(path, None if code == 404 else code) for path, code in found]

    def copy_batch(self, pairs):
        return [(src, dest, status(lambda src=src, dest=dest: self.copy(src, dest)))
                for src, dest in pairs]

    gcsio.GcsIO.delete_batch = delete_batch
    gcsio.GcsIO.copy_batch = copy_batch
    gcsio.GcsIO.ragbeam_unbatched = True


def share_beam_s3_clients() -> None:
    """Makes Beam's S3 filesystem, which writes and reads the outputs on S3, reuse one boto3
    client per S3 setting in each process. Beam builds a new boto3 session and client for
    every call (each exists, open, match, delete): 0.3-0.5 s of CPU apiece, parsing botocore's
    service model again, and most of a small run's time with its output on S3 (four objects:
    43.8 s and 17.0 s to rerun unchanged, against 12.5 s and 8.3 s shared;
    `bench.bench_s3_outputs`). boto3 clients are thread-safe; each S3IO still gets its
    own wrapper (Beam's wrapper keeps the state of one download), a shallow copy of the first.
    Idempotent."""
    from apache_beam.io.aws import s3io

    if getattr(s3io, 'ragbeam_shared_clients', False) or not s3io.BOTO3_INSTALLED:
        return
    import copy
    import types

    from apache_beam.options.pipeline_options import PipelineOptions, S3Options

    made: dict[tuple, object] = {}
    lock = threading.Lock()
    beams_client = s3io.boto3_client.Client

    def client(options):
        if isinstance(options, PipelineOptions):
            s3 = options.view_as(S3Options)
            key = tuple(getattr(s3, name) for name in _S3_SETTINGS)
        else:
            key = tuple(options.get(name) for name in _S3_SETTINGS)
        key = (os.getpid(), *key)  # a forked child makes its own
        with lock:
            if key not in made:
                made[key] = beams_client(options=options)
            return copy.copy(made[key])  # the shared boto3 client, no download state yet

    s3io.boto3_client = types.SimpleNamespace(Client=client)
    s3io.ragbeam_shared_clients = True


def require_credentials(uri: str, config: StoreConfig) -> None:
    """Fails at once, in one line, where `uri` is on S3 or GCS and no credentials are found:
    Beam's s3io and gcsio, which read and write the outputs, would retry for minutes first."""
    if uri.startswith('gs://'):
        _require_gcs_credentials(uri, config)
    if not uri.startswith('s3://'):
        return
    import boto3

    if boto3.session.Session().get_credentials() is None:
        raise StoreError(f'{uri}: no AWS credentials found (set AWS_ACCESS_KEY_ID and '
                         'AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, as for the aws command)')


def _require_gcs_credentials(uri: str, config: StoreConfig) -> None:
    if config.gcs_endpoint():
        return  # an emulator: anonymous
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        google.auth.default()
    except DefaultCredentialsError as e:
        raise StoreError(f'{uri}: no Google Cloud credentials found (run `gcloud auth '
                         'application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to '
                         'a service account key file)') from e


_STORES: dict[tuple, Store] = {}
_STORES_LOCK = threading.Lock()


def store_for(uri: str, config: StoreConfig = StoreConfig()) -> Store:
    """The store that serves `uri`'s scheme: one per scheme and config in each process."""
    scheme = FileSystems.get_scheme(uri)
    with _STORES_LOCK:
        if (scheme, config) not in _STORES:
            _STORES[(scheme, config)] = _make_store(scheme, config)
        return _STORES[(scheme, config)]


def _make_store(scheme: Optional[str], config: StoreConfig) -> Store:
    if scheme is None:
        return LocalStore()
    if scheme == 's3':
        return S3Store(config)
    if scheme == 'gs':
        return GCSStore(config)
    return Store()
