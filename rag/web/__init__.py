"""The transports: thin layers that read an answer's events (rag.answers) and frame them.

- ``api``: ``/rag/stream`` (SSE, text or JSON), ``/rag/query``, Stop, ``/healthz``.
- ``chat``: the chat page (htmx), its answer streams as HTML fragments, feedback.
- ``consumer``: the WebSocket, JSON messages.
- ``sse``: Server-Sent Events framing and the API's encoder, shared by the SSE transports.
"""
