"""The prompt: numbered sources the model is told to cite as [1], [2], the conversation so
far, and the question; fitted to the model's context window when it has a small one."""

from __future__ import annotations

from django.conf import settings

from rag.providers import ChatProvider
from rag.services.retrieval import Source

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources below. "
    "Cite the sources you use inline as [1], [2]. "
    "If the sources do not contain the answer, say that you do not know. Be concise."
)
NO_SOURCES = "(no sources found)"

#: Tokens the chat template adds around each message and source (role markers,
#: separators): an allowance, as the model's server applies the template, not this app.
PER_PIECE_TOKENS = 8
#: Room kept for what the counts do not see: the template's header, rounding.
MARGIN_TOKENS = 64
#: The conversation so far gets at most this share of what the question and system prompt
#: leave; the sources get the rest.
HISTORY_SHARE = 1 / 3


async def build_prompt(
    *, chat: ChatProvider, question: str, sources: list[Source], history: list[dict[str, str]], max_tokens: int
) -> list[dict[str, str]]:
    """The prompt's messages, the sources cut to RAG_CONTEXT_CHARS. For a model with a known
    context window (the local one: 2,048 tokens), only what fits in it with room for
    ``max_tokens`` of reply, counted by the model's own tokenizer: the question always, the
    newest turns of the conversation within HISTORY_SHARE, then the best sources in order
    (the first cut if even it would not fit). A prompt that overflows is refused by the
    model's server."""
    blocks = _blocks(sources, settings.RAG_CONTEXT_CHARS)
    if chat.context_tokens is None:
        return _messages(question=question, blocks=blocks, history=history)
    counts = await chat.count_tokens([SYSTEM_PROMPT, question, *blocks, *(m["content"] for m in history)])
    system, asked, rest = counts[0], counts[1], counts[2:]
    room = chat.context_tokens - max_tokens - MARGIN_TOKENS - system - asked - 2 * PER_PIECE_TOKENS
    kept_sources, kept_history = fit(room=room, sources=rest[: len(blocks)], history=rest[len(blocks) :])
    fitted = blocks[:kept_sources]
    if not fitted and blocks and room > 4 * PER_PIECE_TOKENS:
        # Even the best source is too long: its start is better than nothing.
        share = (room - PER_PIECE_TOKENS) / (rest[0] + 1)
        fitted = [blocks[0][: int(len(blocks[0]) * share * 0.9)]]
    return _messages(question=question, blocks=fitted, history=history[len(history) - kept_history :])


def fit(*, room: int, sources: list[int], history: list[int]) -> tuple[int, int]:
    """How many sources (best first) and messages of the conversation (newest first, whole
    turns of question and answer) fit in ``room`` tokens, given the tokens of each."""
    history_room = max(0, int(room * HISTORY_SHARE))
    used = kept_history = 0
    for end in range(len(history), 1, -2):  # (question, answer) pairs, newest first
        cost = history[end - 2] + history[end - 1] + 2 * PER_PIECE_TOKENS
        if used + cost > history_room:
            break
        used += cost
        kept_history += 2
    room -= used
    kept_sources = 0
    for cost in sources:
        if cost + PER_PIECE_TOKENS > room:
            break
        room -= cost + PER_PIECE_TOKENS
        kept_sources += 1
    return kept_sources, kept_history


def _blocks(sources: list[Source], context_chars: int) -> list[str]:
    blocks: list[str] = []
    budget = context_chars
    for source in sources:
        label = source.title + (f" — {source.heading}" if source.heading else "")
        block = f"[{source.n}] {label}\n{source.text}"
        if len(block) > budget:
            if budget < 200:  # not worth a stub
                break
            block = block[:budget]
        blocks.append(block)
        budget -= len(block)
    return blocks


def _messages(*, question: str, blocks: list[str], history: list[dict[str, str]]) -> list[dict[str, str]]:
    context = "\n\n".join(blocks) if blocks else NO_SOURCES
    return [
        {"role": "system", "content": f"{SYSTEM_PROMPT}\n\nSources:\n\n{context}"},
        *history,
        {"role": "user", "content": question},
    ]
