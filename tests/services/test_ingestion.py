"""rag.services.ingestion with the real worker: submit → queue → parse → chunk → embed → ready (or failed)."""

from __future__ import annotations

import pytest

from rag import providers
from rag.models import Chunk, Collection, Document, DocumentFile
from rag.providers import embedding_provider
from rag.providers.base import estimate_tokens
from rag.providers.fake import FakeEmbeddings
from rag.services import ingestion
from rag.services.retrieval import search
from tests.factories import BrokenVectors
from tests.files import HTML_PAGE, docx_bytes, encrypted_pdf_bytes, pdf_bytes, zip_bomb_docx_bytes
from tests.worker import pending_tasks, run_worker

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def kb() -> Collection:
    return Collection.objects.create(name="kb")


def ask(question: str, collection: Collection, k: int = 3) -> list[str]:
    embedder = embedding_provider()
    vector = providers.run(embedder.embed_query(question))
    return [s.text for s in search(vector, embedding_model=embedder.model, k=k, collections=[collection.pk])]


def test_upload_is_queued_then_the_worker_makes_it_ready(kb):
    result = ingestion.submit_file(collection=kb, name="dir/notes.md", data=b"# Notes\n\nBananas are yellow fruit.")
    assert result.outcome == "queued"
    doc = Document.objects.get(pk=result.document_id)
    assert (doc.status, doc.progress, doc.title, doc.source, doc.chunk_count) == ("queued", 0.0, "notes", "notes.md", 0)
    assert bytes(DocumentFile.objects.get(document=doc).data) == b"# Notes\n\nBananas are yellow fruit."
    assert pending_tasks() == 1
    assert not Chunk.objects.exists()  # nothing ingested in the request

    assert run_worker() == 1
    doc.refresh_from_db()
    assert (doc.status, doc.progress, doc.error) == ("ready", 1.0, "")
    assert doc.chunk_count == Chunk.objects.filter(document=doc).count() == 1
    assert doc.embedding_model == "fake-embed"
    assert doc.content == "# Notes\n\nBananas are yellow fruit."
    assert {"parse_ms", "chunk_ms", "embed_ms", "store_ms", "total_ms"} <= set(doc.timings)
    assert doc.started_at <= doc.finished_at
    assert ask("yellow bananas", kb) == ["Bananas are yellow fruit."]
    chunk = Chunk.objects.get(document=doc)
    assert (chunk.heading, chunk.position, chunk.collection_id) == ("Notes", 0, kb.pk)


def test_status_moves_through_each_step(kb, monkeypatch):
    seen: list[str] = []
    mark = ingestion._mark

    async def recording_mark(document, **fields):
        await mark(document, **fields)
        # What another process (the admin) reads at this moment.
        seen.append((await Document.objects.aget(pk=document.pk)).status)

    monkeypatch.setattr(ingestion, "_mark", recording_mark)
    result = ingestion.submit_file(collection=kb, name="a.txt", data=b"Some text about tomatoes.")
    run_worker()
    assert seen[:2] == ["parsing", "chunking"]
    assert set(seen[2:]) == {"embedding"}
    assert Document.objects.get(pk=result.document_id).status == "ready"


def test_every_format_is_ingested(kb, settings):
    settings.RAG_CHUNK_MIN_TOKENS = 0  # each small section its own chunk: the headings are what is checked
    files = {
        "a.txt": b"Plain text about apples.",
        "b.md": b"# Pears\n\nPears are sweet.",
        "c.html": HTML_PAGE,
        "d.pdf": pdf_bytes("Cherries are red."),
        "e.docx": docx_bytes([("h1", "Plums"), ("p", "Plums are purple.")]),
    }
    ids = [ingestion.submit_file(collection=kb, name=n, data=d).document_id for n, d in files.items()]
    run_worker()
    docs = Document.objects.filter(pk__in=ids)
    assert {d.source: d.status for d in docs} == dict.fromkeys(files, "ready")
    assert Chunk.objects.get(document__source="e.docx").heading == "Plums"
    assert Chunk.objects.filter(document__source="c.html", heading="Gardening > Pests").exists()


