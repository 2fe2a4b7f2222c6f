"""Who is calling: API keys in metadata, roles, and the open mode of a keyless store.

Every servicer method starts with `caller = await auth.authorize(context, "user")` (or
"labeler", "admin"). Keys travel as `authorization: Bearer <key>` and are looked up by
their sha256 (`common.identity.hash_api_key`). A found key is remembered for
`cache_seconds` (default 2 s; 0 turns the cache off), so a key revoked with
`rlhf keys revoke` stops working within that time: each call would otherwise cost a store
read (a thread-pool hop, about a third of a small call's server time). An unknown key is
never cached, so a new key works on its first call. Roles are ordered user < labeler < admin: a role may do
everything the roles below it may.

Open mode: while the store holds no key at all, the server authenticates nobody. It is
then only allowed on loopback (`server.app` refuses any other bind), every caller acts
with all roles, and may name itself with `x-user-id` metadata (default "anonymous").
The first key created switches the running server to keys for good (keys are revoked,
never deleted, so the store never becomes keyless again; an erasure deletes the erased
user's keys, but never the erasing admin's own).

Every authenticated call is charged one request against its key's rate here (`identify`,
with a `limits.RequestRateLimiter`): the one place every servicer passes through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone

import grpc

from common.identity import Identity, Role, hash_api_key
from common.store import ApiKey, Store, find_key_by_hash, list_keys
from server.limits import RequestRateLimiter

log = logging.getLogger(__name__)

ROLE_RANK: dict[Role, int] = {"user": 0, "labeler": 1, "admin": 2}
AUTHORIZATION = "authorization"
USER_ID_HEADER = "x-user-id"
ANONYMOUS = "anonymous"
MAX_USER_ID_CHARS = 128
MAX_CACHED_KEYS = 10_000


class AuthError(Exception):
    """Authentication or authorization failed; `code` is the gRPC status to answer with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Caller:
    """An authenticated caller. `limit_key` names the budget its concurrency counts
    against: the API key (by id), or the user id in open mode."""

    identity: Identity
    limit_key: str
    open_mode: bool = False

    @property
    def user_id(self) -> str:
        return self.identity.user_id


def bearer_key(metadata: dict[str, str]) -> str | None:
    """The key of an `authorization: Bearer <key>` header; None when the header is absent."""
    value = metadata.get(AUTHORIZATION)
    if value is None:
        return None
    scheme, _, key = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                        "malformed authorization metadata: expected 'Bearer <api key>'")
    return key.strip()


class Authenticator:
    """Turns a call's metadata into a `Caller`, using the store's api_keys table."""

    def __init__(self, store: Store, cache_seconds: float = 2.0, clock: Callable[[], float] = time.monotonic,
                 request_rate: RequestRateLimiter | None = None) -> None:  # fmt: skip
        self._store = store
        self._request_rate = request_rate
        self._keys_exist = False  # sticky: once a key exists, the server never opens again
        self._cache_seconds = cache_seconds
        self._clock = clock
        self._found: dict[str, tuple[float, ApiKey]] = {}  # key hash -> (when read, the stored key)

    async def _lookup(self, key_hash: str) -> ApiKey | None:
        """The stored key with this hash, from the cache while it is fresh."""
        now = self._clock()
        cached = self._found.get(key_hash)
        if cached is not None and now - cached[0] < self._cache_seconds:
            return cached[1]
        stored = await self._store.read(find_key_by_hash(key_hash))
        if stored is not None and self._cache_seconds > 0:
            if len(self._found) >= MAX_CACHED_KEYS:
                self._found.clear()  # bounded: at worst every key is read again once
            self._found[key_hash] = (now, stored)
        return stored

    def forget_user(self, user_id: str) -> None:
        """Drop a user's cached keys (their keys were deleted: an erasure)."""
        self._found = {h: entry for h, entry in self._found.items() if entry[1].user_id != user_id}

    async def open_mode(self) -> bool:
        """True while the store holds no API key (revoked ones count)."""
        if not self._keys_exist:
            self._keys_exist = bool(await self._store.read(list_keys()))
        return not self._keys_exist

    async def authenticate(self, metadata: dict[str, str]) -> Caller:
        """The caller these metadata identify; AuthError(UNAUTHENTICATED) if none."""
        key = bearer_key(metadata)
        if key is None:
            if await self.open_mode():
                return _open_caller(metadata)
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED,
                            "missing API key: send metadata 'authorization: Bearer <key>' "
                            "(create one with `rlhf keys create`)")
        stored = await self._lookup(hash_api_key(key))
        if stored is None:
            if await self.open_mode():  # no keys anywhere: nothing to check a key against
                return _open_caller(metadata)
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        if stored.revoked_at is not None:
            when = datetime.fromtimestamp(stored.revoked_at, timezone.utc).isoformat(timespec="seconds")
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"API key revoked at {when}")
        self._keys_exist = True
        return Caller(stored.identity(), limit_key=f"key:{stored.key_id}")

    async def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller of this call (AuthError(UNAUTHENTICATED) if none), charged one request
        against its key's rate (`limits.RateLimited` when over it)."""
        metadata = {k.lower(): v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
        caller = await self.authenticate(metadata)
        if self._request_rate is not None:
            self._request_rate.admit(caller.limit_key)
        return caller

    async def authorize(self, context: grpc.aio.ServicerContext, minimum: Role) -> Caller:
        """Authenticate the call and require at least role `minimum` (AuthError otherwise)."""
        caller = await self.identify(context)
        require_role(caller, minimum)
        return caller


def require_role(caller: Caller, minimum: Role) -> None:
    """AuthError(PERMISSION_DENIED) unless the caller's role is `minimum` or higher."""
    if ROLE_RANK[caller.identity.role] < ROLE_RANK[minimum]:
        raise AuthError(grpc.StatusCode.PERMISSION_DENIED,
                        f"role {caller.identity.role!r} may not call this method: "
                        f"it needs role {minimum!r} or higher")


def _open_caller(metadata: dict[str, str]) -> Caller:
    user_id = metadata.get(USER_ID_HEADER, "").strip() or ANONYMOUS
    if len(user_id) > MAX_USER_ID_CHARS:
        raise AuthError(grpc.StatusCode.INVALID_ARGUMENT,
                        f"{USER_ID_HEADER} is {len(user_id)} characters; at most {MAX_USER_ID_CHARS}")
    return Caller(Identity(user_id, "admin"), limit_key=f"user:{user_id}", open_mode=True)
