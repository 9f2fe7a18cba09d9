from __future__ import annotations

from rag.rendering import render_answer


def render(text: str, count: int = 3) -> str:
    return str(render_answer(text, source_prefix="src-7-", source_count=count))


def test_markdown_code_lists_tables_and_links_render():
    html = render(
        "Use **pgvector** [1]:\n\n```python\nx = items[1]\n```\n\n- one\n- two\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n[docs](https://example.com/x)"
    )
    assert "<strong>pgvector</strong>" in html
    assert '<a class="cite" href="#src-7-1" aria-label="source 1">[1]</a>' in html
    assert "<pre><code" in html and "x = items[1]" in html  # no citation link inside code
    assert "<ul>" in html and "<li>one</li>" in html
    assert "<table>" in html and "<td>1</td>" in html
    assert 'href="https://example.com/x"' in html and 'rel="noopener noreferrer nofollow"' in html


def test_raw_html_is_shown_as_text_never_as_markup():
    html = render('<script>alert(1)</script> <img src=x onerror="alert(2)"> <b>bold</b>')
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;img src=x onerror=" in html


def test_dangerous_and_relative_links_lose_their_href():
    html = render("[a](javascript:alert(1)) [b](/admin/) [c](data:text/html,x) [d](mailto:a@b.c) [e](#top)")
    assert "javascript:" not in html and 'href="/admin/"' not in html and "data:text" not in html
    assert 'href="mailto:a@b.c"' in html and 'href="#top"' in html


def test_citations_beyond_the_sources_stay_plain_text():
    html = render("See [2] and [9].", count=2)
    assert 'href="#src-7-2"' in html and "[9]" in html and "#src-7-9" not in html
