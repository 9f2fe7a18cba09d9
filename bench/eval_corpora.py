"""Retrieval-evaluation corpora built from Debian documentation packages.

    .venv/bin/python bench/eval_corpora.py [--out var/eval] [corpus ...]

Each corpus is a set of FAQ answers plus unrelated "distractor" documents, and a
query per answer: the FAQ's own question. A retrieval run ingests the documents,
asks every query and checks whether the answer document comes back. The corpora:

- ``debian-faq``: the Debian GNU/Linux FAQ (package ``debian-faq``, plain text);
  distractors: Linux man-pages of sections 2 and 3 (system calls and libc), from
  ``manpages-dev`` (Debian's ``manpages`` package holds the other sections).
- ``python-faq``: the Python FAQs (package ``python3.11-doc``, reStructuredText);
  distractors: pages of the Python library reference.
- ``git-faq``: gitfaq(7) (package ``git-doc``, AsciiDoc); distractors: git command
  manuals.

Every answer is a document of its own whose title is neutral ("Debian FAQ entry
4.2") and whose text is the answer only: were the question in the title or the
text, a query would find its document by matching the question's own words, and
the evaluation would measure string matching, not retrieval of an answer.

Document text is Markdown-ish, as the app's chunker expects: headings become
``#`` headings, paragraphs are separated by blank lines, code is fenced with ```.

Writes ``<out>/<corpus>/documents.jsonl`` ({"id", "title", "source", "text",
"kind": "answer"|"distractor"}, answers in the FAQ's order, then distractors by
file name) and ``<out>/<corpus>/queries.jsonl`` ({"query", "answer": document
id}), and prints a JSON summary. Downloaded packages are kept in ``<out>/debs/``
and unpacked in ``<out>/pkgs/``; a second run reuses them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from corpora import debian_faq, git_faq, python_faq
from corpora.common import Corpus, write_corpus

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "var" / "eval"


CORPORA: dict[str, Callable[[Path], Corpus]] = {
    "debian-faq": debian_faq.build,
    "python-faq": python_faq.build,
    "git-faq": git_faq.build,
}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build retrieval-evaluation corpora from Debian documentation.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: var/eval)")
    parser.add_argument("corpora", nargs="*", metavar="corpus", help=f"any of {', '.join(CORPORA)} (default: all)")
    args = parser.parse_args(argv)
    if unknown := [name for name in args.corpora if name not in CORPORA]:
        parser.error(f"unknown corpus: {', '.join(unknown)} (choose from {', '.join(CORPORA)})")
    out = args.out.resolve()
    summary = {name: write_corpus(CORPORA[name](out), out / name) for name in args.corpora or CORPORA}
    json.dump(summary, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
