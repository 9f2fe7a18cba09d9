FROM python:3.11-slim

# A compiler for llama-cpp-python, which builds from source.
RUN apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY requirements.txt .
# torch is pinned first so that sentence-transformers does not pull another build.
RUN pip install --no-cache-dir torch==2.13.0 && pip install --no-cache-dir -r requirements.txt
COPY . .
RUN DJANGO_SECRET_KEY=build DATABASE_URL=postgres://build@localhost/build python manage.py collectstatic --noinput

EXPOSE 8000
# A listen backlog above daphne's default 50, so bursts of clients are not dropped (README).
CMD ["daphne", "-e", "tcp:port=8000:interface=0.0.0.0:backlog=1024", "ragsite.asgi:application"]
