"""manage.py ingest and manage.py ask.

These are sync tests on purpose: the commands run their own event loops (providers.run).
"""

from __future__ import annotations

import io
import re
import sys
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command

from rag import providers
from rag.models import AnswerEvents, Chunk, Document, Message, TermFrequency
from rag.services import term_stats
from tests.factories import add_corpus

pytestmark = pytest.mark.django_db(transaction=True)


class RecordingOutput(io.StringIO):
    """A stdout that remembers each write and where the flushes came."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def write(self, text: str) -> int:
        self.events.append(("write", text))
        return super().write(text)

    def flush(self) -> None:
        self.events.append(("flush", ""))
        super().flush()


def ingest(*args: str) -> str:
    out = io.StringIO()
    call_command("ingest", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "django.md").write_text("# Django\n\nDjango is a Python web framework.\n", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("Bananas are yellow and rich in potassium.\n", encoding="utf-8")
    (tmp_path / "nested" / "deeper").mkdir(parents=True)
    (tmp_path / "nested" / "deeper" / "pgvector.MARKDOWN").write_text(
        "pgvector adds vector search to Postgres.", encoding="utf-8"
    )
    (tmp_path / "script.py").write_text("print('not a document')\n", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return tmp_path


def test_ingest_folder_adds_text_files_recursively(folder):
    output = ingest(str(folder))
    assert "Added 3, unchanged 0, replaced 0, failed 0." in output
    sources = set(Document.objects.values_list("source", flat=True))
    assert sources == {
        str(folder / "django.md"),
        str(folder / "notes.txt"),
        str(folder / "nested" / "deeper" / "pgvector.MARKDOWN"),
    }
    assert Document.objects.get(source=str(folder / "django.md")).title == "Django"
    assert Chunk.objects.filter(document__source=str(folder / "notes.txt"), embedding_model="fake-embed").count() == 1


def test_ingest_leaves_full_text_statistics_of_every_file(folder, settings, monkeypatch):
    # Only the end of the load refreshes them here: not the time, not the growth.
    settings.RAG_TERM_STATS_REFRESH_S = 3600
    monkeypatch.setattr(term_stats, "GROWTH", 1000.0)
    term_stats.refresh()
    ingest(str(folder))
    # The words of the last file stored (sorted: nested/deeper/pgvector.MARKDOWN is first,
    # notes.txt last) are in the statistics the first search will use.
    assert TermFrequency.objects.filter(lexeme="banana").exists()
    assert TermFrequency.objects.filter(lexeme="pgvector").exists()


def test_a_dry_run_takes_no_statistics(folder):
    ingest(str(folder), "--dry-run")
    assert not TermFrequency.objects.exists()


def test_ingest_again_reports_unchanged(folder):
    ingest(str(folder))
    chunks = Chunk.objects.count()
    assert "Added 0, unchanged 3, replaced 0, failed 0." in ingest(str(folder))
    assert (Document.objects.count(), Chunk.objects.count()) == (3, chunks)
    # A new file next to the old ones is the only one added.
    (folder / "new.txt").write_text("Server-Sent Events stream text.", encoding="utf-8")
    assert "Added 1, unchanged 3, replaced 0, failed 0." in ingest(str(folder))


def test_ingest_gives_each_file_its_type_path_and_the_meta_options(folder):
    notes = folder / "notes.txt"
    ingest("--meta", "team=docs", "--meta", "year=2024", "--meta", 'tags=["a", "b"]', str(notes))
    assert Document.objects.get().metadata == {
        "source_type": "txt",
        "path": str(notes),
        "team": "docs",
        "year": 2024,
        "tags": ["a", "b"],
    }
    # Ingested again with other metadata: the text is unchanged, the metadata is replaced.
    assert "unchanged 1" in ingest("--meta", "team=web", str(notes))
    assert Document.objects.get().metadata == {"source_type": "txt", "path": str(notes), "team": "web"}
    with pytest.raises(CommandError, match="--meta takes KEY=VALUE, not 'team'"):
        ingest("--meta", "team", str(notes))


def test_ingest_single_file(folder):
    assert "Added 1, unchanged 0, replaced 0, failed 0." in ingest(str(folder / "notes.txt"))
    assert list(Document.objects.values_list("source", flat=True)) == [str(folder / "notes.txt")]


def test_if_empty_skips_when_documents_exist(folder, fake_llm):
    assert "Added 3" in ingest("--if-empty", str(folder))  # empty: it ingests
    (folder / "new.txt").write_text("Server-Sent Events stream text.", encoding="utf-8")
    requests = len(fake_llm.embedding_requests)
    output = ingest("--if-empty", str(folder))
    assert "nothing to do" in output and "Added" not in output
    assert Document.objects.count() == 3
    assert len(fake_llm.embedding_requests) == requests


def test_ingest_stdin(monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Text piped in on standard input.\n"))
    assert "Added 1, unchanged 0, replaced 0, failed 0." in ingest("-", "--title", "Piped")
    doc = Document.objects.get()
    assert (doc.title, doc.source, doc.content) == ("Piped", "stdin", "Text piped in on standard input.")


def test_nonexistent_path_is_a_command_error_and_adds_nothing(folder):
    missing = folder / "missing"
    with pytest.raises(CommandError, match=re.escape(f"{missing} does not exist")):
        ingest(str(folder), str(missing))
    assert Document.objects.count() == 0


def test_folder_without_text_files_is_a_command_error(tmp_path):
    (tmp_path / "script.py").write_text("x = 1\n", encoding="utf-8")
    with pytest.raises(CommandError, match="No text files found"):
        ingest(str(tmp_path))


def test_non_utf8_text_is_decoded_and_binary_text_fails_with_a_reason(tmp_path):
    # Was a CommandError for the whole run; files in other encodings are now detected.
    text = "Le café crème et la crème brûlée sont délicieux, voilà ce que je pense à Noël."
    (tmp_path / "latin1.txt").write_bytes(text.encode("cp1252"))
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="1 document"):
        call_command("ingest", str(tmp_path), stdout=out, stderr=err)
    assert "Added 1, unchanged 0, replaced 0, failed 1." in out.getvalue()
    assert f"failed: {tmp_path / 'binary.txt'}: " in err.getvalue() and "not text" in err.getvalue()
    assert Document.objects.get().content == text


def test_every_format_globs_collection_and_dry_run(tmp_path):
    from rag.models import Collection
    from tests.files import HTML_PAGE, docx_bytes, pdf_bytes

    (tmp_path / "a.pdf").write_bytes(pdf_bytes("Cherries are red."))
    (tmp_path / "b.docx").write_bytes(docx_bytes([("h1", "Plums"), ("p", "Plums are purple.")]))
    (tmp_path / "c.html").write_bytes(HTML_PAGE)
    (tmp_path / "d.md").write_text("# Pears\n\nPears are sweet.", encoding="utf-8")
    dry = ingest(str(tmp_path / "*.*"), "--collection", "fruit", "--create", "--dry-run")
    assert "Dry run: Added 4, unchanged 0, replaced 0, failed 0." in dry
    assert not Collection.objects.filter(name="fruit").exists() and not Document.objects.exists()

    added = ingest(str(tmp_path / "*.*"), "--collection", "fruit", "--create")
    assert "Added 4, unchanged 0, replaced 0, failed 0." in added
    fruit = Collection.objects.get(name="fruit")
    assert fruit.visibility == Collection.Visibility.STAFF and "staff only" in added
    assert Document.objects.filter(collection=fruit).count() == 4
    assert Chunk.objects.filter(document__source=str(tmp_path / "b.docx"), heading="Plums").exists()
    assert Document.objects.get(source=str(tmp_path / "c.html")).title == "Gardening guide"

    # Idempotent re-run; a changed file replaces its old version; another collection is separate.
    (tmp_path / "d.md").write_text("# Pears\n\nPears are juicy.", encoding="utf-8")
    assert "Dry run: Added 0, unchanged 3, replaced 1, failed 0." in ingest(
        str(tmp_path), "--collection", "fruit", "--dry-run"
    )
    assert "Added 0, unchanged 3, replaced 1, failed 0." in ingest(str(tmp_path), "--collection", "fruit")
    assert Chunk.objects.filter(document__source=str(tmp_path / "d.md")).get().text == "Pears are juicy."
    assert Document.objects.filter(collection=fruit).count() == 4
    assert "Added 4," in ingest(str(tmp_path), "--collection", "other", "--create", "--public")
    assert Collection.objects.get(name="other").visibility == Collection.Visibility.PUBLIC


def test_a_collection_name_with_a_typo_creates_nothing(tmp_path):
    from rag.models import Collection

    Collection.objects.create(name="handbook")
    (tmp_path / "a.md").write_text("# Pears\n\nPears are sweet.", encoding="utf-8")
    with pytest.raises(CommandError, match=r"no collection named “handbok” .*handbook.*--create"):
        ingest(str(tmp_path), "--collection", "handbok")
    with pytest.raises(CommandError, match="--public only applies with --create"):
        ingest(str(tmp_path), "--collection", "handbook", "--public")
    assert not Collection.objects.filter(name="handbok").exists() and not Document.objects.exists()


def test_glob_without_matches_is_a_command_error(tmp_path):
    with pytest.raises(CommandError, match="matches no files"):
        ingest(str(tmp_path / "*.pdf"))


def test_explicit_unsupported_or_bad_files_fail_with_reasons_and_a_nonzero_exit(tmp_path):
    from tests.files import encrypted_pdf_bytes, zip_bomb_docx_bytes

    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "locked.pdf").write_bytes(encrypted_pdf_bytes("x"))
    (tmp_path / "bomb.docx").write_bytes(zip_bomb_docx_bytes())
    (tmp_path / "good.md").write_text("Good text.", encoding="utf-8")
    err = io.StringIO()
    names = ["image.png", "locked.pdf", "bomb.docx", "good.md"]
    with pytest.raises(CommandError, match="3 document"):
        call_command("ingest", *[str(tmp_path / n) for n in names], stdout=io.StringIO(), stderr=err)
    assert "not supported" in err.getvalue() and "password" in err.getvalue() and "zip bomb" in err.getvalue()
    assert list(Document.objects.values_list("content", flat=True)) == ["Good text."]


def test_failed_documents_are_reported_and_the_rest_is_kept(folder, fake_llm):
    (folder / "empty.md").write_text("   \n", encoding="utf-8")
    (folder / "poison.txt").write_text("This one breaks the embedder: fault=embed500", encoding="utf-8")
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError, match="2 document"):
        call_command("ingest", str(folder), stdout=out, stderr=err)
    assert "Added 3, unchanged 0, replaced 0, failed 2." in out.getvalue()
    assert f"failed: {folder / 'empty.md'}" in err.getvalue()
    assert f"failed: {folder / 'poison.txt'}" in err.getvalue() and "embedding server" in err.getvalue()
    assert Document.objects.count() == 3
    assert not Document.objects.filter(source__endswith="poison.txt").exists()


def test_ask_streams_tokens_and_prints_time_to_first_token(fake_llm):
    providers.run(add_corpus())
    fake_llm.tokens = ["pgvector", " adds", " vectors", " [1]"]
    out = RecordingOutput()
    call_command("ask", "What does pgvector", "add to Postgres?", "-k", "2", stdout=out)
    text = out.getvalue()
    assert "pgvector adds vectors [1]" in text
    assert re.search(r"^\[1\] pgvector \(0\.\d\d\)\n\[2\] \w+ \(0\.\d\d\)\n", text)  # sources, with scores
    assert re.search(r"Time to first token: \d+ ms \| Total: \d+ ms", text)
    # Each token is written on its own and flushed at once, not buffered to the end.
    for token in fake_llm.tokens:
        at = out.events.index(("write", token))
        assert out.events[at + 1] == ("flush", "")
    # The joined question went to the model.
    assert fake_llm.records[-1].request["messages"][-1]["content"] == "What does pgvector add to Postgres?"
    assert Message.objects.get(role="assistant").status == Message.Status.COMPLETE


def test_ask_ends_with_the_pace_of_the_tokens_as_saved(fake_llm):
    providers.run(add_corpus())
    fake_llm.tokens = [f" t{i}" for i in range(6)]
    fake_llm.inter_token_ms = 10
    out = io.StringIO()
    call_command("ask", "pgvector?", stdout=out)
    answer = Message.objects.get(role="assistant")
    gaps = f"{answer.gap_p50_ms:.0f}/{answer.gap_p95_ms:.0f}/{answer.gap_max_ms:.0f}"
    closing = out.getvalue().rstrip().splitlines()[-1]
    assert re.fullmatch(r"Time to first token: \d+ ms \| Total: \d+ ms \| .+", closing), closing
    assert closing.endswith(f" | Tokens/s: {answer.tokens_per_s:.1f} | Gap p50/p95/max: {gaps} ms"), closing


def test_ask_without_sources(fake_llm):
    providers.run(add_corpus())
    out = io.StringIO()
    call_command("ask", "pgvector?", "--no-sources", stdout=out)
    assert "Hello world!" in out.getvalue()
    assert not re.search(r"^\[\d+\] ", out.getvalue(), re.MULTILINE)


def test_ask_upstream_failure_is_a_command_error(fake_llm, capsys):
    providers.run(add_corpus())
    fake_llm.fault = "http500"
    out = io.StringIO()
    with pytest.raises(CommandError, match="The answer failed"):
        call_command("ask", "pgvector?", stdout=out)
    assert "HTTP 500" in capsys.readouterr().err
    assert "Time to first token: n/a" in out.getvalue()
    assert "Tokens/s: n/a | Gap p50/p95/max: n/a" in out.getvalue()
    assert Message.objects.get(role="assistant").status == Message.Status.ERROR


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["   "], "Ask a question"),
        (["question", "-k", "0"], "'k' must be"),
        (["question", "--collection", "nowhere"], "no collection named “nowhere” (there are: default)"),
        (["question", "--filter", "{"], "not valid JSON"),
        (["question", "--filter", '{"year": {"before": 2021}}'], "Unknown operator 'before'"),
    ],
)
def test_ask_bad_input_is_a_command_error(args, says, fake_llm):
    providers.run(add_corpus())
    with pytest.raises(CommandError, match=re.escape(says)):
        call_command("ask", *args, stdout=io.StringIO())
    assert fake_llm.records == []  # the LLM was not asked


def test_ask_searches_one_collection_under_a_metadata_filter(fake_llm):
    """As the API's collection and filter do: the sources come only from what they keep."""
    from rag.models import Collection
    from rag.services.documents import DocumentInput, aadd_documents

    providers.run(add_corpus())
    handbook = Collection.objects.create(name="handbook")
    providers.run(
        aadd_documents(
            documents=[
                DocumentInput(text="The office opens at nine.", title="Hours", metadata={"kind": "hours"}),
                DocumentInput(text="The office has a pgvector poster.", title="Posters", metadata={"kind": "art"}),
            ],
            collection=handbook,
        )
    )
    out = io.StringIO()
    call_command("ask", "pgvector office?", "--collection", "handbook", "--filter", '{"kind": "hours"}', stdout=out)
    sources = re.findall(r"^\[\d+\] (.+) \(", out.getvalue(), flags=re.M)
    assert sources == ["Hours"]