def test_bad_files_fail_with_a_reason_and_do_not_stop_the_others(kb, settings):
    settings.RAG_MAX_UPLOAD_MB = 1
    bad = {
        "photo.png": b"\x89PNG",
        "empty.txt": b"",
        "huge.txt": b"a " * (600 * 1024),
        "locked.pdf": encrypted_pdf_bytes("secret"),
        "broken.pdf": pdf_bytes("x")[:120],
        "scan.pdf": pdf_bytes(),
        "bomb.docx": zip_bomb_docx_bytes(),
        "binary.txt": bytes(range(256)) * 4,
    }
    results = [ingestion.submit_file(collection=kb, name=n, data=d) for n, d in bad.items()]
    good = ingestion.submit_file(collection=kb, name="good.txt", data=b"Good text survives.")
    # Type, emptiness and size are told at once; the rest needs the worker.
    assert {r.name: r.outcome for r in results if r.outcome == "failed"} == {
        "photo.png": "failed",
        "empty.txt": "failed",
        "huge.txt": "failed",
    }
    assert pending_tasks() == 6  # five bad files to parse, one good
    run_worker()
    reasons = dict(Document.objects.filter(collection=kb).values_list("source", "error"))
    statuses = dict(Document.objects.filter(collection=kb).values_list("source", "status"))
    assert statuses == {**dict.fromkeys(bad, "failed"), "good.txt": "ready"}
    assert "not supported" in reasons["photo.png"]
    assert "empty" in reasons["empty.txt"]
    assert "RAG_MAX_UPLOAD_MB" in reasons["huge.txt"]
    assert "password" in reasons["locked.pdf"]
    assert "not a readable PDF" in reasons["broken.pdf"]
    assert "OCR" in reasons["scan.pdf"]
    assert "zip bomb" in reasons["bomb.docx"]
    assert "not text" in reasons["binary.txt"]
    # No failed file left a chunk behind, and the good one is searchable.
    assert set(Chunk.objects.values_list("document__source", flat=True)) == {"good.txt"}
    assert Document.objects.get(pk=good.document_id).chunk_count == 1


def test_same_content_twice_is_not_ingested_twice(kb):
    first = ingestion.submit_file(collection=kb, name="a.md", data=b"Django is a web framework.")
    again = ingestion.submit_file(collection=kb, name="copy-of-a.md", data=b"Django is a web framework.")
    assert again.outcome == "duplicate" and again.document_id == first.document_id
    assert "already exists" in again.message
    run_worker()
    # The same text arriving as another format is only found after parsing.
    late = ingestion.submit_file(collection=kb, name="a.pdf", data=pdf_bytes("Django is a web framework."))
    assert late.outcome == "queued"
    run_worker()
    doc = Document.objects.get(pk=late.document_id)
    assert doc.status == "failed" and "already in this collection" in doc.error
    assert Document.objects.filter(collection=kb, status="ready").count() == 1
    assert Chunk.objects.count() == 1
    # Dedupe is per collection: another collection takes the same file.
    other = Collection.objects.create(name="other")
    assert ingestion.submit_file(collection=other, name="a.md", data=b"Django is a web framework.").outcome == "queued"


def test_pasted_text_is_ingested_with_its_title(kb):
    result = ingestion.submit_text(collection=kb, title="Shop hours", text="We open at nine.\n")
    run_worker()
    doc = Document.objects.get(pk=result.document_id)
    assert (doc.title, doc.status, doc.content) == ("Shop hours", "ready", "We open at nine.")
    assert ingestion.submit_text(collection=kb, title="Again", text="We open at nine.").outcome == "duplicate"


def test_failing_reingest_keeps_the_old_chunks_answering(kb):
    ingestion.submit_file(collection=kb, name="guide.md", data=b"# Guide\n\nThe office opens at nine.")
    run_worker()
    old = list(Chunk.objects.values_list("pk", "text"))
    # A new version whose embedding fails half-way (the fake server fails on the marker).
    result = ingestion.submit_file(
        collection=kb, name="guide.md", data=b"# Guide\n\nThe office opens at ten.\n\nfault=embed500"
    )
    assert result.outcome == "replacing"
    doc = Document.objects.get(pk=result.document_id)
    assert doc.status == "queued" and doc.chunk_count == 1  # still answering from the old version
    run_worker()
    doc.refresh_from_db()
    assert doc.status == "failed"
    assert "embedding server" in doc.error and "previous version is still searchable" in doc.error
    assert list(Chunk.objects.values_list("pk", "text")) == old
    assert ask("when does the office open", kb) == ["The office opens at nine."]
    assert doc.content == "# Guide\n\nThe office opens at nine."

    # A good new version replaces the old chunks, all at once.
    ingestion.submit_file(collection=kb, name="guide.md", data=b"# Guide\n\nThe office opens at ten.")
    run_worker()
    doc.refresh_from_db()
    assert (doc.status, doc.error) == ("ready", "")
    assert ask("when does the office open", kb) == ["The office opens at ten."]
    assert Document.objects.count() == 1


