"""The PDF engines, as the sandbox's child process runs them: PDFium (the default) and pypdf.

Only the child imports these, and only the engine it is asked for. Each engine opens one PDF
over a file object that reads on demand (transforms.ranged_file) and extracts one page at a
time; the text it returns is what the chunk offsets of that page index, unmodified.
"""
from __future__ import annotations

import io
import logging
from typing import BinaryIO

ENGINES = ('pdfium', 'pypdf')
# The largest page image OCR gets: A3 at 300 DPI is 17 Mpx. A poster-sized page is rendered
# at a lower resolution instead, so its bitmap (and tesseract) stay within a worker's memory.
MAX_OCR_PIXELS = 25_000_000


class PasswordRequired(Exception):
    """The PDF is encrypted with a password that is not empty."""


class PdfiumLoadError(Exception):
    """PDFium could not load the document (a format error, not a password)."""


class UnreadablePdf(Exception):
    """Neither engine opens the PDF: carries the fallback's (pypdf's) error class."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type


def extractor_name(engine: str) -> str:
    """The `extractor` column of the chunks an engine's text gives: engine and version."""
    if engine == 'pdfium':
        from pypdfium2.version import PDFIUM_INFO
        return f'pdfium-{PDFIUM_INFO.build}'
    import pypdf
    return f'pypdf-{pypdf.__version__}'


def engine_fingerprint(engine: str) -> str:
    """What makes an engine's text what it is, for the settings fingerprint."""
    if engine == 'pdfium':
        from pypdfium2.version import PYPDFIUM_INFO
        return f'{extractor_name(engine)}+pypdfium2-{PYPDFIUM_INFO.version}'
    return extractor_name(engine)


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return buffer.getvalue()


class Pdfium:
    """pypdfium2 over a readable, seekable file: PDFium pulls blocks through a callback."""
    name = 'pdfium'

    def __init__(self, limits):
        self._doc = None
        self._limits = limits

    def open(self, file: BinaryIO) -> int:
        import pypdfium2 as pdfium
        import pypdfium2.raw as raw

        try:
            self._doc = pdfium.PdfDocument(file, autoclose=False)
        except pdfium.PdfiumError as e:
            if getattr(e, 'err_code', None) == raw.FPDF_ERR_PASSWORD:
                raise PasswordRequired('password required: the PDF is encrypted with a user password')
            raise PdfiumLoadError(str(e))
        return len(self._doc)

    def page(self, index: int) -> tuple[str, bool]:
        import pypdfium2.raw as raw

        page = self._doc[index]
        try:
            textpage = page.get_textpage()
            try:
                text = textpage.get_text_range()
            finally:
                textpage.close()
            images = not text.strip() and any(
                True for _ in page.get_objects(filter=[raw.FPDF_PAGEOBJ_IMAGE]))
            return text, images
        finally:
            page.close()

    def page_images(self, index: int, dpi: int) -> list[bytes]:
        """The whole page rendered in greyscale at `dpi` (less on a page bigger than
        MAX_OCR_PIXELS), as one PNG: OCR sees what a reader sees."""
        page = self._doc[index]
        try:
            width, height = page.get_size()  # points
            scale = min(dpi / 72, (MAX_OCR_PIXELS / max(1.0, width * height)) ** 0.5)
            bitmap = page.render(scale=scale, grayscale=True)
            try:
                return [_png(bitmap.to_pil())]
            finally:
                bitmap.close()
        finally:
            page.close()

    def close(self) -> None:
        if self._doc is not None:
            self._doc.close()
            self._doc = None


class Pypdf:
    """pypdf, with its decompression limits set from --pdf-max-stream-bytes."""
    name = 'pypdf'

    def __init__(self, limits):
        self._reader = None
        _configure_pypdf(limits)

    def open(self, file: BinaryIO) -> int:
        self._reader = _open_reader(file)
        if self._reader.is_encrypted and not self._reader.decrypt(''):
            raise PasswordRequired('password required: the PDF is encrypted with a user password')
        return _page_count(self._reader)

    def page(self, index: int) -> tuple[str, bool]:
        page = _nth_page(self._reader, index)
        text = page.extract_text()
        return text, not text.strip() and _has_images(page)

    def page_images(self, index: int, dpi: int) -> list[bytes]:
        """The page's embedded images (pypdf cannot render a page)."""
        return [_png(image.image) for image in _nth_page(self._reader, index).images]

    def close(self) -> None:
        self._reader = None


