"""Structure-aware chunking: sections by heading, then paragraphs, then sentences.

Chunks never straddle a heading, so every chunk has one heading path to show
as its context; a paragraph too long for one chunk is split at sentence ends,
and a sentence too long at word boundaries. Consecutive chunks of a section
share up to ``overlap`` tokens of whole sentences.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^\s*(```|~~~)")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？])\s+(?=\S)")


@dataclass(frozen=True, slots=True)
class ChunkDraft:
    position: int
    text: str
    heading: str
    token_count: int

    @property
    def embedding_text(self) -> str:
        # The heading path is embedded with the text: it often carries the topic
        # a paragraph leaves implicit ("Installation > Windows").
        return f"{self.heading}\n\n{self.text}" if self.heading else self.text


def chunk_text(text: str, *, max_tokens: int, overlap: int, count_tokens: Callable[[str], int]) -> list[ChunkDraft]:
    # Packing counts the same joined text more than once (a window, then the chunk it
    # becomes); with a real tokenizer that was a third of the chunking time.
    count_tokens = functools.lru_cache(maxsize=256)(count_tokens)
    drafts: list[ChunkDraft] = []
    for heading, paragraphs in _sections(text):
        pieces = [
            (n, piece) for n, paragraph in enumerate(paragraphs) for piece in _fit(paragraph, max_tokens, count_tokens)
        ]
        for chunk in _pack(pieces, max_tokens, overlap, count_tokens):
            drafts.append(ChunkDraft(len(drafts), chunk, heading, count_tokens(chunk)))
    return drafts


def _sections(text: str) -> Iterator[tuple[str, list[str]]]:
    """Yield (heading path, paragraphs) for each section of Markdown-ish text."""
    path: list[tuple[int, str]] = []
    paragraphs: list[str] = []
    current: list[str] = []
    in_fence = False

    def close_paragraph() -> None:
        if block := "\n".join(current).strip():
            paragraphs.append(block)
        current.clear()

    for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n"):
        if _FENCE.match(line):
            in_fence = not in_fence
            current.append(line)
            continue
        heading = None if in_fence else _HEADING.match(line)
        if heading:
            close_paragraph()
            if paragraphs:
                yield _path_text(path), paragraphs
                paragraphs = []
            level = len(heading.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, heading.group(2))]
        elif not line.strip() and not in_fence:
            close_paragraph()
        else:
            current.append(line)
    close_paragraph()
    if paragraphs:
        yield _path_text(path), paragraphs


def _path_text(path: list[tuple[int, str]]) -> str:
    return " > ".join(title for _, title in path)


def _fit(paragraph: str, max_tokens: int, count: Callable[[str], int]) -> list[str]:
    """Split a paragraph into pieces of at most max_tokens: sentences, then words."""
    if count(paragraph) <= max_tokens:
        return [paragraph]
    pieces: list[str] = []
    for sentence in _SENTENCE_END.split(paragraph):
        if count(sentence) <= max_tokens:
            pieces.append(sentence)
            continue
        words: list[str] = []
        for word in sentence.split():
            if words and count(" ".join([*words, word])) > max_tokens:
                pieces.append(" ".join(words))
                words = []
            words.append(word)
        if words:
            pieces.append(" ".join(words))
    return pieces


_Piece = tuple[int, str]  # (paragraph number, text)


def _pack(pieces: list[_Piece], max_tokens: int, overlap: int, count: Callable[[str], int]) -> Iterator[str]:
    """Greedily join pieces into chunks, carrying trailing pieces forward as overlap.

    Sizes are counted on the joined text, not summed per piece: tokenizers
    are not additive (a word split at a piece boundary, rounding).
    """
    window: list[_Piece] = []
    for piece in pieces:
        if window and count(_join([*window, piece])) > max_tokens:
            yield _join(window)
            carried: list[_Piece] = []
            for old in reversed(window):
                candidate = [old, *carried]
                if count(_join(candidate)) > overlap or count(_join([*candidate, piece])) > max_tokens:
                    break
                carried = candidate
            window = carried
        window.append(piece)
    if window:
        yield _join(window)


def _join(window: list[_Piece]) -> str:
    """Sentences of one paragraph rejoin with a space, paragraphs with a blank line."""
    out = ""
    previous = None
    for paragraph, text in window:
        if previous is not None:
            out += " " if paragraph == previous else "\n\n"
        out += text
        previous = paragraph
    return out
