"""rag.services.parsing: every supported format, and every kind of bad file, with a message to act on."""

from __future__ import annotations

import random

import pytest

from rag.services.parsing import ParseError, check_upload, parse_document
from tests.files import HTML_PAGE, docx_bytes, encrypted_pdf_bytes, pdf_bytes, zip_bomb_docx_bytes


def test_text_and_markdown_keep_their_text():
    assert parse_document(name="a.md", data=b"# Title\n\nBody.\n").text == "# Title\n\nBody."
    assert parse_document(name="a.txt", data="\ufeffWith a BOM.\r\n".encode()).text == "With a BOM."


def test_text_in_another_encoding_is_detected():
    text = "Le café crème et la crème brûlée sont délicieux, voilà ce que je pense à Noël."
    assert parse_document(name="fr.txt", data=text.encode("cp1252")).text == text


def test_html_keeps_headings_and_drops_navigation_scripts_and_furniture():
    parsed = parse_document(name="page.html", data=HTML_PAGE)
    assert parsed.title == "Gardening guide"
    assert parsed.text.splitlines()[0] == "# Gardening"
    assert "## Pests" in parsed.text
    assert "- Ladybirds eat aphids." in parsed.text
    for noise in ("SCRIPT-TEXT", "NAV-LINK", "SITE-BANNER", "FOOTER-TEXT", "color: red"):
        assert noise not in parsed.text


def test_pdf_text_is_extracted():
    assert parse_document(name="a.pdf", data=pdf_bytes("Hello PDF world.", "Second line.")).text == (
        "Hello PDF world.\nSecond line."
    )


def test_docx_headings_become_markdown_headings():
    data = docx_bytes([("h1", "Guide"), ("p", "Intro text."), ("h2", "Setup"), ("p", "Install it.")])
    assert parse_document(name="a.docx", data=data).text == "# Guide\n\nIntro text.\n\n## Setup\n\nInstall it."


@pytest.mark.parametrize(
    ("name", "data", "code", "words"),
    [
        ("photo.png", b"\x89PNG\r\n", "unsupported", "not supported"),
        ("notes", b"text", "unsupported", "not supported"),
        ("empty.txt", b"", "empty", "is empty"),
        ("locked.pdf", encrypted_pdf_bytes("secret text"), "encrypted", "password"),
        ("broken.pdf", pdf_bytes("abc")[:150], "corrupt", "not a readable PDF"),
        ("scan.pdf", pdf_bytes(), "no_text", "No text could be extracted"),
        ("bomb.docx", zip_bomb_docx_bytes(), "zip_bomb", "zip bomb"),
        ("broken.docx", b"PK\x03\x04 not really a zip", "corrupt", "not a readable Word file"),
        ("binary.txt", bytes(range(256)) * 8, "encoding", "not text"),
        ("blank.md", b"  \n\n\t \n", "no_text", "No text"),
        ("empty.html", b"<html><body><nav>Only a menu</nav><script>x()</script></body></html>", "no_text", "No text"),
    ],
)
def test_bad_files_raise_one_error_type_with_a_reason(name, data, code, words):
    with pytest.raises(ParseError) as excinfo:
        parse_document(name=name, data=data)
    assert excinfo.value.code == code
    assert words in excinfo.value.message
    assert name in excinfo.value.message  # says which file


def test_unknown_encoding_is_refused():
    # High bytes with no structure: no encoding makes words of them.
    rng = random.Random(7)
    data = bytes(rng.choice(range(0x80, 0x100)) for _ in range(4000))
    with pytest.raises(ParseError) as excinfo:
        parse_document(name="mystery.txt", data=data)
    assert excinfo.value.code == "encoding"
    assert "UTF-8" in excinfo.value.message


def test_size_limit_comes_from_the_setting(settings):
    settings.RAG_MAX_UPLOAD_MB = 0.001  # about 1 KB
    check_upload(name="small.txt", size=1000)
    with pytest.raises(ParseError, match="RAG_MAX_UPLOAD_MB") as excinfo:
        check_upload(name="big.txt", size=2000)
    assert excinfo.value.code == "too_large"


def test_zip_bomb_is_refused_from_declared_sizes_under_the_absolute_limit(settings):
    settings.RAG_MAX_UNZIPPED_MB = 5
    with pytest.raises(ParseError, match="zip bomb"):
        parse_document(name="big.docx", data=zip_bomb_docx_bytes(expanded_mb=6))
