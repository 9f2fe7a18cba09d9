"""The ``git-faq`` corpus: gitfaq(7) (AsciiDoc); distractors: git command manuals."""

from __future__ import annotations

import re
from pathlib import Path

from .common import (
    MAX_DISTRACTOR_CHARS,
    Corpus,
    Document,
    Entry,
    cap_text,
    escape_hash,
    faq_documents,
    spread,
    tidy,
    unpack,
)

MAX_GIT_DISTRACTORS = 200


ASCIIDOC_UNDERLINES = {"=": 1, "-": 2, "~": 3, "^": 4, "+": 5}
ASCIIDOC_UNDERLINE = re.compile(r"([=\-~^+])\1+")
ASCIIDOC_CODE_DELIMITER = re.compile(r"-{4,}|\.{4,}")  # listing and literal blocks
ASCIIDOC_OTHER_DELIMITER = re.compile(r"={4,}|\*{4,}|_{4,}|--")  # example, sidebar, quote and open blocks
ASCIIDOC_DROPPED = re.compile(r"\[\[[^\]]*\]\]|\[[^\]]*\]|(include|ifdef|ifndef|ifeval|endif)::.*|//.*")
ASCIIDOC_ANCHOR = re.compile(r"\[\[[^\]]+\]\]")
LINKGIT = re.compile(r"linkgit:([\w.-]+)\[(\w+)\]")


def asciidoc_inline(text: str) -> str:
    """linkgit:git-config[1] -> git-config(1); {litdd} -> --."""
    return LINKGIT.sub(r"\1(\2)", text.replace("{litdd}", "--"))


def asciidoc_heading_level(line: str, below: str) -> int | None:
    """The level of the two-line heading ``line`` underlined by ``below``, if it is one."""
    if not line.strip() or line[0].isspace() or line == "+" or ASCIIDOC_DROPPED.fullmatch(line):
        return None
    if ASCIIDOC_CODE_DELIMITER.fullmatch(line) or ASCIIDOC_OTHER_DELIMITER.fullmatch(line):
        return None
    if ASCIIDOC_UNDERLINE.fullmatch(below) and abs(len(below) - len(line)) <= 2:
        return ASCIIDOC_UNDERLINES[below[0]]
    return None


def asciidoc_to_markdown(text: str) -> str:
    """AsciiDoc (as git's manuals use it) as Markdown.

    Underlined headings become Markdown headings ("NAME" -> "## Name"), ``----``
    and ``....`` blocks fences, ``+`` list continuations blank lines,
    linkgit:git-config[1] git-config(1); anchors, block attributes, includes and
    conditionals go; definition-list bodies lose their indentation.
    """
    lines = text.splitlines()
    out: list[str] = []
    delimiter: str | None = None  # of the code block we are in
    i = 0
    while i < len(lines):
        line = lines[i].rstrip()
        below = lines[i + 1].rstrip() if i + 1 < len(lines) else ""
        i += 1
        if delimiter is not None:
            if line == delimiter:
                out.extend(["```", ""])
                delimiter = None
            else:
                out.append(line)
            continue
        if ASCIIDOC_CODE_DELIMITER.fullmatch(line):
            out.extend(["", "```"])
            delimiter = line
            continue
        level = asciidoc_heading_level(line, below)
        if level is not None:
            title = line.strip().capitalize() if line.isupper() else line.strip()
            out.extend(["", f"{'#' * level} {asciidoc_inline(title)}", ""])
            i += 1
            continue
        if line == "+":
            out.append("")
        elif not (ASCIIDOC_OTHER_DELIMITER.fullmatch(line) or ASCIIDOC_DROPPED.fullmatch(line)):
            out.append(escape_hash(asciidoc_inline(line.strip())))
    if delimiter is not None:
        out.append("```")
    return tidy("\n".join(out))


def parse_git_faq(text: str) -> list[Entry]:
    """The entries of gitfaq(7); keys number them in order (1, 2, ...).

    An entry is an ``[[anchor]]`` line followed by its question, a definition-list
    term ("How do I configure a different editor?::"); its answer runs to the next
    anchor or heading. Choice: every such term is a question, also the few phrased
    as statements ("I asked Git to ignore various files, yet they are still tracked").
    """
    lines = text.splitlines()
    entries: list[Entry] = []
    i = 0
    while i < len(lines):
        if not (ASCIIDOC_ANCHOR.fullmatch(lines[i].strip()) and i + 1 < len(lines) and lines[i + 1].endswith("::")):
            i += 1
            continue
        question = lines[i + 1].removesuffix("::").strip()
        end = i + 2
        while end < len(lines):
            below = lines[end + 1] if end + 1 < len(lines) else ""
            if ASCIIDOC_ANCHOR.fullmatch(lines[end].strip()) or asciidoc_heading_level(lines[end], below) is not None:
                break
            end += 1
        answer = asciidoc_to_markdown("\n".join(lines[i + 2 : end]))
        entries.append(Entry(str(len(entries) + 1), " ".join(question.replace("`", "").split()), answer))
        i = end
    return entries


def build(out: Path) -> Corpus:
    root = unpack("git-doc", out)
    docs = root / "usr/share/doc/git-doc"
    faq_path = docs / "gitfaq.txt"
    answers, queries = faq_documents(
        parse_git_faq(faq_path.read_text(encoding="utf-8")),
        id_prefix="git-faq",
        title_prefix="Git FAQ entry",
        source=f"git-doc:{faq_path.relative_to(root)}",
    )
    distractors = []
    for path in spread(sorted(docs.glob("git-*.txt")), MAX_GIT_DISTRACTORS):
        text = path.read_text(encoding="utf-8")
        title = asciidoc_inline(text.splitlines()[0].strip()) if text.strip() else path.stem
        distractors.append(
            Document(
                f"git-doc-{path.stem}",
                title,
                f"git-doc:{path.relative_to(root)}",
                cap_text(asciidoc_to_markdown(text), MAX_DISTRACTOR_CHARS),
                "distractor",
            )
        )
    return Corpus(answers + distractors, queries)
