"""Who may read what: collections and metadata filters narrow the search, never widen it."""

from __future__ import annotations

import json

import pytest

from tests.web.api.helpers import (
    add_to,
    add_with_metadata,
    cookie,
    error_of,
    live,
    restricted_setup,
    stream,
)

# --- collections ---------------------------------------------------------------------------------


@live
@pytest.mark.parametrize(
    ("who", "sees"),
    [
        (None, {"public"}),
        ("outsider", {"public"}),
        ("member", {"public", "secret"}),
        ("staffer", {"public", "staffonly"}),
    ],
)
async def test_stream_and_query_only_search_collections_the_user_may_read(live_server_url, http, fake_llm, who, sees):
    cookies = await restricted_setup()
    await add_to("public", "The shop opens at nine in the morning.")
    await add_to("secret", "The vault code is 4711 and opens the vault.")
    await add_to("staffonly", "The staff room code is 0815 and opens the staff room.")
    texts = {"public": "shop opens", "secret": "vault code", "staffonly": "staff room code"}
    headers = cookie(cookies.get(who))

    result = await stream(http, live_server_url, {"question": "what code opens it?", "k": "5"}, headers=headers)
    [sources] = [json.loads(e.data) for e in result.events if e.type == "sources"]
    snippets = " ".join(s["snippet"] for s in sources)
    assert {name for name, text in texts.items() if text in snippets} == sees
    # Nothing unreadable reached the model's prompt either.
    prompt = json.dumps(fake_llm.records[-1].request["messages"])
    for name, text in texts.items():
        assert (text in prompt) == (name in sees)

    async with http.post(
        f"{live_server_url}/rag/query", json={"question": "what code opens it?", "k": 5}, headers=headers
    ) as resp:
        body = await resp.json()
    assert resp.status == 200
    snippets = " ".join(s["snippet"] for s in body["sources"])
    assert {name for name, text in texts.items() if text in snippets} == sees


@live
async def test_naming_a_collection_narrows_the_search_but_never_widens_it(live_server_url, http, fake_llm):
    cookies = await restricted_setup()
    await add_to("public", "The shop opens at nine in the morning.")
    await add_to("secret", "The vault code is 4711 and opens the vault.")
    params = {"question": "what opens?", "k": "5", "collection": "secret"}
    # Not readable and not there read the same: a 404 that says what to do, never an empty answer.
    for name in ("secret", "nope"):
        async with http.get(
            f"{live_server_url}/rag/stream", params={**params, "collection": name}, headers=cookie(cookies["outsider"])
        ) as refused:
            error = (await refused.json())["error"]
        assert refused.status == 404 and f"no collection named '{name}' that you may read" in error
    async with http.get(f"{live_server_url}/rag/stream", params={**params, "collection": "a\x00b"}) as nul:
        assert nul.status == 400 and "no NUL" in (await nul.json())["error"]
    async with http.post(
        f"{live_server_url}/rag/query", json={"question": "what opens?", "collection": "nope"}, headers=cookie(None)
    ) as query:
        assert query.status == 404 and "no collection named 'nope'" in (await query.json())["error"]
    member = await stream(http, live_server_url, params, headers=cookie(cookies["member"]))
    [sources] = [json.loads(e.data) for e in member.events if e.type == "sources"]
    assert [s["snippet"] for s in sources] == ["The vault code is 4711 and opens the vault."]


async def test_query_collection_must_be_a_name(client):
    response = await client.post("/rag/query", {"question": "q", "collection": 3}, content_type="application/json")
    assert "'collection' must be the name" in error_of(response, 400)


# --- metadata filters ----------------------------------------------------------------------------


@live
async def test_a_metadata_filter_narrows_stream_and_query(live_server_url, http, fake_llm):
    await add_with_metadata("The 2021 guide says the shop opens at nine.", {"year": 2021, "tags": ["guide"]})
    await add_with_metadata("The 2024 guide says the shop opens at ten.", {"year": 2024, "tags": ["guide", "new"]})
    await add_with_metadata("A note without a year says the shop opens at noon.", {})
    question = "when does the shop open?"

    result = await stream(
        http, live_server_url, {"question": question, "k": "5", "filter": json.dumps({"year": {"gte": 2022}})}
    )
    [sources] = [json.loads(e.data) for e in result.events if e.type == "sources"]
    assert [s["snippet"] for s in sources] == ["The 2024 guide says the shop opens at ten."]

    body = {"question": question, "k": 5, "filter": {"tags": {"in": ["guide"]}}}
    async with http.post(f"{live_server_url}/rag/query", json=body) as resp:
        found = {s["snippet"] for s in (await resp.json())["sources"]}
    assert resp.status == 200
    assert found == {"The 2021 guide says the shop opens at nine.", "The 2024 guide says the shop opens at ten."}


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ('{"year": {"after": 2020}}', "Unknown operator 'after' on 'year'"),
        ("{year: 2020}", "The filter is not valid JSON"),
        ('["year"]', "The filter must be a JSON object"),
    ],
)
async def test_a_bad_filter_is_a_400_that_says_how_to_write_it(client, bad, message):
    response = await client.get("/rag/stream", {"question": "q", "filter": bad})
    assert message in error_of(response, 400)
    response = await client.post(
        "/rag/query",
        {"question": "q", "filter": json.loads(bad) if bad.startswith(("[", '{"')) else bad},
        content_type="application/json",
    )
    assert message in error_of(response, 400)
