"""Turning an uploaded file into text with its structure: one entry point, one error type.

Every format comes out as Markdown-ish text (``#`` headings, blank lines
between paragraphs), which is what rag.services.chunking splits on, so a
chunk of a Word file or a web page keeps its heading path like a Markdown
note does. Each failure raises ParseError with a message that tells the
person who uploaded the file what is wrong and what to do.
"""

from __future__ import annotations

import io
import re
import zipfile
from dataclasses import dataclass
from pathlib import PurePath

from django.conf import settings

#: Suffix → kind of parser.
SUFFIXES = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".markdown": "text",
    ".rst": "text",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
# A DOCX whose parts expand more than this many times over is treated as a zip bomb;
# real Word files compress text XML about 5-20 times.
MAX_ZIP_RATIO = 200


class ParseError(ValueError):
    """A file that cannot be used; the message says why and what to do."""

    def __init__(self, message: str, *, code: str = "unreadable") -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True)
class ParsedDocument:
    text: str
    title: str = ""  # from the file's own metadata (<title>, DOCX core properties), if any


def kind_of(name: str) -> str | None:
    return SUFFIXES.get(PurePath(name).suffix.lower())


def max_upload_bytes() -> int:
    return int(settings.RAG_MAX_UPLOAD_MB * 1024 * 1024)


def check_upload(*, name: str, size: int) -> None:
    """The checks that need no parsing: type, emptiness, size. Cheap, so done at upload."""
    if kind_of(name) is None:
        suffix = PurePath(name).suffix or "no extension"
        raise ParseError(
            f"{name}: files of type {suffix} are not supported. Upload one of: {', '.join(sorted(SUFFIXES))}.",
            code="unsupported",
        )
    if size == 0:
        raise ParseError(f"{name} is empty (0 bytes).", code="empty")
    if size > max_upload_bytes():
        raise ParseError(
            f"{name} is {size / 1024 / 1024:.1f} MB, over the {settings.RAG_MAX_UPLOAD_MB:g} MB limit "
            "(RAG_MAX_UPLOAD_MB). Split it or raise the limit.",
            code="too_large",
        )


def parse_document(*, name: str, data: bytes) -> ParsedDocument:
    """Extract the text of a file; raises ParseError when the file cannot be used."""
    check_upload(name=name, size=len(data))
    kind = kind_of(name)
    if kind == "pdf":
        parsed = _pdf(name, data)
    elif kind == "docx":
        parsed = _docx(name, data)
    elif kind == "html":
        parsed = _html(name, decode_text(name=name, data=data))
    else:
        parsed = ParsedDocument(text=decode_text(name=name, data=data))
    text = _tidy(parsed.text)
    if not text:
        hint = " It may be a scan: run OCR on it first." if kind == "pdf" else ""
        raise ParseError(f"No text could be extracted from {name}.{hint}", code="no_text")
    return ParsedDocument(text=text, title=parsed.title.strip()[:300])


