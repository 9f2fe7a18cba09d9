"""The ``python-faq`` corpus: the Python FAQs (reStructuredText); distractors: pages of the library reference."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .common import (
    MAX_DISTRACTOR_CHARS,
    Corpus,
    Document,
    Entry,
    Query,
    cap_text,
    escape_hash,
    faq_documents,
    fence,
    spread,
    tidy,
    unpack,
)

# Library reference pages shorter than this are tables of contents of other pages.
MIN_LIBRARY_PAGE_CHARS = 1_000


RST_ADORNMENT = re.compile(r"([!-/:-@\[-`{-~])\1{2,}\s*")
RST_DIRECTIVE = re.compile(r"\.\.\s+([\w:-]+)::\s*(.*)")
RST_OPTION = re.compile(r":[\w-]+:(\s|$)")
RST_ROLE = re.compile(r":(?:[\w-]+:)*([\w-]+):`([^`]+)`")
# Inline markup starts after a space or punctuation: the "`_" of "`x` and `__y__`" ends no link.
RST_LINK_WITH_TARGET = re.compile(r"(?<![\w`:])`([^`<]*?)\s*<([^`>]*)>`__?")
RST_LINK = re.compile(r"(?<![\w`:])`([^`\s][^`]*)`__?")
RST_LITERAL = re.compile(r"``(.+?)``")

RST_CODE_DIRECTIVES = {"code-block", "code", "sourcecode", "doctest", "testcode", "testoutput", "productionlist"}
# Directives of the Python domain (and the like) describe an object: the signature, then the description.
RST_SIGNATURE_DIRECTIVES = {
    "function", "method", "classmethod", "staticmethod", "decorator", "decoratormethod", "class", "exception",
    "data", "attribute", "opcode", "cmdoption", "option", "envvar", "describe", "pdbcommand", "coroutinefunction",
    "coroutinemethod", "awaitablefunction", "awaitablemethod", "abstractmethod",
}  # fmt: skip
RST_ADMONITIONS = {
    "note": "Note:", "warning": "Warning:", "important": "Important:", "caution": "Caution:", "tip": "Tip:",
    "seealso": "See also:", "impl-detail": "CPython implementation detail:", "availability": "Availability:",
}  # fmt: skip
RST_VERSION_NOTES = {
    "versionadded": "New in version",
    "versionchanged": "Changed in version",
    "deprecated": "Deprecated since version",
    "deprecated-removed": "Deprecated since version",
}
# Directives whose argument is a title worth keeping as a paragraph.
RST_TITLED_DIRECTIVES = {"rubric", "topic", "sidebar", "admonition", "table", "list-table", "csv-table"}
# Directives with nothing to read (indexes, tables of contents, file inclusions, test set-up, ...).
RST_DROPPED_DIRECTIVES = {
    "index", "toctree", "contents", "highlight", "testsetup", "testcleanup", "module", "currentmodule",
    "sectionauthor", "moduleauthor", "include", "literalinclude", "image", "figure", "raw", "program",
    "tabularcolumns", "audit-event", "audit-event-table", "c:namespace",
}  # fmt: skip
# Roles whose text is prose rather than code.
RST_PLAIN_ROLES = {"ref", "doc", "term", "abbr", "dfn", "emphasis", "strong", "title-reference", "manpage"}


@dataclass(frozen=True)
class RstSection:
    title: str
    level: int  # 1 for the page's title, then by order of first appearance of each adornment style
    body: list[str]


def rst_inline(text: str) -> str:
    """Inline markup made plain: roles and ``literals`` become `code` (or text), links their text."""

    def role(match: re.Match[str]) -> str:
        name, content = match.group(1), match.group(2)
        explicit = re.fullmatch(r"(.*?)\s*<([^<>]*)>", content, re.S)
        if explicit and explicit.group(1):
            content = explicit.group(1)
        else:
            content = content.lstrip("!")
            if content.startswith("~"):
                content = content[1:].rsplit(".", 1)[-1]
        if name == "pep":
            return f"PEP {content}"
        if name == "rfc":
            return f"RFC {content}"
        return content if name in RST_PLAIN_ROLES else f"`{content}`"

    text = RST_ROLE.sub(role, text)
    text = RST_LINK_WITH_TARGET.sub(lambda m: m.group(1) or m.group(2), text)
    text = RST_LINK.sub(r"\1", text)
    return RST_LITERAL.sub(r"`\1`", text)


def plain(text: str) -> str:
    """A heading's text as a query or title: inline markup removed, whitespace collapsed."""
    return " ".join(rst_inline(text).replace("`", "").split())


