"""Answer text as safe HTML: Markdown rendered on the server, then sanitized.

A model's answer (and the documents it quotes) is untrusted text. Raw HTML in it
is shown as text, never interpreted: Python-Markdown's raw-HTML passes are
removed, so ``<script>`` becomes ``&lt;script&gt;``. nh3 then keeps only the
tags Markdown itself produces, as a second line of defence.

Citations (``[1]``) become links inside Markdown, as elements of its tree, before
sanitizing: nothing is added to the HTML afterwards. (They were once linked by a
regex over the sanitized HTML, which was safe only because nh3 0.3 escapes ``>``
inside attribute values: with nh3 0.2.18, a link title holding ``[1]`` made a
live ``<img onerror>``.)
"""

from __future__ import annotations

import re
import threading
from xml.etree.ElementTree import Element

import markdown
import nh3
from django.utils.safestring import SafeString, mark_safe
from markdown.inlinepatterns import InlineProcessor

ALLOWED_TAGS = {
    *("p", "br", "hr", "blockquote", "pre", "code", "strong", "em", "b", "i", "del", "sup", "sub"),
    *("h1", "h2", "h3", "h4", "h5", "h6", "ul", "ol", "li", "a"),
    *("table", "thead", "tbody", "tr", "th", "td"),
}
ALLOWED_ATTRIBUTES = {"a": {"href", "title", "class", "aria-label"}, "ol": {"start"}, "th": {"align"}, "td": {"align"}}
_SAFE_HREF = re.compile(r"^(https?://|mailto:|#)", re.IGNORECASE)
_CITATION = r"\[(\d{1,3})\]"


class _Citations(InlineProcessor):
    """``[n]`` (1 ≤ n ≤ count) in text: a link to source n (``#{prefix}{n}``). Code spans and
    links are taken by Markdown's own patterns first (they run before this one), so a ``[1]``
    in code or in a link's text or title stays as it is."""

    def __init__(self, *, prefix: str, count: int) -> None:
        super().__init__(_CITATION)
        self.prefix, self.count = prefix, count

    def handleMatch(self, m: re.Match[str], data: str) -> tuple[Element | None, int | None, int | None]:
        n = int(m.group(1))
        if not 1 <= n <= self.count:
            return None, None, None
        link = Element("a", {"class": "cite", "href": f"#{self.prefix}{n}", "aria-label": f"source {n}"})
        link.text = f"[{n}]"
        return link, m.start(0), m.end(0)


def _new_markdown() -> markdown.Markdown:
    md = markdown.Markdown(extensions=["fenced_code", "tables", "sane_lists"], output_format="html")
    # Without these two passes raw HTML is escaped like any other text.
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    # Lower priority than links (160) and references (170): they run first.
    md.inlinePatterns.register(_Citations(prefix="", count=0), "citation", 150)
    return md


# One Markdown per thread, reset between texts, as Python-Markdown documents: a new one per
# answer made rendering a 50-word answer 0.54-0.60 ms instead of 0.34-0.36 ms, paid on the
# event loop once per answer (the chat page's `done` event). A Markdown object is not
# thread-safe.
_per_thread = threading.local()


def _markdown(*, prefix: str, count: int) -> markdown.Markdown:
    md = getattr(_per_thread, "markdown", None)
    if md is None:
        md = _per_thread.markdown = _new_markdown()
    md.reset()
    citations = md.inlinePatterns["citation"]
    citations.prefix, citations.count = prefix, count
    return md


def _keep_attribute(tag: str, attribute: str, value: str) -> str | None:
    if tag == "a" and attribute == "href" and not _SAFE_HREF.match(value):
        return None  # relative paths and every other scheme (javascript:, data:, ...)
    if tag == "a" and attribute == "class" and value != "cite":
        return None  # the only class is the citation's own
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


def render_answer(text: str, *, source_prefix: str, source_count: int) -> SafeString:
    return mark_safe(sanitize(_markdown(prefix=source_prefix, count=source_count).convert(text)))
