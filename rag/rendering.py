"""Answer text as safe HTML: Markdown rendered on the server, then sanitized.

A model's answer (and the documents it quotes) is untrusted text. Raw HTML in it
is shown as text, never interpreted: Python-Markdown's raw-HTML passes are
removed, so ``<script>`` becomes ``&lt;script&gt;``. nh3 then keeps only the
tags Markdown itself produces, as a second line of defence.
"""

from __future__ import annotations

import re

import markdown
import nh3
from django.utils.safestring import SafeString, mark_safe

ALLOWED_TAGS = {
    *("p", "br", "hr", "blockquote", "pre", "code", "strong", "em", "b", "i", "del", "sup", "sub"),
    *("h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "a"),
    *("table", "thead", "tbody", "tr", "th", "td"),
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}
_SAFE_HREF = re.compile(r"^(https?://|mailto:|#)", re.IGNORECASE)
# Text outside tags and outside code: only there does "[n]" mean a citation.
_SEGMENTS = re.compile(r"(<pre\b.*?</pre>|<code\b.*?</code>|<[^>]*>)", re.DOTALL)
_CITATION = re.compile(r"\[(\d{1,3})\]")


def _markdown() -> markdown.Markdown:
    md = markdown.Markdown(extensions=["fenced_code", "tables", "sane_lists"], output_format="html")
    # Without these two passes raw HTML is escaped like any other text.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    return md


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    if tag == "a" and attribute == "href" and not _SAFE_HREF.match(value):
        return None  # relative paths and every other scheme (javascript:, data:, ...)
    return value


def sanitize(html: str) -> str:
    return nh3.clean(
        html,
        tags=ALLOWED_TAGS,
        attributes=ALLOWED_ATTRIBUTES,
        attribute_filter=_keep_attribute,
        url_schemes={"http", "https", "mailto"},
        link_rel="noopener noreferrer nofollow",
    )


def link_citations(html: str, *, prefix: str, count: int) -> str:
    """Turn ``[n]`` (1 ≤ n ≤ count) in text into a link to source n (``#{prefix}{n}``)."""

    def cite(match: re.Match[str]) -> str:
        n = int(match.group(1))
        if not 1 <= n <= count:
            return match.group(0)
        return f'<a class="cite" href="#{prefix}{n}" aria-label="source {n}">[{n}]</a>'

    parts = _SEGMENTS.split(html)
    # Even indexes are text between tags; odd ones are tags or code, left alone.
    return "".join(_CITATION.sub(cite, part) if i % 2 == 0 else part for i, part in enumerate(parts))


def render_answer(text: str, *, source_prefix: str, source_count: int) -> SafeString:
    html = sanitize(_markdown().convert(text))
    # Only fixed markup with integers is added after sanitizing.
    return mark_safe(link_citations(html, prefix=source_prefix, count=source_count))
