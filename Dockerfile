FROM python:3.11-slim

# A compiler for llama-cpp-python, which builds from source.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt requirements.lock ./
COPY scripts/install-llama-cpp scripts/
# torch is pinned first so that sentence-transformers does not pull another build; the rest
# comes at the versions in requirements.lock, the ones the tests passed with;
# llama-cpp-python is built for any x86-64 CPU, not -march=native (see the script).
RUN pip install --no-cache-dir torch==2.13.0 \
    && RAG_WHEEL_CACHE=/tmp/wheels scripts/install-llama-cpp python && rm -rf /tmp/wheels \
    && pip install --no-cache-dir -r requirements.txt -c requirements.lock
COPY . .
RUN DJANGO_SECRET_KEY=build DATABASE_URL=postgres://build@localhost/build python manage.py collectstatic --noinput

# Not root: a flaw in the app or a parser must not own the container.
RUN useradd --create-home --uid 10001 app
USER app

EXPOSE 8000
# A listen backlog above daphne's default 50, so bursts of clients are not dropped (README).
CMD ["daphne", "-e", "tcp:port=8000:interface=0.0.0.0:backlog=1024", "ragsite.asgi:application"]