def rst_sections(text: str) -> list[RstSection]:
    """The sections of a reStructuredText page (what precedes its first heading is left out)."""
    lines = text.splitlines()
    styles: list[tuple[str, bool]] = []  # adornment character, overlined
    sections: list[RstSection] = []
    body: list[str] = []
    i = 0
    while i < len(lines):
        heading = _rst_heading(lines, i)
        if heading is None:
            body.append(lines[i])
            i += 1
            continue
        title, style, consumed = heading
        if style not in styles:
            styles.append(style)
        body = []
        sections.append(RstSection(title, styles.index(style) + 1, body))
        i += consumed
    return sections


def _rst_heading(lines: Sequence[str], i: int) -> tuple[str, tuple[str, bool], int] | None:
    """(title, style, lines used) if a section title starts at line ``i``."""
    if i > 0 and lines[i - 1].strip():
        return None  # a title follows a blank line
    line = lines[i]
    below = lines[i + 1] if i + 1 < len(lines) else ""
    if RST_ADORNMENT.fullmatch(line) and i + 2 < len(lines):
        title, under = lines[i + 1], lines[i + 2]
        if title.strip() and under.rstrip() == line.rstrip() and not RST_ADORNMENT.fullmatch(title):
            return title.strip(), (line[0], True), 3
        return None
    underlined = RST_ADORNMENT.fullmatch(below) and len(below.rstrip()) >= min(len(line.rstrip()), 3)
    if line.strip() and not line[0].isspace() and not RST_ADORNMENT.fullmatch(line) and underlined:
        return line.strip(), (below[0], False), 2
    return None


def rst_to_markdown(lines: Sequence[str]) -> str:
    """The body of a reStructuredText section (no headings) as Markdown."""
    return tidy("\n\n".join(_rst_blocks(list(lines))))


def _indented_end(lines: Sequence[str], start: int) -> int:
    """The index of the first line from ``start`` on that is neither blank nor indented."""
    end = start
    while end < len(lines) and (not lines[end].strip() or lines[end][0].isspace()):
        end += 1
    return end


def _rst_blocks(lines: list[str]) -> list[str]:
    blocks: list[str] = []
    literal_next = False  # the previous paragraph ended with "::"
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.strip():
            i += 1
            continue
        if line[0].isspace():  # a literal block, a block quote, or the body of a definition
            end = _indented_end(lines, i)
            inner = textwrap.dedent("\n".join(lines[i:end])).strip("\n").splitlines()
            if literal_next or inner[0].startswith(">>>"):
                blocks.append(fence(inner))
            else:
                blocks.extend(_rst_blocks(inner))
            literal_next = False
            i = end
            continue
        if line.startswith(".."):  # a directive, or a comment, label, footnote or substitution: dropped
            end = _indented_end(lines, i + 1)
            if directive := RST_DIRECTIVE.fullmatch(line.strip()):
                blocks.extend(_rst_directive(directive.group(1), directive.group(2).strip(), lines[i + 1 : end]))
            literal_next = False
            i = end
            continue
        end = i
        while end < len(lines) and lines[end].strip():
            end += 1
        paragraph = "\n".join(lines[i:end]).rstrip()
        i = end
        literal_next = paragraph.endswith("::")
        if literal_next:  # "Text::" -> "Text:", "Text ::" -> "Text", "::" -> nothing
            paragraph = paragraph[:-2]
            paragraph = paragraph.rstrip() if not paragraph or paragraph[-1].isspace() else paragraph + ":"
        if paragraph and not RST_ADORNMENT.fullmatch(paragraph):  # an adornment alone is a transition
            blocks.append("\n".join(escape_hash(text) for text in rst_inline(paragraph).splitlines()))
    return blocks


