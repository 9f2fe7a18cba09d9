from __future__ import annotations

from django import template

from rag.models import Feedback, Message
from rag.rendering import render_answer

register = template.Library()


@register.simple_tag
def answer_parts(answer: Message) -> dict:
    """The rendered Markdown of a finished answer, and the feedback already given."""
    return {
        "html": render_answer(answer.text, source_prefix=f"src-{answer.pk}-", source_count=len(answer.sources)),
        "feedback": _feedback_value(answer),
    }


def _feedback_value(answer: Message) -> str:
    # Only what a query already loaded: touching the relation here would be a
    # synchronous query, and templates render on the event loop.
    if not Message.feedback.is_cached(answer):
        return ""
    try:
        return answer.feedback.value
    except Feedback.DoesNotExist:
        return ""
