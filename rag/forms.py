"""Validation of question input, shared by the HTTP views and the WebSocket consumer."""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings


class BadQuestion(ValueError):
    """Input a client must fix; the message says how."""


@dataclass(frozen=True)
class QuestionInput:
    question: str
    k: int


def parse_question(*, question: object, k: object = None) -> QuestionInput:
    if not isinstance(question, str) or not question.strip():
        raise BadQuestion("Ask a question: 'question' must be a non-empty string.")
    question = question.strip()
    if len(question) > settings.RAG_MAX_QUESTION_CHARS:
        raise BadQuestion(
            f"The question is {len(question)} characters long; the limit is {settings.RAG_MAX_QUESTION_CHARS}. "
            "Shorten it."
        )
    if "\x00" in question:
        raise BadQuestion("The question contains a NUL character; remove it.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:
        raise BadQuestion("The question is not valid Unicode text (it holds a lone surrogate); send UTF-8.") from None
    return QuestionInput(question=question, k=_parse_k(k))


def _parse_k(k: object) -> int:
    if k is None or k == "":
        return settings.RAG_DEFAULT_K
    problem = BadQuestion(f"'k' must be a whole number from 1 to {settings.RAG_MAX_K}, not {str(k)[:20]!r}.")
    if isinstance(k, bool | float):
        raise problem
    try:
        value = int(k)  # type: ignore[call-overload]
    except (TypeError, ValueError, OverflowError):
        raise problem from None
    if not 1 <= value <= settings.RAG_MAX_K:
        raise problem
    return value
