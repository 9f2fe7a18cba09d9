"""An answer's life as a durable, ordered log of events in Postgres.

- ``events``: the vocabulary (sources, token, metrics, error, done) and event ids.
- ``store``: batched appends, and reading what came after a sequence number.
- ``notify``: one LISTEN connection per process: new events, and Stop from any process.
- ``live``: the generations running in this process, and their events in memory.
- ``follow``: replay, then follow live: the one iterator the chat transports read.
"""
