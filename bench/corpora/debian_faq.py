"""The ``debian-faq`` corpus: the Debian FAQ (plain text); distractors: man-pages of sections 2 and 3."""

from __future__ import annotations

import gzip
import os
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

from .common import (
    MAX_DISTRACTOR_CHARS,
    Corpus,
    Document,
    Entry,
    cap_text,
    escape_hash,
    faq_documents,
    run,
    spread,
    tidy,
    unpack,
)

MIN_DEBIAN_DISTRACTORS = 150


DEBIAN_CHAPTER = re.compile(r"Chapter \d+\.\s")
DEBIAN_HEADING = re.compile(r"(\d+(?:\.\d+)*)\.\s+(\S.*)")
DEBIAN_RULE = re.compile(r"-{10,}")


def join_wrapped(lines: Sequence[str]) -> str:
    """Lines of a wrapped heading as one line; "Red Hat/" + "Slackware" gives "Red Hat/Slackware"."""
    text = ""
    for line in lines:
        glue = "" if not text or text.endswith("/") or line.startswith("/") else " "
        text += glue + line
    return text


def parse_debian_faq(text: str) -> list[Entry]:
    """The entries of the Debian FAQ's plain-text edition.

    The text after the table of contents is a sequence of numbered headings at
    column 0 ("4.2. What kernels does Debian GNU/Linux run?", wrapped onto more
    lines at column 0 when long) with an indented body each; chapters ("Chapter 4.
    Compatibility issues") group them, and a rule ends a chapter's text (its
    footnotes follow).

    Choice: a question is a heading with a "?" in it (a few end with another
    sentence: "OK, now I know what Debian is... what is Linux?!"); the others are
    tool names or topics. A heading that is not a question and is numbered under
    one ("8.1.1. dpkg" under "8.1. What programs does Debian provide for managing
    its packages?") is part of that question's answer, as a Markdown heading; the
    others ("16.1. Authors") are left out.
    """
    lines = text.replace("\xa0", " ").splitlines()
    start = next((i for i, line in enumerate(lines) if DEBIAN_CHAPTER.match(line)), None)
    if start is None:
        raise ValueError("no 'Chapter N.' heading: not the Debian FAQ's text edition")
    sections: list[tuple[str, str, list[str]]] = []  # number, heading, body lines
    body: list[str] | None = None
    i = start
    while i < len(lines):
        line = lines[i]
        heading = DEBIAN_HEADING.match(line)
        if heading or DEBIAN_CHAPTER.match(line):
            words = [line.strip()]
            i += 1
            while i < len(lines) and lines[i].strip() and not lines[i][0].isspace():
                words.append(lines[i].strip())
                i += 1
            if heading:
                title = join_wrapped(words)[len(heading.group(1)) + 1 :].strip()
                body = []
                sections.append((heading.group(1), title, body))
            else:
                body = None
            continue
        if DEBIAN_RULE.fullmatch(line.strip()):
            body = None
        elif body is not None:
            body.append(line)
        i += 1

    parts: dict[str, tuple[str, list[str]]] = {}  # question number -> question, answer parts
    for number, title, body_lines in sections:
        text_block = "\n".join(escape_hash(line) for line in textwrap.dedent("\n".join(body_lines)).splitlines())
        if "?" in title:
            parts[number] = (title, [text_block])
            continue
        numbers = number.split(".")
        for depth in range(len(numbers) - 1, 0, -1):
            parent = ".".join(numbers[:depth])
            if parent in parts:
                heading_mark = "#" * min(len(numbers) - depth + 1, 6)
                parts[parent][1].append(f"{heading_mark} {title}\n\n{text_block}")
                break
    return [Entry(number, question, tidy("\n\n".join(blocks))) for number, (question, blocks) in parts.items()]


MAN_SECTION = re.compile(r"[A-Z][A-Z0-9 ,/()_-]*")
MAN_SUBSECTION = re.compile(r" {3}\S.*")


def man_to_markdown(rendered: str, title: str) -> str:
    """A manual page as ``man`` renders it to plain text, as Markdown.

    The header and footer lines go; the all-caps section names at column 0 become
    ``## Name`` headings and the sub-sections indented by 3 become ``###`` headings.
    """
    lines = rendered.splitlines()
    while lines and not lines[0].strip():
        lines.pop(0)
    while lines and not lines[-1].strip():
        lines.pop()
    out = [f"# {title}", ""]
    for line in lines[1:-1]:
        if MAN_SECTION.fullmatch(line.rstrip()):
            out.extend(["", f"## {line.strip().capitalize()}", ""])
        elif MAN_SUBSECTION.fullmatch(line.rstrip()):
            out.extend(["", f"### {line.strip()}", ""])
        else:
            out.append(escape_hash(line[7:] if line.startswith(" " * 7) else line.lstrip()))
    return tidy("\n".join(out))


def render_man_page(path: Path) -> str:
    """The manual page at ``path`` as plain text, 100 columns wide."""
    env = {**os.environ, "MANWIDTH": "100", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    # --nh --nj: no hyphenation, no justification; col -bx drops overstrikes and tabs.
    rendered = run(["man", "--nh", "--nj", "-l", "-P", "cat", str(path)], env=env)
    return run(["col", "-bx"], env=env, stdin=rendered)


def man_page_name(path: Path) -> str:
    """``open(2)`` for man2/open.2.gz."""
    name, section = path.name.removesuffix(".gz").rsplit(".", 1)
    return f"{name}({section})"


def build(out: Path) -> Corpus:
    faq_root = unpack("debian-faq", out)
    faq_path = "usr/share/doc/debian/FAQ/debian-faq.en.txt.gz"
    entries = parse_debian_faq(gzip.decompress((faq_root / faq_path).read_bytes()).decode("utf-8"))
    answers, queries = faq_documents(
        entries, id_prefix="debian-faq", title_prefix="Debian FAQ entry", source=f"debian-faq:{faq_path}"
    )

    man_root = unpack("manpages-dev", out)
    pages = [
        path
        for section in ("man2", "man3")
        for path in sorted((man_root / "usr/share/man" / section).iterdir())
        if path.is_file() and not path.is_symlink()  # aliases are symlinks to the page they alias
    ]
    distractors = []
    for path in spread(pages, max(len(answers), MIN_DEBIAN_DISTRACTORS)):
        name = man_page_name(path)
        text = cap_text(man_to_markdown(render_man_page(path), name), MAX_DISTRACTOR_CHARS)
        source = f"manpages-dev:{path.relative_to(man_root)}"
        distractors.append(Document(f"manpage-{path.name.removesuffix('.gz')}", name, source, text, "distractor"))
    return Corpus(answers + distractors, queries)
