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
    if k is None or k == "":
        k_value = settings.RAG_DEFAULT_K
    else:
        try:
            k_value = int(k)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            raise BadQuestion(f"'k' must be a whole number from 1 to {settings.RAG_MAX_K}, not {k!r}.") from None
        if isinstance(k, float | bool) or not 1 <= k_value <= settings.RAG_MAX_K:
            raise BadQuestion(f"'k' must be a whole number from 1 to {settings.RAG_MAX_K}, not {k!r}.")
    return QuestionInput(question=question, k=k_value)
