"""An answer's life as a durable, ordered log of events in Postgres.

- ``events``: the vocabulary (sources, token, metrics, error, done) and event ids.
- ``access``: who is asking (a user, an anonymous visitor's key), for every transport.
- ``generate``: where an answer is generated, once, in a task of one process; Stop.
- ``oneshot``: /rag/stream's answers, each a conversation of its own.
- ``store``: batched appends, reading what came after a sequence number, and the
  answer row's changes while it lives (claim renewal, interruption).
- ``notify``: one LISTEN connection per process: new events, and Stop from any process.
- ``live``: the generations running in this process, and their events in memory.
- ``follow``: replay, then follow live: the one iterator every transport reads.
"""
