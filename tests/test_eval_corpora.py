"""The parsers of bench/eval_corpora.py, on short samples of the three source formats (nothing is downloaded)."""

from __future__ import annotations

import textwrap

import pytest

from bench.corpora.common import Entry, cap_text, faq_documents, spread
from bench.corpora.debian_faq import man_to_markdown, parse_debian_faq
from bench.corpora.git_faq import asciidoc_to_markdown, parse_git_faq
from bench.corpora.python_faq import parse_python_faq, python_library_page

NBSP = "\xa0"

# The Debian FAQ's text edition: a table of contents, then chapters; non-breaking spaces
# follow the numbers and sometimes indent a line.
DEBIAN_FAQ = textwrap.dedent(
    """\
                          The Debian GNU/Linux FAQ

    Table of Contents

    1. Definitions and overview
        1.1. What is this FAQ?
        1.2. What is the difference between Debian GNU/Linux and other
        Linux distributions?

    Chapter{nbsp}1.{nbsp}Definitions and overview

    1.1.{nbsp}What is this FAQ?

        This document gives frequently asked questions (with their
    {nbsp}{nbsp}{nbsp} answers!) about the Debian distribution.

        It lists:

          * questions,

          * and their answers.

    1.2.{nbsp}What is the difference between Debian GNU/Linux and other Linux
    distributions?

        Debian is made by volunteers and has a well-defined packaging system.
        # dpkg -i foo.deb

    1.2.1.{nbsp}dpkg

        dpkg installs packages; it is the lowest of the package tools.

    1.3.{nbsp}Is this too short?

        Yes.


    ---------------------------------------------------------------------

        ^[1] A footnote, not part of any answer.

    Chapter{nbsp}2.{nbsp}General information about the FAQ

    2.1.{nbsp}Authors

        Written by many people over the years, whose names are listed here.
    """
).format(nbsp=NBSP)


def test_debian_faq_questions_come_from_the_chapters_not_the_table_of_contents():
    entries = parse_debian_faq(DEBIAN_FAQ)

    assert [(entry.key, entry.question) for entry in entries] == [
        ("1.1", "What is this FAQ?"),
        ("1.2", "What is the difference between Debian GNU/Linux and other Linux distributions?"),
        ("1.3", "Is this too short?"),
    ]


def test_debian_faq_answers_are_dedented_with_paragraphs_lists_and_sub_sections():
    entries = {entry.key: entry for entry in parse_debian_faq(DEBIAN_FAQ)}

    assert entries["1.1"].answer == (
        "This document gives frequently asked questions (with their\n"
        "answers!) about the Debian distribution.\n"
        "\n"
        "It lists:\n"
        "\n"
        "  * questions,\n"
        "\n"
        "  * and their answers."
    )
    # A sub-section that is not a question is part of its question's answer; a line that
    # would read as a Markdown heading is escaped.
    assert entries["1.2"].answer == (
        "Debian is made by volunteers and has a well-defined packaging system.\n"
        "\\# dpkg -i foo.deb\n"
        "\n"
        "## dpkg\n"
        "\n"
        "dpkg installs packages; it is the lowest of the package tools."
    )
    # The rule ends the chapter: its footnotes are in no answer.
    assert entries["1.3"].answer == "Yes."


def test_man_page_sections_become_headings_without_header_and_footer():
    rendered = textwrap.dedent(
        """\
        open(2)                    System Calls Manual                    open(2)

        NAME
               open, openat, creat - open and possibly create a file

        RETURN VALUE
               On success, the new file descriptor is returned.

           C library/kernel differences
               The open() wrapper calls openat().

        Linux man-pages 6.03         2023-02-05                           open(2)
        """
    )

    assert man_to_markdown(rendered, "open(2)") == (
        "# open(2)\n"
        "\n"
        "## Name\n"
        "\n"
        "open, openat, creat - open and possibly create a file\n"
        "\n"
        "## Return value\n"
        "\n"
        "On success, the new file descriptor is returned.\n"
        "\n"
        "### C library/kernel differences\n"
        "\n"
        "The open() wrapper calls openat()."
    )


