"""rag.services.chunking: sections by heading, then paragraphs, sentences and words."""

from __future__ import annotations

import itertools
import re

import pytest

from rag.providers.base import estimate_tokens
from rag.services.chunking import ChunkDraft, chunk_text


def chunks(text: str, *, max_tokens: int = 200, overlap: int = 0) -> list[ChunkDraft]:
    return chunk_text(text, max_tokens=max_tokens, overlap=overlap, count_tokens=estimate_tokens)


def numbered_sentences(prefix: str, n: int) -> str:
    """Distinct sentences, so a sentence found in two chunks can only be overlap."""
    return " ".join(f"{prefix} sentence number {i} talks about item {prefix}{i}." for i in range(n))


def sentences_of(text: str) -> list[str]:
    return [s.strip() for s in re.findall(r"[^.!?]+[.!?]", text)]


NESTED = """\
# Install
Install it with pip.

## Linux
Use the package manager on Linux.

### Debian
Run apt on Debian.

## Windows
Use the installer on Windows.

# Usage ##
Run the server.
"""


def test_headings_produce_heading_paths():
    drafts = chunks(NESTED)
    assert [(d.heading, d.text) for d in drafts] == [
        ("Install", "Install it with pip."),
        ("Install > Linux", "Use the package manager on Linux."),
        ("Install > Linux > Debian", "Run apt on Debian."),
        # A heading closes the deeper ones and replaces its own level.
        ("Install > Windows", "Use the installer on Windows."),
        # Closing hashes are not part of the title.
        ("Usage", "Run the server."),
    ]


def test_text_before_the_first_heading_has_no_heading_path():
    drafts = chunks("Preamble text.\n\n# Title\nBody text.")
    assert [(d.heading, d.text) for d in drafts] == [("", "Preamble text."), ("Title", "Body text.")]


def test_hash_without_space_is_not_a_heading():
    drafts = chunks("#hashtag is a word\n\nmore text")
    assert [d.heading for d in drafts] == [""]
    assert "#hashtag is a word" in drafts[0].text


def test_embedding_text_carries_the_title_and_the_heading_path():
    [draft] = chunks("# Setup\n## Database\nCreate the database.")
    assert draft.heading == "Setup > Database"
    assert draft.embedding_text() == "Setup > Database\n\nCreate the database."
    assert draft.embedding_text("Manual") == "Manual > Setup > Database\n\nCreate the database."
    # A title that is also the first heading is not said twice.
    assert draft.embedding_text("Setup") == "Setup > Database\n\nCreate the database."
    [plain] = chunks("No heading here.")
    assert plain.embedding_text() == "No heading here."
    assert plain.embedding_text("Notes") == "Notes\n\nNo heading here."


def test_sections_never_mix():
    # Small chunks and a large overlap: packing and overlap must still stop at headings.
    text = "\n\n".join(
        [
            "# Alpha",
            numbered_sentences("alpha", 12),
            "## Beta",
            numbered_sentences("beta", 12),
            "# Gamma",
            numbered_sentences("gamma", 12),
        ]
    )
    drafts = chunks(text, max_tokens=40, overlap=20)
    owner = {"alpha": "Alpha", "beta": "Alpha > Beta", "gamma": "Gamma"}
    assert {d.heading for d in drafts} == set(owner.values())
    for draft in drafts:
        markers = set(re.findall(r"\b(alpha|beta|gamma) sentence", draft.text))
        assert len(markers) == 1, draft
        assert owner[markers.pop()] == draft.heading
    # Every section's sentences all made it, in order.
    for prefix, heading in owner.items():
        seen: list[str] = []
        for draft in (d for d in drafts if d.heading == heading):
            for sentence in sentences_of(draft.text):
                if sentence not in seen:
                    seen.append(sentence)
        assert seen == sentences_of(numbered_sentences(prefix, 12))


@pytest.mark.parametrize("fence", ["```", "~~~"])
def test_hash_lines_inside_code_fences_are_not_headings(fence):
    text = (
        f"# Real\nBefore the code.\n\n{fence}bash\n# a shell comment\n\n## another comment\necho hi\n{fence}\n\nAfter."
    )
    drafts = chunks(text)
    assert {d.heading for d in drafts} == {"Real"}
    joined = "\n\n".join(d.text for d in drafts)
    assert "# a shell comment" in joined and "## another comment" in joined
    # The blank line inside the fence does not split the code block into paragraphs.
    code = next(d.text for d in drafts if "echo hi" in d.text)
    assert f"{fence}bash\n# a shell comment\n\n## another comment\necho hi\n{fence}" in code


def test_heading_after_a_closed_fence_is_a_heading_again():
    drafts = chunks("# One\n```\n# comment\n```\n\n# Two\nText two.")
    assert [d.heading for d in drafts] == ["One", "Two"]


PROSE = (
    "Retrieval-augmented generation combines search with a language model. "
    "The question is embedded, the nearest chunks are found, and the model answers from them! "
    "Short one. "
    "Does chunk size matter? It does: chunks too large dilute the match, chunks too small lose context. "
    "A sentence with many commas, clauses, asides, and qualifications, which goes on for a while, "
    "and then a little longer, before it finally, at long last, comes to an end."
)