def decode_text(*, name: str, data: bytes) -> str:
    """UTF-8 (with or without BOM) when it is; otherwise the encoding charset-normalizer finds."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    # NUL bytes do not occur in text of any single-byte encoding: this is a binary file.
    if b"\x00" in data[:8192] and not data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ParseError(
            f"{name} is not text (it holds binary data). Check that it is the file you meant.", code="encoding"
        )
    from charset_normalizer import from_bytes

    results = from_bytes(data)
    best = results.best()
    if best is not None:
        # On short texts several code pages tie (é, è, à decode alike in most of
        # them); the tie goes to Windows-1252, by far the most common one.
        tied = [r for r in results if (r.chaos, r.coherence) == (best.chaos, best.coherence)]
        best = next((r for r in tied if r.encoding == "cp1252"), best)
    if best is None or best.chaos > 0.3:
        raise ParseError(
            f"{name} is not UTF-8 and its encoding could not be recognised. Save it as UTF-8 and upload it again.",
            code="encoding",
        )
    return str(best)


def _tidy(text: str) -> str:
    # Postgres text cannot hold NUL; runs of blank lines carry no structure.
    text = text.replace("\x00", "").replace("\r\n", "\n").replace("\r", "\n")
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# --- PDF ------------------------------------------------------------------------------


def _pdf(name: str, data: bytes) -> ParsedDocument:
    from pypdf import PdfReader
    from pypdf.errors import PdfReadError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise ParseError(
                f"{name} is protected by a password. Remove the password (print to PDF, or save an "
                "unprotected copy) and upload it again.",
                code="encrypted",
            )
        pages = [page.extract_text() or "" for page in reader.pages]
        title = (reader.metadata.title if reader.metadata else None) or ""
    except ParseError:
        raise
    except (PdfReadError, ValueError, KeyError, TypeError, AttributeError, IndexError, OSError) as exc:
        # pypdf raises several types on damaged files; none is actionable beyond "re-export it".
        if "password" in str(exc).lower() or "decrypt" in str(exc).lower():
            raise ParseError(
                f"{name} is protected by a password. Remove the password and upload it again.", code="encrypted"
            ) from exc
        raise ParseError(
            f"{name} is not a readable PDF (it is damaged or truncated: {exc}). Export it again and re-upload it.",
            code="corrupt",
        ) from exc
    return ParsedDocument(text="\n\n".join(pages), title=str(title))


# --- DOCX -----------------------------------------------------------------------------


def _docx(name: str, data: bytes) -> ParsedDocument:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ParseError(
            f"{name} is not a readable Word file (.docx is a zip archive and this one is damaged). "
            "Open it in Word or LibreOffice and save it again.",
            code="corrupt",
        ) from None
    _check_zip(name, archive, compressed=len(data))

    import docx
    from docx.opc.exceptions import PackageNotFoundError

    try:
        document = docx.Document(io.BytesIO(data))
    except (PackageNotFoundError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise ParseError(
            f"{name} is not a readable Word file ({exc}). Open it in Word or LibreOffice and save it as .docx again.",
            code="corrupt",
        ) from exc
    except MemoryError:
        raise
    except Exception as exc:  # lxml raises its own XML errors on damaged parts (and when out of memory)
        raise ParseError(
            f"{name} could not be read as a Word file ({type(exc).__name__}). Save it as .docx again.",
            code="corrupt",
        ) from exc
    return ParsedDocument(text="\n\n".join(_docx_blocks(document)), title=document.core_properties.title or "")


def _check_zip(name: str, archive: zipfile.ZipFile, *, compressed: int) -> None:
    """Refuse a zip bomb before anything is decompressed, from the sizes the archive declares."""
    limit = int(settings.RAG_MAX_UNZIPPED_MB * 1024 * 1024)
    total = sum(info.file_size for info in archive.infolist())
    if total > limit or total > MAX_ZIP_RATIO * max(compressed, 1):
        raise ParseError(
            f"{name} would expand to {total / 1024 / 1024:.0f} MB from {compressed / 1024:.0f} KB, which is how a "
            "zip bomb looks, so it was not opened. If it is a genuine document, save it again from Word.",
            code="zip_bomb",
        )


def _docx_blocks(document) -> list[str]:
    from docx.table import Table
    from docx.text.paragraph import Paragraph

    blocks: list[str] = []
    for item in document.iter_inner_content():
        if isinstance(item, Paragraph):
            text = item.text.strip()
            if not text:
                continue
            style = (item.style.name if item.style is not None else "") or ""
            level = _heading_level(style)
            blocks.append(f"{'#' * level} {text}" if level else text)
        elif isinstance(item, Table):
            rows = [" | ".join(cell.text.strip() for cell in row.cells) for row in item.rows]
            if rows:
                blocks.append("\n".join(rows))
    return blocks


def _heading_level(style: str) -> int:
    if style == "Title":
        return 1
    if match := re.fullmatch(r"Heading (\d)", style):
        return min(int(match.group(1)), 6)
    return 0


# --- HTML -----------------------------------------------------------------------------

# Page furniture, not content.
_DROP = ["script", "style", "noscript", "template", "nav", "header", "footer", "aside", "form", "svg", "iframe"]
_BLOCKS = {"p", "li", "pre", "blockquote", "td", "th", "dt", "dd", "figcaption", "caption"}
_HEADINGS = {f"h{n}": n for n in range(1, 7)}


def _html(name: str, markup: str) -> ParsedDocument:
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(markup, "html.parser")
    title = soup.title.get_text(" ", strip=True) if soup.title else ""
    for tag in soup(_DROP):
        tag.decompose()
    for tag in soup.select('[role="navigation"], [role="banner"], [role="contentinfo"], [aria-hidden="true"]'):
        tag.decompose()
    root = soup.find("main") or soup.find("article") or soup.body or soup
    blocks: list[str] = []
    for element in root.find_all([*_HEADINGS, *_BLOCKS]):
        # A block inside another block (a <p> in an <li>) is written once, by the outer one.
        if element.find_parent([*_BLOCKS]) is not None and element.name not in _HEADINGS:
            continue
        if element.name == "pre":
            # Fenced, so that a line of code starting with '#' is not read as a heading.
            code = element.get_text().strip("\n")
            text = f"```\n{code}\n```" if code.strip() else ""
        else:
            text = " ".join(element.get_text(" ", strip=True).split())
        if not text:
            continue
        if element.name in _HEADINGS:
            blocks.append(f"{'#' * _HEADINGS[element.name]} {text}")
        elif element.name == "li":
            blocks.append(f"- {text}")
        else:
            blocks.append(text)
    if not blocks:
        # Text directly in <body> or <div>s, with no block tags.
        blocks = [line for line in (" ".join(s.split()) for s in root.get_text("\n").split("\n")) if line]
    return ParsedDocument(text="\n\n".join(blocks), title=title)
