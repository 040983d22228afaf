"""`ragbeam serve`: a corpus over HTTP (FastAPI on uvicorn) — a search API, a search page,
and, with --uploads, documents posted one at a time and indexed by incremental runs.

The page is static files of this package (no external assets) under a strict
Content-Security-Policy; chunk text reaches it as JSON and is set as text, never as HTML.
"""
from __future__ import annotations

import hmac
import ipaddress
from importlib import resources
from typing import Optional

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse

import ragbeam
from ragbeam.uploads import Indexer, Spool, UploadError, Uploads
from transforms.index.search import MODES
from transforms.store import StoreConfig

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'")
STATIC = resources.files('ragbeam') / 'static'


def is_loopback(host: str) -> bool:
    if host == 'localhost':
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(corpus: ragbeam.Corpus, uploads: Optional[Uploads] = None,
             indexer: Optional[Indexer] = None, token: Optional[str] = None) -> FastAPI:
    app = FastAPI(title='ragbeam', docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware('http')
    async def headers(request: Request, call_next):
        response = await call_next(request)
        response.headers['Content-Security-Policy'] = CSP
        response.headers['X-Content-Type-Options'] = 'nosniff'
        response.headers['Referrer-Policy'] = 'no-referrer'
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        problems = '; '.join(f"{'.'.join(map(str, err['loc'][1:]))}: {err['msg']}"
                             for err in e.errors())
        return JSONResponse({'error': problems}, status_code=422)

    @app.exception_handler(HTTPException)
    async def refused(request: Request, e: HTTPException):
        return JSONResponse({'error': e.detail}, status_code=e.status_code,
                            headers=getattr(e, 'headers', None))

    @app.get('/api/search')
    def search(q: str = Query(min_length=1, max_length=2000), k: int = Query(10, ge=1, le=100),
               mode: str = Query('hybrid', pattern='^(' + '|'.join(MODES) + ')$'),
               uri_prefix: Optional[str] = None):
        try:
            hits = corpus.search(q, k=k, mode=mode, uri_prefix=uri_prefix)
        except ValueError as e:  # lexical or hybrid on an index without a lexical side
            raise HTTPException(422, str(e))
        return {'version': corpus.version, 'hits': [h.__dict__ for h in hits]}

    @app.get('/api/status')
    def status():
        report = corpus.report()
        return {'version': corpus.version, 'chunks': report.chunks,
                'objects': report.objects_listed, 'lexical': corpus.has_lexical,
                'uploads': uploads is not None, 'token_required': token is not None,
                'max_upload_bytes': uploads.max_bytes if uploads else None,
                'last_run': {k: v for k, v in report.data.items() if k != 'rss_series'}}

    @app.get('/api/history')
    def history():
        return corpus.history()

    @app.get('/api/runs/{run_id}')
    def run(run_id: int):
        found = indexer.runs.get(run_id) if indexer else None
        if found is None:
            raise HTTPException(404, f'no run {run_id}')
        return found.public()

    @app.post('/api/documents', status_code=202)
    async def upload(request: Request, replace: bool = False):
        if uploads is None:
            raise HTTPException(404, 'uploads are off (ragbeam serve --uploads LOCATION)')
        _authorize(request, token)
        declared = int(request.headers.get('content-length') or 0)
        if declared > uploads.max_bytes + 64 * 1024:  # the file alone is over: store nothing
            await _drain(request, uploads.max_bytes)
            raise HTTPException(413, f'the upload is larger than --max-upload-bytes '
                                     f'({uploads.max_bytes:,} bytes)')
        spool = uploads.spool()
        try:
            filename = await _receive(request, spool)
            uri = uploads.store(spool, filename, replace)
        except UploadError as e:
            spool.discard()
            raise HTTPException(e.status, str(e))
        queued = indexer.add(uri)
        return {'uri': uri, 'run': queued.id}

    @app.get('/')
    def page():
        return FileResponse(STATIC / 'index.html', media_type='text/html')

    @app.get('/static/{name}')
    def static(name: str):
        types = {'app.js': 'text/javascript', 'app.css': 'text/css'}
        if name not in types:
            raise HTTPException(404, f'no {name}')
        return FileResponse(STATIC / name, media_type=types[name])

    return app


def _authorize(request: Request, token: Optional[str]) -> None:
    if token is None:
        return
    given = request.headers.get('authorization', '')
    if not hmac.compare_digest(given.encode(), f'Bearer {token}'.encode()):
        raise HTTPException(401, 'a bearer token is needed (Authorization: Bearer TOKEN)',
                            headers={'WWW-Authenticate': 'Bearer'})


async def _receive(request: Request, spool: Spool) -> Optional[str]:
    """Streams the multipart body's `file` part into `spool`; the part's file name."""
    from multipart.multipart import MultipartParser, parse_options_header

    kind, params = parse_options_header(request.headers.get('content-type', ''))
    if kind != b'multipart/form-data' or b'boundary' not in params:
        raise UploadError(415, 'send the document as multipart/form-data, in a field "file"')
    part: dict = {}
    found: dict = {}

    def header_field(data, start, end):
        part['field'] = part.get('field', b'') + data[start:end]

    def header_value(data, start, end):
        part['value'] = part.get('value', b'') + data[start:end]

    def header_end():
        part.setdefault('headers', {})[part.pop('field', b'').lower()] = part.pop('value', b'')

    def part_begin():
        part.clear()

    def headers_finished():
        _, disposition = parse_options_header(part.get('headers', {}).get(
            b'content-disposition', b''))
        part['is_file'] = disposition.get(b'name') == b'file' and 'file' not in found
        if part['is_file']:
            found['file'] = disposition.get(b'filename', b'').decode('utf-8', 'replace')

    def part_data(data, start, end):
        if part.get('is_file'):
            spool.write(data[start:end])  # raises past the limit

    parser = MultipartParser(params[b'boundary'], {
        'on_part_begin': part_begin, 'on_header_field': header_field,
        'on_header_value': header_value, 'on_header_end': header_end,
        'on_headers_finished': headers_finished, 'on_part_data': part_data})
    stream = request.stream()
    async for piece in stream:
        try:
            parser.write(piece)
        except UploadError:  # past the limit: the spool is gone; read the rest, keep nothing
            await _drain(request, spool.limit, stream)
            raise
    parser.finalize()
    if 'file' not in found:
        raise UploadError(422, 'no field "file" in the form')
    return found['file']


async def _drain(request: Request, limit: int, stream=None) -> None:
    """Reads and drops the rest of a refused upload, up to 4 x the limit, so that a client
    that sends its whole body before it reads (most do) gets the answer rather than a reset
    connection; memory holds one piece at a time."""
    left = 4 * limit
    async for piece in stream or request.stream():
        left -= len(piece)
        if left < 0:
            break


def serve(output: str, host: str, port: int, token: Optional[str], location: Optional[str],
          max_upload_bytes: int, run_args: list[str], config: StoreConfig) -> None:
    """Runs the server until it is stopped (Ctrl-C)."""
    import uvicorn

    corpus = ragbeam.Corpus(output, config=config)
    uploads = indexer = None
    if location:
        uploads = Uploads(location, max_upload_bytes)
        indexer = Indexer(location, output, run_args, corpus.refresh)
    uvicorn.run(make_app(corpus, uploads, indexer, token), host=host, port=port,
                log_level='warning')


def read_token(path: str) -> str:
    with open(path, encoding='utf-8') as f:
        token = f.read().strip()
    if len(token) < 16:
        raise ValueError(f'--token-file {path}: the token must be at least 16 characters')
    return token

