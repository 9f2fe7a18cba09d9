"""rag.services.parse_sandbox: a file built to hang or exhaust a parser fails with a reason,
in a child process, and the worker goes on with the next one."""

from __future__ import annotations

import io
import random
import zipfile

import pytest

from rag.models import Collection, Document
from rag.services import ingestion, parse_sandbox
from rag.services.parsing import ParseError, parse_document
from tests.files import HTML_PAGE, docx_bytes, pdf_bytes
from tests.worker import run_worker

DEEP_HTML = b"<h1>" * 10_000 + b"deep" + b"</h1>" * 10_000  # 89 s to parse in one piece


def big_docx(megabytes: int) -> bytes:
    """A real .docx whose XML unzips to ``megabytes`` MB of varied text: no zip bomb (it
    compresses about 3:1), just a lot to parse."""
    rng = random.Random(7)
    words = ["".join(rng.choice("abcdefghij") for _ in range(6)) for _ in range(5000)]
    paragraph_bytes = 12 * 7 + 40
    paragraphs = (
        f"<w:p><w:r><w:t>{' '.join(rng.choice(words) for _ in range(12))}</w:t></w:r></w:p>"
        for _ in range(megabytes * 1024 * 1024 // paragraph_bytes)
    )
    namespace = "http://schemas.openxmlformats.org/wordprocessingml/2006/main"
    xml = f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{namespace}"><w:body>'
    xml += "".join(paragraphs) + "</w:body></w:document>"
    out = io.BytesIO()
    with (
        zipfile.ZipFile(io.BytesIO(docx_bytes([("p", "x")]))) as small,
        zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as big,
    ):
        for item in small.infolist():
            big.writestr(item, xml.encode() if item.filename == "word/document.xml" else small.read(item.filename))
    return out.getvalue()


@pytest.mark.parametrize(
    ("name", "data"),
    [("notes.md", b"# Notes\n\nPlain text."), ("page.html", HTML_PAGE), ("report.pdf", pdf_bytes("Quarterly report."))],
)
def test_a_good_file_parses_in_the_child_as_it_does_in_process(name, data):
    assert parse_sandbox.parse(name=name, data=data) == parse_document(name=name, data=data)


def test_a_file_that_would_parse_for_minutes_is_given_up_at_the_time_limit(settings):
    settings.RAG_PARSE_TIMEOUT_S = 1
    with pytest.raises(ParseError) as failed:
        parse_sandbox.parse(name="deep.html", data=DEEP_HTML)
    assert failed.value.code == "too_slow" and "more than 1 s to parse" in failed.value.message


def test_a_file_that_needs_more_memory_than_allowed_fails_and_says_so(settings):
    settings.RAG_PARSE_MEMORY_MB = 64
    with pytest.raises(ParseError) as failed:
        parse_sandbox.parse(name="big.docx", data=big_docx(24))
    assert "MB of memory" in failed.value.message and "RAG_PARSE_MEMORY_MB" in failed.value.message


def test_a_parsers_own_error_comes_back_as_it_is():
    with pytest.raises(ParseError) as in_process:
        parse_document(name="broken.pdf", data=b"%PDF-1.4 truncated")
    with pytest.raises(ParseError) as in_child:
        parse_sandbox.parse(name="broken.pdf", data=b"%PDF-1.4 truncated")
    assert (in_child.value.code, in_child.value.message) == (in_process.value.code, in_process.value.message)


@pytest.mark.django_db(transaction=True)
def test_the_worker_fails_the_slow_file_and_goes_on_with_the_next(settings, fake_llm):
    settings.RAG_PARSE_TIMEOUT_S = 1
    collection = Collection.objects.create(name="kb")
    slow = ingestion.submit_file(collection=collection, name="deep.html", data=DEEP_HTML)
    fine = ingestion.submit_file(collection=collection, name="fine.md", data=b"Figs are sweet.")

    assert run_worker() == 2

    failed = Document.objects.get(pk=slow.document_id)
    assert failed.status == "failed" and "more than 1 s to parse" in failed.error
    assert Document.objects.get(pk=fine.document_id).status == "ready"
