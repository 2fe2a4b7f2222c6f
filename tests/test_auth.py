"""server.auth: key lookups, their short cache, and what a revocation or a new key does."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest

from common.identity import generate_api_key, hash_api_key
from common.store import Store, add_api_key, revoke_key
from server.auth import Authenticator, AuthError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_a_revoked_key_works_at_most_cache_seconds_longer(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        key = generate_api_key()
        stored = store.write_sync(add_api_key("ana", "labeler", hash_api_key(key), labeler_group="A"))
        clock = Clock()
        auth = Authenticator(store, cache_seconds=2.0, clock=clock)

        async def scenario() -> None:
            caller = await auth.authenticate(bearer(key))
            assert caller.user_id == "ana" and caller.identity.role == "labeler"
            store.write_sync(revoke_key(stored.key_id))
            clock.now += 1.9  # still inside the cache window: the lookup is not repeated
            assert (await auth.authenticate(bearer(key))).user_id == "ana"
            clock.now += 0.2  # the entry is stale: read again, and now refused
            with pytest.raises(AuthError) as refused:
                await auth.authenticate(bearer(key))
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in refused.value.message

        asyncio.run(scenario())


def test_unknown_keys_are_not_cached_and_cache_zero_reads_every_call(tmp_path: Path) -> None:
    with Store(tmp_path / "s.sqlite") as store:
        store.write_sync(add_api_key("ops", "admin", hash_api_key(generate_api_key())))
        late = generate_api_key()
        auth = Authenticator(store, cache_seconds=2.0, clock=Clock())
        uncached = Authenticator(store, cache_seconds=0.0, clock=Clock())

        async def scenario() -> None:
            with pytest.raises(AuthError, match="invalid API key"):
                await auth.authenticate(bearer(late))
            stored = store.write_sync(add_api_key("bo", "user", hash_api_key(late)))
            assert (await auth.authenticate(bearer(late))).user_id == "bo"  # a new key works at once
            assert (await uncached.authenticate(bearer(late))).user_id == "bo"
            store.write_sync(revoke_key(stored.key_id))
            with pytest.raises(AuthError, match="revoked"):  # no cache: the very next call sees it
                await uncached.authenticate(bearer(late))

        asyncio.run(scenario())
