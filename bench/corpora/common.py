"""What the three corpora share: their types, the .deb packages, Markdown helpers, and writing them as jsonl."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar

# Shorter answers are mostly "Yes." or a bare link: nothing to retrieve.
MIN_ANSWER_CHARS = 80
# Distractors are cut (at a paragraph) to keep the time to ingest a corpus bounded.
MAX_DISTRACTOR_CHARS = 30_000


@dataclass(frozen=True)
class Document:
    id: str
    title: str
    source: str
    text: str
    kind: str  # "answer" or "distractor"


@dataclass(frozen=True)
class Query:
    query: str
    answer: str  # the id of the answer's document


@dataclass(frozen=True)
class Entry:
    """One FAQ entry as parsed from its source: ``key`` numbers it within the FAQ."""

    key: str
    question: str
    answer: str


@dataclass(frozen=True)
class Corpus:
    documents: list[Document]
    queries: list[Query]


# Packages ---------------------------------------------------------------------------------------------------------


def run(
    command: Sequence[str], *, cwd: Path | None = None, env: dict[str, str] | None = None, stdin: str | None = None
) -> str:
    """Run ``command`` (with ``stdin`` as its input) and return its stdout; fail with the command and its stderr."""
    try:
        result = subprocess.run(command, cwd=cwd, env=env, input=stdin, check=True, capture_output=True, text=True)
    except FileNotFoundError as exc:
        raise SystemExit(f"{command[0]}: not found ({exc})") from exc
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"{' '.join(command)} failed with exit status {exc.returncode}:\n{exc.stderr}") from exc
    return result.stdout


def unpack(package: str, out: Path) -> Path:
    """The root of ``package``'s files, downloaded to ``<out>/debs`` and unpacked to ``<out>/pkgs/<package>``."""
    debs = out / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    found = sorted(debs.glob(f"{package}_*.deb"))
    if not found:
        # As root, apt-get warns that it downloads unsandboxed; that is harmless.
        run(["apt-get", "download", package], cwd=debs)
        found = sorted(debs.glob(f"{package}_*.deb"))
        if not found:
            raise SystemExit(f"apt-get download {package} left no {package}_*.deb in {debs}")
    root = out / "pkgs" / package
    if not root.is_dir():
        # Unpacked aside, then renamed: an interrupted run leaves no half-unpacked package behind.
        partial = out / "pkgs" / f"{package}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        run(["dpkg", "-x", str(found[-1]), str(partial)])
        partial.rename(root)
    return root


# Text helpers -----------------------------------------------------------------------------------------------------


MARKDOWN_HEADING = re.compile(r"#{1,6}\s")


def tidy(text: str) -> str:
    """Strip trailing spaces, collapse runs of blank lines, strip the ends."""
    lines = [line.rstrip() for line in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def escape_hash(line: str) -> str:
    """A line of text (not a heading) that would read as a Markdown heading ("# apt-get install foo"), escaped."""
    return "\\" + line if MARKDOWN_HEADING.match(line) else line


def fence(lines: Sequence[str]) -> str:
    return "\n".join(["```", *lines, "```"])


def cap_text(text: str, limit: int) -> str:
    """``text`` cut at the last paragraph boundary before ``limit`` characters, with any open fence closed."""
    if len(text) <= limit:
        return text
    cut = text.rfind("\n\n", 0, limit)
    head = text[: cut if cut > 0 else limit].rstrip()
    if sum(1 for line in head.splitlines() if line.startswith("```")) % 2:
        head += "\n```"
    return head


T = TypeVar("T")


def spread(items: Sequence[T], count: int) -> list[T]:
    """``count`` of ``items``, evenly spaced (every n-th), in their order; all of them if there are fewer."""
    if count >= len(items):
        return list(items)
    return [items[i * len(items) // count] for i in range(count)]


def faq_documents(
    entries: Sequence[Entry], *, id_prefix: str, title_prefix: str, source: str, seen: set[str] | None = None
) -> tuple[list[Document], list[Query]]:
    """Answer documents with neutral titles ("<title_prefix> <key>") and their queries.

    Entries with a short answer are skipped, and so are questions already ``seen``
    (a set this adds to: pass one set for FAQs split over several files).
    """
    documents: list[Document] = []
    queries: list[Query] = []
    seen = set() if seen is None else seen
    for entry in entries:
        if len(entry.answer) < MIN_ANSWER_CHARS or entry.question in seen:
            continue
        seen.add(entry.question)
        if " ".join(entry.question.split()) in " ".join(entry.answer.split()):
            raise ValueError(f"{source}: the answer of entry {entry.key} contains its question")
        document_id = f"{id_prefix}-{entry.key}"
        title = f"{title_prefix} {entry.key}"
        documents.append(Document(document_id, title, f"{source}#{entry.key}", entry.answer, "answer"))
        queries.append(Query(entry.question, document_id))
    return documents, queries


def write_jsonl(path: Path, rows: Sequence[Document] | Sequence[Query]) -> None:
    with path.open("w", encoding="utf-8") as file:
        for row in rows:
            file.write(json.dumps(asdict(row), ensure_ascii=False) + "\n")


def write_corpus(corpus: Corpus, directory: Path) -> dict[str, int]:
    directory.mkdir(parents=True, exist_ok=True)
    write_jsonl(directory / "documents.jsonl", corpus.documents)
    write_jsonl(directory / "queries.jsonl", corpus.queries)
    answers = sum(1 for document in corpus.documents if document.kind == "answer")
    return {
        "documents": len(corpus.documents),
        "answers": answers,
        "distractors": len(corpus.documents) - answers,
        "queries": len(corpus.queries),
        "characters": sum(len(document.text) for document in corpus.documents),
    }