PYTHON_FAQ = textwrap.dedent(
    """\
    :tocdepth: 2

    ===============
    Programming FAQ
    ===============

    .. only:: html

       .. contents::

    General Questions
    =================

    .. _faq-debugger:

    Is there a source code level debugger with breakpoints?
    -------------------------------------------------------

    Yes.  The :mod:`pdb` module is documented in the :ref:`Library Reference <pdb-doc>`,
    and :func:`breakpoint` drops into it.  See `the wiki <https://wiki.python.org/>`_.

    .. XXX this comment is dropped

    For example::

       import pdb
       pdb.set_trace()

    How do you remove multiple items from a list
    --------------------------------------------

    Use a list comprehension, as in :pep:`202`:

    .. code-block:: python

       mylist = [x for x in mylist if keep(x)]

    Why does the result of ``id()`` appear to be not unique?
    --------------------------------------------------------

    The :func:`id` builtin returns an integer that is guaranteed to be unique during
    the lifetime of the object.

       >>> id(1000) # doctest: +SKIP
       13901272
    """
)


def test_python_faq_questions_are_the_leaf_sections_with_their_markup_removed():
    entries = parse_python_faq(PYTHON_FAQ)

    assert [(entry.key, entry.question) for entry in entries] == [
        ("1", "Is there a source code level debugger with breakpoints?"),
        ("2", "How do you remove multiple items from a list"),
        ("3", "Why does the result of id() appear to be not unique?"),
    ]


def test_python_faq_answers_are_markdown():
    answers = [entry.answer for entry in parse_python_faq(PYTHON_FAQ)]

    assert answers[0] == (
        "Yes.  The `pdb` module is documented in the Library Reference,\n"
        "and `breakpoint` drops into it.  See the wiki.\n"
        "\n"
        "For example:\n"
        "\n"
        "```\n"
        "import pdb\n"
        "pdb.set_trace()\n"
        "```"
    )
    assert answers[1] == (
        "Use a list comprehension, as in PEP 202:\n\n```\nmylist = [x for x in mylist if keep(x)]\n```"
    )
    assert answers[2].endswith("the lifetime of the object.\n\n```\n>>> id(1000) # doctest: +SKIP\n13901272\n```")


def test_python_faq_answer_includes_its_sub_sections_under_markdown_headings():
    text = textwrap.dedent(
        """\
        Title
        =====

        How do I run a program?
        -----------------------

        It depends on the platform.

        On Windows
        ~~~~~~~~~~

        Type the program's name at the prompt.
        """
    )

    [entry] = parse_python_faq(text)

    assert entry.question == "How do I run a program?"
    assert entry.answer == "It depends on the platform.\n\n## On Windows\n\nType the program's name at the prompt."


def test_python_library_page_keeps_its_headings_and_renders_directives():
    text = textwrap.dedent(
        """\
        :mod:`glob` --- Unix style pathname pattern expansion
        =====================================================

        .. module:: glob
           :synopsis: Unix shell style pathname pattern expansion.

        .. index:: single: filenames; pathname expansion

        The :mod:`glob` module finds all the pathnames matching a pattern.

        Functions
        ---------

        .. function:: glob(pathname, *, recursive=False)

           Return a possibly empty list of path names.

           .. versionadded:: 3.5 The *recursive* parameter.

           .. note::
              Using the "``**``" pattern in large directory trees may consume
              an inordinate amount of time.
        """
    )

    title, markdown = python_library_page(text)

    assert title == "glob --- Unix style pathname pattern expansion"
    assert markdown == (
        "# `glob` --- Unix style pathname pattern expansion\n"
        "\n"
        "The `glob` module finds all the pathnames matching a pattern.\n"
        "\n"
        "## Functions\n"
        "\n"
        "`glob(pathname, *, recursive=False)`\n"
        "\n"
        "Return a possibly empty list of path names.\n"
        "\n"
        "New in version 3.5. The *recursive* parameter.\n"
        "\n"
        "Note:\n"
        "\n"
        'Using the "`**`" pattern in large directory trees may consume\n'
        "an inordinate amount of time."
    )


