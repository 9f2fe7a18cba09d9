"""The prompt: numbered sources the model is told to cite as [1], [2]."""

from __future__ import annotations

from rag.services.retrieval import Source

SYSTEM_PROMPT = (
    "You answer questions using only the numbered sources below. "
    "Cite the sources you use inline as [1], [2]. "
    "If the sources do not contain the answer, say that you do not know. Be concise."
)


def build_messages(
    *, question: str, sources: list[Source], context_chars: int, history: list[dict[str, str]] | None = None
) -> list[dict[str, str]]:
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
    context = "\n\n".join(blocks) if blocks else "(no sources found)"
    return [
        {"role": "system", "content": f"{SYSTEM_PROMPT}\n\nSources:\n\n{context}"},
        *(history or []),
        {"role": "user", "content": question},
    ]