@pytest.mark.parametrize(
    ("text", "max_tokens", "overlap"),
    [
        pytest.param("\n\n".join([PROSE] * 6), 50, 10, id="prose"),
        pytest.param("\n\n".join([PROSE] * 6), 16, 4, id="prose-tiny-chunks"),
        pytest.param("# H\n\n" + "\n\n".join(f"Paragraph {i}: {PROSE}" for i in range(4)), 120, 30, id="paragraphs"),
        # Five-word sentences: estimate_tokens gives each 6 (6.5 rounded down), but n of them
        # together 6.5 * n, so summing the pieces' counts under-counts the joined chunk.
        pytest.param(" ".join(f"One two three four{i}." for i in range(40)), 60, 10, id="five-word-sentences"),
    ],
)
def test_every_chunk_fits_max_tokens(text, max_tokens, overlap):
    drafts = chunks(text, max_tokens=max_tokens, overlap=overlap)
    assert len(drafts) > 1
    for draft in drafts:
        # token_count is what the counter says of the chunk's text, and within the limit.
        assert draft.token_count == estimate_tokens(draft.text)
        assert draft.token_count <= max_tokens, draft


def test_positions_are_consecutive_from_zero_across_sections():
    text = "\n\n".join(["# A", numbered_sentences("a", 10), "# B", numbered_sentences("b", 10)])
    drafts = chunks(text, max_tokens=30, overlap=8)
    assert len(drafts) > 4
    assert [d.position for d in drafts] == list(range(len(drafts)))


def test_consecutive_chunks_overlap_when_overlap_is_positive():
    overlap = 15
    drafts = chunks(numbered_sentences("x", 20), max_tokens=40, overlap=overlap)
    assert len(drafts) >= 4
    for before, after in itertools.pairwise(drafts):
        shared = [s for s in sentences_of(before.text) if s in sentences_of(after.text)]
        assert shared, (before.text, after.text)
        # The overlap is the end of one chunk carried to the start of the next, within the budget.
        carried = " ".join(shared)
        assert before.text.endswith(carried)
        assert after.text.startswith(carried)
        assert estimate_tokens(carried) <= overlap


def test_consecutive_chunks_share_nothing_without_overlap():
    source = numbered_sentences("x", 20)
    drafts = chunks(source, max_tokens=40, overlap=0)
    assert len(drafts) >= 4
    for before, after in itertools.pairwise(drafts):
        assert not set(sentences_of(before.text)) & set(sentences_of(after.text))
    # Without overlap the chunks are exactly the text, cut at sentence ends.
    assert " ".join(d.text for d in drafts) == source


def test_very_long_sentence_splits_at_words():
    words = [f"w{i}" for i in range(300)]
    sentence = " ".join(words)  # no sentence end anywhere
    drafts = chunks(sentence, max_tokens=25, overlap=0)
    assert len(drafts) > 5
    for draft in drafts:
        assert draft.token_count <= 25
        # Cut between words, never inside one.
        assert all(re.fullmatch(r"w\d+", w) for w in draft.text.split())
    assert " ".join(d.text for d in drafts).split() == words


def test_long_paragraph_splits_at_sentence_ends():
    paragraph = numbered_sentences("s", 15)
    drafts = chunks(paragraph, max_tokens=30, overlap=0)
    assert len(drafts) > 1
    for draft in drafts:
        assert draft.text.endswith(".")
        assert sentences_of(draft.text)[0].startswith("s sentence number")


def test_paragraphs_that_fit_are_packed_together():
    drafts = chunks("First paragraph.\n\nSecond paragraph.\n\nThird paragraph.", max_tokens=200)
    assert [d.text for d in drafts] == ["First paragraph.\n\nSecond paragraph.\n\nThird paragraph."]


@pytest.mark.parametrize("text", ["", "   ", "\n\n\n", "# Only a heading\n\n## And another"])
def test_text_without_content_gives_no_chunks(text):
    assert chunks(text) == []


def test_windows_line_endings_are_handled():
    drafts = chunks("# Title\r\nLine one.\r\n\r\nLine two.\r\n")
    assert [(d.heading, d.text) for d in drafts] == [("Title", "Line one.\n\nLine two.")]


MAN_PAGE = "# open(2)\n## Name\nopen - open a file\n## Library\nStandard C library\n## Description\n" + (
    "The open() system call opens the file specified by pathname. " * 3
)


def test_small_sections_are_joined_under_the_path_they_share():
    [name_and_library, description] = chunk_text(
        MAN_PAGE, max_tokens=60, overlap=0, count_tokens=estimate_tokens, min_tokens=20
    )
    # NAME and LIBRARY are a few tokens each: one chunk under "open(2)", each part still named.
    assert name_and_library.heading == "open(2)"
    assert name_and_library.text == "Name\n\nopen - open a file\n\nLibrary\n\nStandard C library"
    # DESCRIPTION is long enough to stand alone, and would not fit with them anyway.
    assert description.heading == "open(2) > Description"


def test_joining_never_makes_a_chunk_over_max_tokens():
    for max_tokens in (20, 40, 80, 200):
        drafts = chunk_text(MAN_PAGE, max_tokens=max_tokens, overlap=0, count_tokens=estimate_tokens, min_tokens=500)
        assert all(d.token_count <= max_tokens for d in drafts)


def test_without_min_tokens_every_section_is_its_own_chunk():
    drafts = chunk_text(MAN_PAGE, max_tokens=200, overlap=0, count_tokens=estimate_tokens)
    assert [d.heading for d in drafts] == ["open(2) > Name", "open(2) > Library", "open(2) > Description"]


def test_joined_sections_keep_all_their_text_in_order():
    text = "\n".join(f"## Part {i}\nWords of part {i}." for i in range(12))
    drafts = chunk_text(text, max_tokens=200, overlap=0, count_tokens=estimate_tokens, min_tokens=150)
    assert len(drafts) == 1 and drafts[0].heading == ""
    assert drafts[0].text == "\n\n".join(f"Part {i}\n\nWords of part {i}." for i in range(12))