def _configure_pypdf(limits) -> None:
    from pypdf._configuration import CURRENT_CONFIGURATION, DEFAULT_CONFIGURATION

    n = limits.max_stream_bytes
    CURRENT_CONFIGURATION.set(DEFAULT_CONFIGURATION.with_overwrites(
        maximum_declared_stream_length=n, array_based_stream_maximum_output_length=n,
        jbig2_maximum_output_length=n, lzw_maximum_output_length=n,
        run_length_maximum_output_length=n, zlib_maximum_output_length=n,
        brotli_maximum_output_length=n, image_maximum_buffer_size=n,
        page_tree_maximum_page_entries=limits.max_pages + 1))
    logging.getLogger('pypdf').setLevel(logging.ERROR)


_INHERITABLE = ('/Resources', '/MediaBox', '/CropBox', '/Rotate')
_MAX_TREE_DEPTH = 100


def _page_tree(reader):
    from pypdf.errors import PdfReadError
    from pypdf.generic import DictionaryObject

    pages = reader.root_object.get('/Pages')
    pages = pages.get_object() if pages is not None else None
    if not isinstance(pages, DictionaryObject):
        raise PdfReadError('Invalid object in /Pages')
    return pages


def _page_count(reader) -> int:
    """The page count from the root's /Count, without reading every page object."""
    count = _page_tree(reader).get('/Count')
    return int(count) if count is not None else len(reader.pages)


def _nth_page(reader, index: int):
    """Page `index`, found by walking the page tree with each node's /Count.

    Unlike reader.pages[index], which first reads every page object of the document, this
    reads only the nodes on the way to the page. A node whose /Count equals its number of
    kids has only pages as kids, so the page is its kid at `index`, read alone; otherwise the
    kids before the page are read to learn their counts.
    """
    from pypdf.generic import NameObject

    node, inherit = _page_tree(reader), {}
    for _ in range(_MAX_TREE_DEPTH):
        inherit.update({NameObject(a): node[a] for a in _INHERITABLE if a in node})
        kids = node['/Kids']
        if node.get('/Count') == len(kids) and index < len(kids):
            kid = kids[index].get_object()
            if not _is_tree_node(kid):
                return _leaf_page(reader, kids[index], kid, inherit)
        for kid_ref in kids:
            kid = kid_ref.get_object()
            count = int(kid.get('/Count', 0)) if _is_tree_node(kid) else 1
            if index >= count:
                index -= count
            elif _is_tree_node(kid):
                node = kid
                break
            else:
                return _leaf_page(reader, kid_ref, kid, inherit)
        else:
            raise IndexError(f'page {index} is not in the page tree')
    raise RecursionError(f'page tree deeper than {_MAX_TREE_DEPTH}')


def _is_tree_node(obj) -> bool:
    return obj.get('/Type') == '/Pages' or ('/Type' not in obj and '/Kids' in obj)


def _leaf_page(reader, ref, obj, inherit: dict):
    """A PageObject as pypdf's own page list builds it, with the inherited attributes."""
    from pypdf import PageObject

    page = PageObject(reader, getattr(ref, 'indirect_reference', None) or ref)
    page.update(obj)
    for attribute, value in inherit.items():
        if attribute not in page:
            page[attribute] = value
    return page


def _open_reader(file):
    """A PdfReader that reads only the trailer and cross-reference data to open a good PDF.

    pypdf's lenient mode checks every cross-reference entry by reading the object it points
    to, which on a big PDF means reading objects all over the file. Strict mode skips that;
    a PDF that fails it is opened again leniently (and repaired as pypdf can). Parsing after
    the open is lenient either way, as a plain PdfReader's is.
    """
    from pypdf import PdfReader

    try:
        reader = PdfReader(file, strict=True)
    except Exception:  # any strictness failure: let the lenient reader repair what it can
        file.seek(0)
        return PdfReader(file, strict=False)
    reader.strict = False
    return reader


def _has_images(page) -> bool:
    resources = page.get('/Resources') or {}
    xobjects = resources.get('/XObject') if hasattr(resources, 'get') else None
    if not xobjects:
        return False
    xobjects = xobjects.get_object()
    return any(x.get_object().get('/Subtype') in ('/Image', '/Form') for x in xobjects.values())


def open_document(engine: str, file: BinaryIO, limits):
    """(engine object, page count) of the PDF in `file`. A PDF that PDFium cannot load (for a
    reason other than a password) is opened with pypdf, the fallback engine, which repairs
    some broken files; when both fail, pypdf's error is the one raised, naming PDFium's."""
    if engine == 'pdfium':
        pdfium = Pdfium(limits)
        try:
            return pdfium, pdfium.open(file)
        except PdfiumLoadError as e:
            pdfium.close()
            file.seek(0)
            fallback = Pypdf(limits)
            try:
                return fallback, fallback.open(file)
            except PasswordRequired:
                raise
            except Exception as pypdf_error:  # any pypdf failure: report its class, and PDFium's reason
                raise UnreadablePdf(type(pypdf_error).__name__, f'{pypdf_error} (PDFium: {e})') from None
    reader = Pypdf(limits)
    return reader, reader.open(file)
