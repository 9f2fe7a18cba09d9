"""rag.services.retrieval.search: the SQL compiled once per shape, permissions applied at run time."""

from __future__ import annotations

import asyncio
import random

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth.models import AnonymousUser, Group, User

from rag.models import Chunk, Collection, Document, Reader
from rag.providers import QueryVector
from rag.services import retrieval, search_sql

pytestmark = pytest.mark.django_db

MODEL = "retrieval-test-8"
DIMENSIONS = 8


def vector(seed: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.uniform(-1, 1) for _ in range(DIMENSIONS)]


def query(seed: int) -> QueryVector:
    return QueryVector.from_floats(vector(seed))


@pytest.fixture
def library() -> dict[str, Collection]:
    """Four collections of five chunks each: public, staff, a group's, and nobody's."""
    made = {
        "public": Collection.objects.create(name="public"),
        "staff": Collection.objects.create(name="staff", visibility=Collection.Visibility.STAFF),
        "group": Collection.objects.create(name="group", visibility=Collection.Visibility.GROUPS),
        "nobody": Collection.objects.create(name="nobody", visibility=Collection.Visibility.GROUPS),
    }
    made["group"].groups.add(Group.objects.create(name="readers"))
    for i, (name, collection) in enumerate(made.items()):
        document = Document.objects.create(collection=collection, title=name, content=name, content_hash=name)
        Chunk.objects.bulk_create(
            Chunk(
                document=document,
                collection=collection,
                position=p,
                text=f"{name} {p}",
                token_count=2,
                embedding=vector(100 * i + p),
                embedding_model=MODEL,
            )
            for p in range(5)
        )
    return made


@pytest.fixture
def statements(monkeypatch) -> list[int]:
    """How many searches each statement that asearch sent to the database held."""
    sizes: list[int] = []
    search_rows = retrieval._search_rows_and_release

    async def counting(queries, *args):
        sizes.append(len(queries))
        return await search_rows(queries, *args)

    monkeypatch.setattr(retrieval, "_search_rows_and_release", counting)
    return sizes


def found(scope, *, k: int = 20, seed: int = 1) -> set[str]:
    """The collections of the chunks a search returns."""
    sources = retrieval.search(query(seed), embedding_model=MODEL, k=k, collections=scope)
    return {s.title for s in sources}


def test_a_reader_finds_what_the_orm_query_finds(library):
    member = User.objects.create_user("member")
    member.groups.add(Group.objects.get(name="readers"))
    for who in (AnonymousUser(), member, User.objects.create_user("staff", is_staff=True)):
        reader = Reader.of(who)
        for seed in (1, 2, 3):
            sources = retrieval.search(query(seed), embedding_model=MODEL, k=6, collections=reader)
            expected = (
                Chunk.objects.in_collections(Collection.objects.readable_by(who))
                .nearest(query(seed).literal, embedding_model=MODEL, dimensions=DIMENSIONS, k=6)
                .values_list("pk", flat=True)
            )
            assert [s.chunk_id for s in sources] == list(expected)
            assert len(sources) == min(6, 5 * len(found(reader)))  # five chunks per collection
            assert [s.n for s in sources] == list(range(1, len(sources) + 1))
            assert all(-1 <= s.score <= 1 for s in sources)


def test_the_sql_is_compiled_once_per_shape(library, monkeypatch):
    search_sql._cached.cache_clear()
    compiled = []
    build = search_sql._build
    monkeypatch.setattr(search_sql, "_build", lambda *args: compiled.append(args[0]) or build(*args))
    anonymous = Reader.of(AnonymousUser())
    for seed in range(5):
        assert found(anonymous, seed=seed) == {"public"}
    assert len(compiled) == 1
    found(anonymous, k=3)
    found(anonymous.only(name="public"))
    found(None)
    assert len(compiled) == 4  # another k, another scope, no scope: each compiled once


def test_group_membership_and_visibility_are_read_at_search_time_not_compile_time(library):
    member = User.objects.create_user("member")
    reader = Reader.of(member)
    assert found(reader) == {"public"}
    member.groups.add(Group.objects.get(name="readers"))
    assert found(reader) == {"public", "group"}  # same compiled SQL, new membership
    member.groups.clear()
    assert found(reader) == {"public"}
    Collection.objects.filter(name="public").update(visibility=Collection.Visibility.STAFF)
    assert found(reader) == set()


