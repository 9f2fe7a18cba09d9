"""Structure-aware chunking: sections by heading, then paragraphs, then sentences.

A chunk has one heading path to show as its context. Sections shorter than
``min_tokens`` are joined with their neighbours (the headings below the shared
path stay in the text), so that a man page's NAME or a one-line entry does not
become a chunk of its own; otherwise chunks never straddle a heading. A
paragraph too long for one chunk is split at sentence ends, and a sentence too
long at word boundaries. Consecutive chunks of a section share up to
``overlap`` tokens of whole sentences.
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

    def embedding_text(self, title: str = "") -> str:
        """What is embedded: the document's title and the heading path, then the text.
        They often carry the topic a paragraph leaves implicit ("Installation > Windows")."""
        # A document whose first heading is its title: the title once ("Guide > Part").
        repeated = self.heading == title or self.heading.startswith(f"{title} > ")
        context = " > ".join(part for part in (title, self.heading) if part and not (part == title and repeated))
        return f"{context}\n\n{self.text}" if context else self.text


def chunk_text(
    text: str, *, max_tokens: int, overlap: int, count_tokens: Callable[[str], int], min_tokens: int = 0
) -> list[ChunkDraft]:
    # Packing counts the same joined text more than once (a window, then the chunk it
    # becomes); with a real tokenizer that was a third of the chunking time.
    count_tokens = functools.lru_cache(maxsize=256)(count_tokens)
    drafts: list[ChunkDraft] = []
    for path, paragraphs in _merge_small(list(_sections(text)), min_tokens, max_tokens, count_tokens):
        heading = " > ".join(path)
        pieces = [
            (n, piece) for n, paragraph in enumerate(paragraphs) for piece in _fit(paragraph, max_tokens, count_tokens)
        ]
        for chunk in _pack(pieces, max_tokens, overlap, count_tokens):
            drafts.append(ChunkDraft(len(drafts), chunk, heading, count_tokens(chunk)))
    return drafts


_Section = tuple[list[str], list[str]]  # (heading path, paragraphs)


def _sections(text: str) -> Iterator[_Section]:
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
                yield [title for _, title in path], paragraphs
                paragraphs = []
            level = len(heading.group(1))
            path = [(lvl, title) for lvl, title in path if lvl < level] + [(level, heading.group(2))]
        elif not line.strip() and not in_fence:
            close_paragraph()
        else:
            current.append(line)
    close_paragraph()
    if paragraphs:
        yield [title for _, title in path], paragraphs


def _merge_small(
    sections: list[_Section], min_tokens: int, max_tokens: int, count: Callable[[str], int]
) -> list[_Section]:
    """Join each section shorter than ``min_tokens`` with the next one, while the two fit
    in one chunk. The joined section keeps the heading path they share; the headings below
    it become paragraphs of their own, so the text still says which part is which."""
    merged: list[_Section] = []
    for path, paragraphs in sections:
        if merged:
            last_path, last_paragraphs = merged[-1]
            small = min(count("\n\n".join(last_paragraphs)), count("\n\n".join(paragraphs))) < min_tokens
            shared = _shared_prefix(last_path, path)
            joined = _under(last_path, shared) + last_paragraphs + _under(path, shared) + paragraphs
            if small and count("\n\n".join(joined)) <= max_tokens:
                merged[-1] = (shared, joined)
                continue
        merged.append((path, paragraphs))
    return merged


def _shared_prefix(a: list[str], b: list[str]) -> list[str]:
    shared: list[str] = []
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        shared.append(x)
    return shared


def _under(path: list[str], shared: list[str]) -> list[str]:
    """The part of a heading path below ``shared``, as a paragraph (none if nothing is)."""
    rest = " > ".join(path[len(shared) :])
    return [rest] if rest else []


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
