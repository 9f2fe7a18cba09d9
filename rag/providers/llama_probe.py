"""A short test generation with the local chat model, run as a child process:

    python -m rag.providers.llama_probe MODEL.gguf [N_THREADS]

It prints one line of JSON on success. On a machine where llama.cpp crashes it dies, and
only it: rag.providers.llama_server.self_test reads the exit and explains it.
"""

from __future__ import annotations

import json
import sys
import time

# About forty tokens: a one-token prompt does not reach the matrix kernels that crash on
# AMX CPUs; a prompt of five tokens already does.
PROMPT = (
    "You answer questions about a small knowledge base of Django and PostgreSQL notes. "
    "In one short sentence, say what pgvector adds to PostgreSQL and why a search engine needs it."
)
MAX_TOKENS = 16


def main(argv: list[str]) -> int:
    from llama_cpp import Llama

    path, n_threads = argv[0], int(argv[1]) if len(argv) > 1 and argv[1] != "0" else None
    llama = Llama(model_path=path, n_ctx=512, n_threads=n_threads, verbose=False)
    started = time.perf_counter()
    reply = llama.create_chat_completion(
        messages=[{"role": "user", "content": PROMPT}], max_tokens=MAX_TOKENS, temperature=0
    )
    seconds = time.perf_counter() - started
    usage = reply["usage"]
    tokens_per_s = usage["completion_tokens"] / seconds if seconds else 0.0
    summary = (
        f"The local chat model generated {usage['completion_tokens']} tokens from a "
        f"{usage['prompt_tokens']}-token prompt in {seconds:.2f} s."
    )
    print(json.dumps({"summary": summary, "tokens_per_s": round(tokens_per_s, 1), **usage}))
    llama.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