def test_narrowing_to_a_collection_never_widens_the_scope(library):
    anonymous = Reader.of(AnonymousUser())
    assert found(anonymous.only(name="public")) == {"public"}
    assert found(anonymous.only(name="staff")) == set()
    assert found(anonymous.only(collection_id=library["nobody"].pk)) == set()
    staff = Reader.of(User.objects.create_user("staff", is_staff=True))
    assert found(staff.only(collection_id=library["staff"].pk)) == {"staff"}
    assert found(None) == {"public", "staff", "group", "nobody"}


def test_ids_and_querysets_are_scopes_too(library):
    assert found([library["staff"].pk, library["nobody"].pk]) == {"staff", "nobody"}
    assert found(Collection.objects.filter(name="group")) == {"group"}


def test_reader_of_keeps_only_what_decides_access():
    assert Reader.of(None) == Reader.of(AnonymousUser()) == Reader()
    inactive = User(pk=7, is_staff=True, is_superuser=True, is_active=False)
    assert Reader.of(inactive) == Reader()
    root = User(pk=8, is_staff=True, is_superuser=True)
    assert Reader.of(root) == Reader(user_id=8, staff=True, superuser=True)
    assert hash(Reader.of(root)) == hash(Reader(user_id=8, staff=True, superuser=True))
    assert Reader.of(root).only(name="") == Reader.of(root)  # "" means no narrowing


def test_one_statement_searches_many_vectors_as_each_would_be_searched_alone(library):
    reader = Reader.of(User.objects.create_user("staff", is_staff=True))
    vectors = [query(seed) for seed in range(8)]
    together = retrieval.search_many(vectors, embedding_model=MODEL, k=4, collections=reader)
    alone = [retrieval.search(v, embedding_model=MODEL, k=4, collections=reader) for v in vectors]
    assert together == alone
    assert len({tuple(s.chunk_id for s in sources) for sources in together}) > 1
    assert retrieval.search_many([], embedding_model=MODEL, k=4) == []
    with pytest.raises(ValueError):
        retrieval.search_many([query(1), QueryVector.from_floats([1.0, 0.0])], embedding_model=MODEL, k=4)


@pytest.mark.django_db(transaction=True)
async def test_concurrent_searches_of_one_shape_share_statements(library, statements):
    reader = Reader.of(AnonymousUser())
    vectors = [query(seed) for seed in range(12)]
    together = await asyncio.gather(
        *(retrieval.asearch(v, embedding_model=MODEL, k=3, collections=reader) for v in vectors)
    )
    assert sum(statements) == len(vectors) and len(statements) < len(vectors)
    for vector, sources in zip(vectors, together, strict=True):
        alone = await sync_to_async(retrieval.search)(vector, embedding_model=MODEL, k=3, collections=reader)
        assert sources == alone and {s.title for s in sources} == {"public"}


@pytest.mark.django_db(transaction=True)
async def test_users_share_statements_yet_each_sees_only_what_they_may_read(library, statements):

    @sync_to_async
    def users() -> tuple[list[User], list[User]]:
        members = [User.objects.create_user(f"member{i}") for i in range(4)]
        for member in members:
            member.groups.add(Group.objects.get(name="readers"))
        return members, [User.objects.create_user(f"outsider{i}") for i in range(4)]

    members, outsiders = await users()
    readers = [Reader.of(user) for pair in zip(members, outsiders, strict=True) for user in pair]
    found = await asyncio.gather(
        *(
            retrieval.asearch(query(i), embedding_model=MODEL, k=20, collections=reader)
            for i, reader in enumerate(readers)
        )
    )
    assert len(statements) < len(readers)  # eight users, fewer statements...
    member_ids = {m.pk for m in members}
    for reader, sources in zip(readers, found, strict=True):  # ...and still each their own permissions
        expected = {"public", "group"} if reader.user_id in member_ids else {"public"}
        assert {s.title for s in sources} == expected