def reembed(*args: str) -> str:
    out = io.StringIO()
    call_command("reembed", *args, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def test_reembed_in_the_background_keeps_old_chunks_until_pruned(settings):
    from rag.services.ingestion import embedding_coverage
    from tests.worker import run_worker

    providers.run(add_corpus())
    old = set(Chunk.objects.values_list("pk", flat=True))
    settings.RAG_EMBEDDING_MODEL = "fake-embed-v2"
    assert "Queued 4 document(s) for re-embedding with fake-embed-v2" in reembed()
    assert set(Document.objects.values_list("status", flat=True)) == {"queued"}
    with pytest.raises(CommandError, match="Only 0 of 4"):
        reembed("--prune")
    # Until the worker has run, the old chunks are all there is, and they still answer.
    assert set(Chunk.objects.values_list("pk", flat=True)) == old
    run_worker()
    assert embedding_coverage(documents=Document.objects.all(), embedding_model="fake-embed-v2") == (4, 4)
    assert set(Document.objects.values_list("status", "embedding_model")) == {("ready", "fake-embed-v2")}
    assert Chunk.objects.filter(pk__in=old).count() == 4  # old model's chunks kept
    assert "Deleted 4 chunks" in reembed("--prune")
    assert set(Chunk.objects.values_list("embedding_model", flat=True)) == {"fake-embed-v2"}


def test_reembed_now_in_process_for_one_collection(settings):
    providers.run(add_corpus())
    settings.RAG_EMBEDDING_MODEL = "fake-embed-v3"
    reembed("--now", "--collection", "default")
    assert Chunk.objects.filter(embedding_model="fake-embed-v3").count() == 4
    with pytest.raises(CommandError, match="No collection named 'nope'"):
        reembed("--collection", "nope")


def test_prune_answer_logs_keeps_the_recent_ones_and_refuses_a_negative_age(fake_llm):
    out = io.StringIO()
    call_command("ask", "What does pgvector add?", stdout=io.StringIO())
    answer = Message.objects.get(role=Message.Role.ASSISTANT)
    AnswerEvents.objects.create(message=answer, first_seq=1, last_seq=1, events='[["token", "x"]]')

    call_command("prune_answer_logs", stdout=out)  # RAG_ANSWER_LOG_DAYS: 7
    assert out.getvalue().startswith("Deleted 0 event log run(s)") and AnswerEvents.objects.exists()
    call_command("prune_answer_logs", "--days", "0", stdout=out)
    assert not AnswerEvents.objects.exists()
    with pytest.raises(CommandError, match="0 or more"):
        call_command("prune_answer_logs", "--days", "-1")