def test_reingest_and_reembed_are_queued_and_run_by_the_worker(kb, monkeypatch):
    ingestion.submit_file(collection=kb, name="a.md", data=b"Apples are crunchy.")
    run_worker()
    doc = Document.objects.get()
    first_chunk = Chunk.objects.get().pk
    assert ingestion.requeue(documents=Document.objects.all()) == 1
    assert Document.objects.get().status == "queued"
    run_worker()
    assert Document.objects.get().status == "ready"
    assert Chunk.objects.get().pk != first_chunk  # rebuilt

    # Re-embedding with another model adds that model's chunks and keeps the old ones for search meanwhile.
    new_model = FakeEmbeddings(model="newer", dimensions=32)
    monkeypatch.setattr(ingestion, "embedding_provider", lambda: new_model)
    assert ingestion.requeue(documents=Document.objects.all(), reembed=True) == 1
    run_worker()
    doc.refresh_from_db()
    assert (doc.status, doc.embedding_model) == ("ready", "newer-32")
    assert sorted(Chunk.objects.values_list("embedding_model", flat=True)) == ["fake-embed", "newer-32"]


def test_reembedding_after_a_change_of_chunk_settings_rechunks_the_stored_text(kb, settings):
    text = "\n\n".join(f"Paragraph {i} says something about apples and pears." for i in range(30))
    ingestion.submit_file(collection=kb, name="fruit.md", data=text.encode())
    run_worker()
    before = list(Chunk.objects.order_by("position").values_list("text", flat=True))
    settings.RAG_CHUNK_TOKENS, settings.RAG_CHUNK_OVERLAP = 40, 0
    assert ingestion.requeue(documents=Document.objects.all(), reembed=True) == 1
    run_worker()
    after = list(Chunk.objects.order_by("position").values_list("text", flat=True))
    assert len(after) > len(before) and all(estimate_tokens(t) <= 40 for t in after)
    assert "\n\n".join(after) == text  # every paragraph once, in order: nothing lost or doubled
    assert Document.objects.get().chunk_count == len(after)


def test_requeue_skips_documents_still_in_progress(kb):
    ingestion.submit_file(collection=kb, name="a.md", data=b"Apples.")
    assert ingestion.requeue(documents=Document.objects.all()) == 0
    assert pending_tasks() == 1


def test_document_deleted_while_queued_is_skipped(kb):
    result = ingestion.submit_file(collection=kb, name="a.md", data=b"Apples.")
    Document.objects.filter(pk=result.document_id).delete()
    assert run_worker() == 1
    assert not Chunk.objects.exists()


def test_a_run_that_stopped_moving_can_be_queued_again(kb):
    from datetime import timedelta

    from django.utils import timezone

    result = ingestion.submit_file(collection=kb, name="a.md", data=b"Apples.")
    run_worker()
    # A worker killed mid-run leaves the document in a working status.
    Document.objects.filter(pk=result.document_id).update(status="embedding")
    assert ingestion.requeue(documents=Document.objects.all()) == 0  # might still be running
    old = timezone.now() - ingestion.STALE_AFTER - timedelta(seconds=1)
    Document.objects.filter(pk=result.document_id).update(updated_at=old)
    assert ingestion.requeue(documents=Document.objects.all()) == 1
    run_worker()
    assert Document.objects.get(pk=result.document_id).status == "ready"


def test_documents_a_dead_worker_left_half_done_are_queued_again_at_startup(kb):
    from django.core.management import call_command

    done = ingestion.submit_file(collection=kb, name="a.md", data=b"Apples are red.")
    cut = ingestion.submit_file(collection=kb, name="b.md", data=b"Bananas are yellow.")
    run_worker()
    waiting = ingestion.submit_file(collection=kb, name="c.md", data=b"Cherries are dark.")
    # The worker was killed while embedding b.md; c.md's task is still in the queue.
    Document.objects.filter(pk=cut.document_id).update(status="embedding", progress=0.4)

    call_command("requeue_interrupted")  # another worker may still be on it: left alone
    assert pending_tasks() == 1
    call_command("requeue_interrupted", "--older-than", "0")  # the only worker is about to start
    assert pending_tasks() == 2  # b.md again, c.md once (not twice), a.md not at all
    run_worker()
    statuses = dict(Document.objects.values_list("pk", "status"))
    assert statuses == {done.document_id: "ready", cut.document_id: "ready", waiting.document_id: "ready"}


def test_runs_are_counted_until_one_ends_and_asking_again_starts_the_count_again(kb):
    result = ingestion.submit_file(collection=kb, name="a.md", data=b"Apples are red.")
    run_worker()
    assert Document.objects.get(pk=result.document_id).attempts == 0  # it ended: nothing is left unfinished
    # Two runs a killed worker left unfinished, then someone re-ingests it from the admin.
    Document.objects.filter(pk=result.document_id).update(status="failed", attempts=2)
    assert ingestion.requeue(documents=Document.objects.all()) == 1
    assert Document.objects.get(pk=result.document_id).attempts == 0