def _rst_directive(name: str, argument: str, body: Sequence[str]) -> list[str]:
    """A directive's Markdown blocks; ``body`` is its indented lines (options, content)."""
    if name in RST_DROPPED_DIRECTIVES:
        return []
    lines = textwrap.dedent("\n".join(body)).splitlines()
    # Up to the first blank line: options, and more signatures of a signature directive.
    header_end = next((n for n, line in enumerate(lines) if not line.strip()), len(lines))
    header = [line for line in lines[:header_end] if not RST_OPTION.match(line.strip())]
    content = lines[header_end:]
    if name in RST_CODE_DIRECTIVES:
        code = textwrap.dedent("\n".join(header + content)).strip("\n").splitlines()
        return [fence(code)] if code else []
    blocks: list[str] = []
    if name in RST_SIGNATURE_DIRECTIVES:
        signatures = [argument, *(line.strip() for line in header)]
        blocks.append("\n".join(f"`{signature}`" for signature in signatures if signature))
    else:
        content = header + content
        if name in RST_ADMONITIONS:
            blocks.append(f"{RST_ADMONITIONS[name]} {rst_inline(argument)}".strip())
        elif name in RST_VERSION_NOTES:  # ".. versionchanged:: 3.3 Text" -> "Changed in version 3.3. Text"
            version, _, rest = argument.partition(" ")
            if name == "deprecated-removed":  # ".. deprecated-removed:: 3.6 3.12"
                removed, _, rest = rest.partition(" ")
                version = f"{version}, removed in version {removed}"
            blocks.append(f"{RST_VERSION_NOTES[name]} {version}. {rst_inline(rest)}".strip())
        elif name in RST_TITLED_DIRECTIVES and argument:
            blocks.append(rst_inline(argument))
    return blocks + _rst_blocks(content)


def rst_section_markdown(sections: Sequence[RstSection], *, top_level: int) -> str:
    """Sections as Markdown, a section of level ``top_level`` getting a ``#`` heading."""
    parts = []
    for section in sections:
        marks = "#" * min(max(section.level - top_level + 1, 1), 6)
        parts.append(f"{marks} {rst_inline(section.title)}\n\n{rst_to_markdown(section.body)}")
    return tidy("\n\n".join(parts))


def parse_python_faq(text: str) -> list[Entry]:
    """The entries of one of the Python FAQ pages; keys number the entries in order (1, 2, ...).

    The page's title is the first heading; below it are groups ("General
    Questions") and entries. Choice: an entry is a section, not inside another
    entry, that ends with "?" or has no sub-sections (a few entries are statements:
    "I try to use __spam and I get an error about _SomeClassName__spam."); groups
    have entries in them. The answer is the section's body with its sub-sections,
    if any, under Markdown headings (a group with no text of its own has an empty
    answer, skipped later).
    """
    sections = rst_sections(text)
    entries: list[Entry] = []
    entry_end = 0  # the sections before this index are in an entry already
    for index, section in enumerate(sections):
        if section.level <= 1 or index < entry_end:
            continue
        end = index + 1
        while end < len(sections) and sections[end].level > section.level:
            end += 1
        subsections = sections[index + 1 : end]
        if not section.title.endswith("?") and subsections:
            continue
        body = rst_to_markdown(section.body)
        answer = tidy(f"{body}\n\n{rst_section_markdown(subsections, top_level=section.level)}")
        entries.append(Entry(str(len(entries) + 1), plain(section.title), answer))
        entry_end = end
    return entries


def python_library_page(text: str) -> tuple[str, str]:
    """(title, Markdown text) of a page of the library reference: its first heading, all its sections."""
    sections = rst_sections(text)
    if not sections:
        return "", ""
    return plain(sections[0].title), rst_section_markdown(sections, top_level=1)


def build(out: Path) -> Corpus:
    root = unpack("python3.11-doc", out)
    sources = root / "usr/share/doc/python3.11/html/_sources"
    answers: list[Document] = []
    queries: list[Query] = []
    seen: set[str] = set()
    for path in sorted((sources / "faq").glob("*.rst.txt")):
        stem = path.name.removesuffix(".rst.txt")
        if stem == "index":
            continue
        entries = parse_python_faq(path.read_text(encoding="utf-8"))
        documents, page_queries = faq_documents(
            entries,
            id_prefix=f"python-faq-{stem}",
            title_prefix=f"Python FAQ {stem} entry",
            source=f"python3.11-doc:{path.relative_to(root)}",
            seen=seen,  # "What is Python?" is asked on two pages
        )
        answers += documents
        queries += page_queries

    pages = []
    for path in sorted((sources / "library").glob("*.rst.txt")):
        title, text = python_library_page(path.read_text(encoding="utf-8"))
        if path.name != "index.rst.txt" and len(text) >= MIN_LIBRARY_PAGE_CHARS:
            pages.append((path, title, text))
    distractors = [
        Document(
            f"python-library-{path.name.removesuffix('.rst.txt')}",
            title,
            f"python3.11-doc:{path.relative_to(root)}",
            cap_text(text, MAX_DISTRACTOR_CHARS),
            "distractor",
        )
        for path, title, text in spread(pages, math.ceil(len(answers) * 1.1))
    ]
    return Corpus(answers + distractors, queries)