GIT_FAQ = textwrap.dedent(
    """\
    gitfaq(7)
    =========

    NAME
    ----
    gitfaq - Frequently asked questions about using Git

    Configuration
    -------------

    [[configure-editor]]
    How do I configure a different editor?::
    \tGit uses the editor you've configured using the `VISUAL` or `EDITOR`
    \tenvironment variables.
    +
    For example, if you prefer the editor `nano`:
    +
    ----
    export VISUAL=nano
    ----
    +
    See linkgit:git-var[1] for details.

    [[files-in-gitignore-are-tracked]]
    I asked Git to ignore various files, yet they are still tracked::
    \tA `gitignore` file ensures that untracked files remain untracked.

    GIT
    ---
    Part of the linkgit:git[1] suite
    """
)


def test_git_faq_entries_are_the_anchored_terms():
    entries = parse_git_faq(GIT_FAQ)

    assert [(entry.key, entry.question) for entry in entries] == [
        ("1", "How do I configure a different editor?"),
        ("2", "I asked Git to ignore various files, yet they are still tracked"),
    ]
    assert entries[0].answer == (
        "Git uses the editor you've configured using the `VISUAL` or `EDITOR`\n"
        "environment variables.\n"
        "\n"
        "For example, if you prefer the editor `nano`:\n"
        "\n"
        "```\n"
        "export VISUAL=nano\n"
        "```\n"
        "\n"
        "See git-var(1) for details."
    )
    # The answer ends at the next heading.
    assert entries[1].answer == "A `gitignore` file ensures that untracked files remain untracked."


def test_asciidoc_headings_become_markdown_headings():
    text = textwrap.dedent(
        """\
        git-add(1)
        ==========

        NAME
        ----
        git-add - Add file contents to the index

        SEE ALSO
        --------
        linkgit:git-status[1]
        """
    )

    assert asciidoc_to_markdown(text) == (
        "# git-add(1)\n\n## Name\n\ngit-add - Add file contents to the index\n\n## See also\n\ngit-status(1)"
    )


def test_faq_documents_have_neutral_titles_and_the_question_as_query():
    entries = [
        Entry("4.2", "What kernels does Debian run?", "Besides Linux, Debian runs on FreeBSD kernels. " * 3),
        Entry("4.3", "Is this answer too short?", "Yes."),
        Entry("4.4", "What kernels does Debian run?", "A repeated question is left out, long as its answer is."),
    ]

    documents, queries = faq_documents(entries, id_prefix="debian-faq", title_prefix="Debian FAQ entry", source="faq")

    [document] = documents
    assert document.id == "debian-faq-4.2"
    assert document.title == "Debian FAQ entry 4.2"
    assert document.kind == "answer"
    assert document.source == "faq#4.2"
    assert document.text == entries[0].answer
    assert [(query.query, query.answer) for query in queries] == [("What kernels does Debian run?", "debian-faq-4.2")]


def test_faq_documents_refuse_an_answer_that_contains_its_question():
    answer = "What is Python?  It is an interpreted, interactive, object-oriented programming language."
    entry = Entry("1", "What is Python?", answer)

    with pytest.raises(ValueError, match="contains its question"):
        faq_documents([entry], id_prefix="python-faq", title_prefix="Python FAQ entry", source="faq")


def test_cap_text_cuts_at_a_paragraph_and_closes_a_fence():
    text = "First paragraph.\n\n```\ncode line\n\nmore code\n```\n\nLast paragraph."

    assert cap_text(text, 1000) == text
    assert cap_text(text, 20) == "First paragraph."
    assert cap_text(text, 40) == "First paragraph.\n\n```\ncode line\n```"


def test_spread_takes_every_nth_item():
    assert spread(list(range(10)), 5) == [0, 2, 4, 6, 8]
    assert spread(list(range(3)), 5) == [0, 1, 2]
