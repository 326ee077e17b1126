"""An API key's name is what `orchestra keys revoke NAME` and the dashboard show and take: a
line of text a person types. A name with a newline or a control character broke `keys list`'s
table, a 5,000-character one widened every row, and a name equal to another key's id made
`keys revoke ID` revoke both keys while saying it revoked one."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestra.db import Database
from orchestra.db.keys import KeyStore
from orchestra.db.tables import api_keys
from orchestra.errors import InvalidRequest, NotFoundError
from tests.integration.test_cli_keys import keys_cli


@pytest.fixture
def store(db: Database) -> KeyStore:
    return KeyStore(db)


@pytest.mark.parametrize(
    ("name", "said"),
    [
        ("a\nb", "must be one line of printable text"),
        ("tab\there", "must be one line of printable text"),
        ("abc\u202edcba", "must be one line of printable text"),  # shown as another name
        ("\udcff", "must be one line of printable text"),  # a byte the CLI could not decode
        ("x" * 101, "must be at most 100 characters, not 101"),
        (" ci", "must not begin or end with a space"),
        ("ci ", "must not begin or end with a space"),
    ],
)
async def test_a_key_name_is_one_short_line(store: KeyStore, name: str, said: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        await store.create(name, "read")
    assert [(p.field, p.message) for p in refused.value.fields] == [("name", said)]
    assert await store.all() == []


async def test_names_people_use_are_kept(store: KeyStore) -> None:
    for name in ("CI pipeline", "alice@example.com", "café – prod", "x" * 100, "dev 👩\u200d💻"):
        key, _ = await store.create(name, "read")
        assert key.name == name


async def test_a_name_that_is_another_keys_id_is_refused(store: KeyStore) -> None:
    first, _ = await store.create("sub", "submit")
    with pytest.raises(InvalidRequest) as refused:
        await store.create(first.id, "read")
    assert [(p.field, p.message) for p in refused.value.fields] == [
        ("name", f"is the id of another key ({first.id}, named 'sub')")
    ]


async def test_revoking_an_id_that_is_also_a_name_revokes_that_key_alone(
    store: KeyStore,
) -> None:
    """A key named like another's id (made before names were checked, or an id drawn later
    that equals a name): the id is the key's own, and wins."""
    first, _ = await store.create("sub", "submit")
    second, _ = await store.create("other", "read")
    await store.db.transaction(
        lambda c: c.execute(
            api_keys.update().where(api_keys.c.id == second.id).values(name=first.id)
        )
    )
    revoked = await store.revoke(first.id)
    assert (revoked.id, revoked.name) == (first.id, "sub")
    active = {k.id for k in await store.all() if k.revoked_at is None}
    assert active == {second.id}
    # Sent again (a script retrying), it names the revoked key still, not the other one.
    with pytest.raises(NotFoundError):
        await store.revoke(first.id)
    assert {k.id for k in await store.all() if k.revoked_at is None} == {second.id}
    assert (await store.revoke(second.id)).id == second.id  # by its own id


async def test_the_cli_says_why_a_name_is_refused(tmp_path: Path, db_url: str) -> None:
    if not db_url.startswith("sqlite"):
        pytest.skip("the CLI's own database here is a SQLite file")
    env = {"ORCHESTRA_DATABASE__URL": db_url}  # migrated already
    code, out, err = await keys_cli("create", "--name", "a\nb", cwd=tmp_path, env=env)
    assert (code, out) == (1, ""), err
    assert "name: must be one line of printable text" in err, err
