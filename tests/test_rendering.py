from __future__ import annotations

import re

from rag.rendering import render_answer


def render(text: str, count: int = 3) -> str:
    return str(render_answer(text, source_prefix="src-7-", source_count=count))


def cites(html: str) -> list[str]:
    """The sources the citation links of ``html`` point to, in order, each checked whole."""
    links = re.findall(r"<a ([^>]*)>\[(\d+)\]</a>", html)
    for attributes, n in links:
        assert f'href="#src-7-{n}"' in attributes and 'class="cite"' in attributes
        assert f'aria-label="source {n}"' in attributes
    return [n for attributes, n in links if 'class="cite"' in attributes]


def test_markdown_code_lists_tables_and_links_render():
    html = render(
        "Use **pgvector** [1]:\n\n```python\nx = items[1]\n```\n\n- one\n- two\n\n"
        "| a | b |\n|---|---|\n| 1 | 2 |\n\n[docs](https://example.com/x)"
    )
    assert "<strong>pgvector</strong>" in html
    assert cites(html) == ["1"]  # the one outside code
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


def test_a_citation_inside_a_link_title_stays_text_and_the_title_stays_inert():
    """Citations are linked in the Markdown tree before sanitizing: a "[1]" in an attribute is
    never rewritten into markup, whatever the sanitizer's serializer does with ">"."""
    html = render('[x](https://e.com "a>[1]<img src=x onerror=alert(1)>") and [2][3]')
    assert "<img" not in html and "onerror=alert(1)>" not in html.replace("&gt;", "")
    assert cites(html) == ["2", "3"]  # adjacent citations both linked; the title's [1] is not


def test_only_citation_links_keep_a_class():
    html = render("[1] and [plain](https://e.com)")
    assert html.count('class="') == 1


def test_nothing_is_added_to_the_html_after_it_is_sanitized(monkeypatch):
    """What leaves render_answer is exactly what nh3 returned: no markup is made from text
    that has already been sanitized, so its safety never rests on how nh3 serializes."""
    from rag import rendering

    returned: list[str] = []
    sanitize = rendering.sanitize
    monkeypatch.setattr(rendering, "sanitize", lambda html: returned.append(sanitize(html)) or returned[-1])
    html = render("See [1] and [2], and `code [3]`.")
    assert returned and html == returned[-1]
    assert cites(html) == ["1", "2"]


def test_one_answer_leaves_nothing_behind_for_the_next():
    """Renders reuse one Markdown per thread: its references, footnote-like state and
    citation settings must not carry over from one answer to the next."""
    first = render("See [the docs][ref] [3].\n\n[ref]: https://example.com/first", count=3)
    assert 'href="https://example.com/first"' in first and cites(first) == ["3"]

    second = str(render_answer("See [the docs][ref] [3] [1].", source_prefix="src-8-", source_count=1))

    assert "example.com/first" not in second  # the first answer's reference is gone
    assert re.findall(r'href="#([^"]+)"', second) == ["src-8-1"]  # its own prefix and count
    assert "[3]" in second  # out of range for this answer: left as text