def test_an_upload_that_fails_on_its_own_content_gives_its_bytes_back_and_one_failing_on_the_provider_keeps_them(
    kb, fake_llm
):
    broken = ingestion.submit_file(collection=kb, name="broken.pdf", data=b"%PDF-1.4 truncated")
    fine = ingestion.submit_file(collection=kb, name="fine.md", data=b"Figs are sweet. fault=embed500")
    assert ingestion.upload_bytes(documents=Document.objects.all()) == (2, 18 + 30)
    run_worker()

    assert Document.objects.get(pk=broken.document_id).status == "failed"
    assert Document.objects.get(pk=fine.document_id).status == "failed"  # the embedding server failed
    assert not DocumentFile.objects.filter(document_id=broken.document_id).exists()
    assert DocumentFile.objects.filter(document_id=fine.document_id).exists()  # re-ingested once it is back
    assert ingestion.upload_bytes(documents=Document.objects.all()) == (1, 30)


# --- re-ingestion: the swap of a document's chunks --------------------------------------------


def ingest_now(document_id: int, embedder: FakeEmbeddings) -> str:
    return providers.run(ingestion.aingest(document_id=document_id, embedder=embedder))


OLD = b"# Apples\n\nApples are crunchy and grow on trees in orchards."
NEW = b"# Apples\n\nApples are sweet.\n\nLAST paragraph of the new version."


def test_a_failure_inside_the_swap_keeps_the_old_chunks_and_text(kb, settings):
    settings.RAG_CHUNK_TOKENS, settings.RAG_CHUNK_OVERLAP = 16, 0
    embedder = FakeEmbeddings(model="swap")
    first = ingestion.submit_file(collection=kb, name="apples.md", data=OLD)
    assert ingest_now(first.document_id, embedder) == "ready"
    old_chunks = sorted(Chunk.objects.filter(document_id=first.document_id).values_list("text", flat=True))

    again = ingestion.submit_file(collection=kb, name="apples.md", data=NEW)
    assert again.outcome == "replacing"
    # Its new chunks fail to store half way: pgvector refuses the last one's vector.
    assert ingest_now(again.document_id, BrokenVectors(model="swap")) == "failed"

    document = Document.objects.get(pk=first.document_id)
    assert document.status == "failed" and "previous version is still searchable" in document.error
    assert document.content.startswith("# Apples\n\nApples are crunchy")  # the old text, not the new one
    assert sorted(Chunk.objects.filter(document_id=document.pk).values_list("text", flat=True)) == old_chunks


def test_a_search_during_the_swap_sees_the_old_chunks_whole(kb, monkeypatch):
    """The old chunks are deleted and the new ones copied in one transaction: until it
    commits, a search finds the old version, never a document with half its chunks."""
    import threading

    from django.db import connection

    from rag.services import documents

    embedder = FakeEmbeddings(model="swap")
    first = ingestion.submit_file(collection=kb, name="apples.md", data=OLD)
    ingest_now(first.document_id, embedder)
    ingestion.submit_file(collection=kb, name="apples.md", data=b"# Apples\n\nApples are sweet and red.")
    inside, go_on = threading.Event(), threading.Event()
    copy = documents._copy_chunks

    def copy_then_wait(document, **kwargs):
        copy(document, **kwargs)  # old chunks deleted, new ones copied: not committed yet
        inside.set()
        assert go_on.wait(10)

    monkeypatch.setattr(documents, "_copy_chunks", copy_then_wait)

    def reingest() -> None:
        try:
            ingest_now(first.document_id, embedder)
        finally:
            connection.close()

    def found() -> list[str]:
        vector = providers.run(embedder.embed_query("apples"))
        return [s.text for s in search(vector, embedding_model=embedder.model, k=5, collections=[kb.pk])]

    swapping = threading.Thread(target=reingest)
    swapping.start()
    try:
        assert inside.wait(10)
        during = found()
    finally:
        go_on.set()
        swapping.join(10)
    after = found()
    assert during and all("crunchy" in text for text in during)
    assert after and all("sweet and red" in text for text in after)


def test_a_document_deleted_mid_run_stays_deleted(kb):
    first = ingestion.submit_file(collection=kb, name="apples.md", data=OLD)

    class DeletesItMidway(FakeEmbeddings):
        async def embed(self, texts: list[str]) -> list[list[float]]:
            await Document.objects.filter(pk=first.document_id).adelete()  # someone deletes it in the admin
            return await super().embed(texts)

    ingest_now(first.document_id, DeletesItMidway(model="swap"))

    assert not Document.objects.filter(pk=first.document_id).exists()
    assert not Chunk.objects.exists()
