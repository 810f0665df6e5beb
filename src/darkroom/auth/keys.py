"""API keys: `dk_<id>_<secret>`. The secret is shown once and stored only as a SHA-256 hash; the id, which is not
secret, finds the row. Keys are 190 bits of randomness, so a fast hash is enough (no password stretching is needed:
nothing guessable is being protected), and the comparison is constant-time.

Every request authenticates, so keys are cached by id for `cache_seconds` (the hash comparison and the expiry check
still run on every request). A revocation drops the entry at once in this process, and in other processes through
`darkroom_cache` notices on PostgreSQL (`auth.invalidation`), or when the TTL ends on SQLite."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from darkroom import clock
from darkroom.auth import audit, invalidation
from darkroom.auth.cache import TTLCache
from darkroom.auth.principal import DEFAULT_TENANT, Principal, Role
from darkroom.auth.tables import api_keys
from darkroom.auth.tenants import valid_tenant
from darkroom.errors import InvalidRequest, NotFound, Unauthorized
from darkroom.jobs.db import read_tx, write_tx

_TOKEN = re.compile(r"^dk_([a-z0-9]{12})_([A-Za-z0-9_-]{32,64})$")
_ID_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
_TOUCH_EVERY = dt.timedelta(seconds=60)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    role: Role
    tenant: str
    requests_per_minute: int | None
    created_at: dt.datetime
    created_by: str | None
    expires_at: dt.datetime | None
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None

    def active(self, now: dt.datetime) -> bool:
        return self.revoked_at is None and (self.expires_at is None or self.expires_at > now)

    def public(self) -> dict:
        """What listings show: never the hash."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["role"] = self.role.value
        for k in ("created_at", "expires_at", "revoked_at", "last_used_at"):
            out[k] = out[k].isoformat() if out[k] else None
        return out


def new_token() -> tuple[str, str]:
    """(id, token) for a fresh key."""
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(12))
    return key_id, f"dk_{key_id}_{secrets.token_urlsafe(32)}"


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _matches(stored_hash: str, token: str) -> bool:
    return hmac.compare_digest(stored_hash, _hash(token))


def _key(row: sa.Row) -> KeyRecord:
    m = dict(row._mapping)
    m.pop("hash", None)
    m["role"] = Role(m["role"])
    for k in ("created_at", "expires_at", "revoked_at", "last_used_at"):
        m[k] = clock.aware(m[k])
    return KeyRecord(**m)


def _keys_marker(engine: sa.Engine) -> Path | None:
    """`<database>.keys` beside a SQLite file: made before the first key is written, by whichever process writes it.

    A service with no keys on loopback is open, and must ask on every request whether a key exists yet (`darkroom
    keys create` may run in another process at any moment). On SQLite, where every process is on one machine, the
    question costs one stat of this file until a key may exist; then the table is read until it has one, which is
    remembered for good. PostgreSQL nodes share no folder: they read the table."""
    database = engine.url.database if engine.dialect.name == "sqlite" else None
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database).with_name(Path(database).name + ".keys")


class KeyStore:
    def __init__(self, engine: sa.Engine, cache_seconds: float = 5.0) -> None:
        self.engine = engine
        self._keys: TTLCache[str, tuple[str, KeyRecord]] = TTLCache(cache_seconds)  # id -> (hash, record)
        self._ever_had_keys = False  # keys are never deleted: once one exists, that answer never changes
        self._marker = _keys_marker(engine)
        self._marker_trusted = False  # until one read of the table found it empty (a database from before markers)

    def configure_cache(self, seconds: float) -> None:
        self._keys.ttl = seconds
        self.forget_all()

    def forget(self, key_id: str) -> None:
        """A key changed (here, or in another process: `auth.invalidation`)."""
        self._keys.forget(key_id)

    def forget_all(self) -> None:
        self._keys.forget_all()

    def create(
        self,
        who: Principal,
        *,
        name: str,
        role: Role,
        tenant: str,
        expires_in: dt.timedelta | None = None,
        requests_per_minute: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key and its token (the only time the token exists outside the caller's hands)."""
        try:
            valid_tenant(tenant)
        except ValueError as exc:
            raise InvalidRequest(str(exc), field="tenant") from None
        if not name.strip() or len(name) > 200:
            raise InvalidRequest("name: 1 to 200 characters", field="name")
        if expires_in is not None and expires_in.total_seconds() <= 0:
            raise InvalidRequest("expires_in must be positive", field="expires_in")
        key_id, token = new_token()
        expires_at = clock.utcnow() + expires_in if expires_in else None
        extra = {"expires_at": expires_at.isoformat() if expires_at else None}
        record = self._insert(
            who,
            token,
            key_id,
            details=extra,
            name=name.strip(),
            role=Role(role).value,
            tenant=tenant,
            requests_per_minute=requests_per_minute,
            expires_at=expires_at,
        )
        return record, token

    def bootstrap(self, token: str, role: Role = Role.admin) -> KeyRecord | None:
        """Register a key made elsewhere (`darkroom keys token`, kept in a secret store) as a key of the default
        tenant with `role` (admin; `metrics` for a Prometheus scraper), once. Returns it when it was new; None when it
        was already there. A token whose id exists with a different secret is an error, never an overwrite."""
        setting = f"bootstrap_{role.value}_key"
        token = token.strip()
        match = _TOKEN.match(token)
        if not match:
            raise InvalidRequest(f"{setting}: not a darkroom key (dk_<id>_<secret>)", field=setting)
        with read_tx(self.engine) as conn:
            stored = conn.execute(sa.select(api_keys.c.hash).where(api_keys.c.id == match.group(1))).scalar()
        if stored is not None:
            if not _matches(stored, token):
                raise InvalidRequest(f"{setting}: that key id exists with another secret", field=setting)
            return None
        who = Principal(actor="system:bootstrap", role=Role.admin, tenant=DEFAULT_TENANT)
        return self._insert(
            who,
            token,
            match.group(1),
            details={"bootstrap": True},
            name=f"bootstrap {role.value}",
            role=role.value,
            tenant=DEFAULT_TENANT,
        )

    def _insert(self, who: Principal, token: str, key_id: str, details: dict, **values: Any) -> KeyRecord:
        """The key's row and its `key.create` audit record, in one transaction. On SQLite the keys marker is made
        first: a process that sees it reads the table again, so the first key shuts an open service at once."""
        if self._marker is not None:
            self._marker.touch()
        with write_tx(self.engine) as conn:
            conn.execute(
                api_keys.insert().values(
                    id=key_id, hash=_hash(token), created_at=clock.utcnow(), created_by=who.actor, **values
                )
            )
            shown = {k: values.get(k) for k in ("name", "role", "requests_per_minute")}
            audit.record(conn, who, "key.create", key_id, {**shown, **details}, tenant=values["tenant"])
            invalidation.announce(conn, "key", key_id)
        self.forget(key_id)
        return self.require(key_id)

    def get(self, key_id: str) -> KeyRecord | None:
        with read_tx(self.engine) as conn:
            row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
        return _key(row) if row else None

    def require(self, key_id: str) -> KeyRecord:
        key = self.get(key_id)
        if key is None:
            raise NotFound(f"no key {key_id!r}", field="key_id")
        return key

    def list(self, *, tenant: str | None = None, include_revoked: bool = False) -> list[KeyRecord]:
        query = sa.select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id)
        if tenant is not None:
            query = query.where(api_keys.c.tenant == tenant)
        if not include_revoked:
            query = query.where(api_keys.c.revoked_at.is_(None))
        with read_tx(self.engine) as conn:
            return [_key(r) for r in conn.execute(query)]

    def revoke(self, who: Principal, key_id: str) -> KeyRecord:
        now = clock.utcnow()
        with write_tx(self.engine) as conn:
            row = conn.execute(sa.select(api_keys.c.tenant, api_keys.c.revoked_at).where(api_keys.c.id == key_id))
            found = row.first()
            if found is None:
                raise NotFound(f"no key {key_id!r}", field="key_id")
            if found.revoked_at is None:
                conn.execute(api_keys.update().where(api_keys.c.id == key_id).values(revoked_at=now))
            audit.record(
                conn, who, "key.revoke", key_id, {"already": found.revoked_at is not None}, tenant=found.tenant
            )
            invalidation.announce(conn, "key", key_id)
        self.forget(key_id)
        return self.require(key_id)

    def any_keys(self) -> bool:
        """Whether any key was ever made (revoked ones count: once keys are in use, the API stays locked). Read on
        every request without a token. A True is kept for good, since keys are never deleted, so a keyed service
        reads nothing; a False is never cached: the first key made (by `darkroom keys` in another process, say)
        must shut the open door at once, not a TTL later."""
        if self._ever_had_keys:
            return True
        if self._marker_trusted and self._marker is not None and not self._marker.exists():
            return False  # one stat instead of a read transaction on every request of an open local service
        with read_tx(self.engine) as conn:
            self._ever_had_keys = conn.execute(sa.select(api_keys.c.id).limit(1)).first() is not None
        self._marker_trusted = not self._ever_had_keys
        return self._ever_had_keys

    def known_keyless(self) -> bool:
        """True when no key exists and that is known without a database read (the marker's one stat), as
        `any_keys` would answer False. False otherwise, whatever the truth: the caller then asks `any_keys`."""
        return (
            not self._ever_had_keys and self._marker_trusted and self._marker is not None and not self._marker.exists()
        )

    def cached(self, token: str) -> KeyRecord | None:
        """The key behind `token` when the answer needs no database: cached, matching, active, its `last_used_at`
        fresh. None in every other case, the failures included (`authenticate` then decides, and audits them)."""
        token = token.strip()
        match = _TOKEN.match(token)
        if not match or (cached := self._keys.get(match.group(1))) is None:
            return None
        stored_hash, key = cached
        now = clock.utcnow()
        if not _matches(stored_hash, token) or not key.active(now):
            return None
        if key.last_used_at is None or now - key.last_used_at > _TOUCH_EVERY:
            return None
        return key

    def authenticate(self, token: str) -> KeyRecord:
        """The key behind a bearer token, or 401. Unknown, wrong, expired and revoked read the same to the caller."""
        token = token.strip()
        match = _TOKEN.match(token)
        if not match:
            raise Unauthorized("invalid API key")
        key_id = match.group(1)
        generation = self._keys.generation  # before the read: a revocation meanwhile keeps the row out of the cache
        cached = self._keys.get(key_id)
        if cached is None:
            with read_tx(self.engine) as conn:
                row = conn.execute(sa.select(api_keys).where(api_keys.c.id == key_id)).first()
            if row is None:
                raise Unauthorized("invalid API key")
            cached = self._keys.put(key_id, (row.hash, _key(row)), generation)
        stored_hash, key = cached
        if not _matches(stored_hash, token):
            raise Unauthorized("invalid API key")
        now = clock.utcnow()
        if not key.active(now):
            raise Unauthorized("invalid API key (expired or revoked)")
        if key.last_used_at is None or now - key.last_used_at > _TOUCH_EVERY:
            with write_tx(self.engine) as conn:
                conn.execute(api_keys.update().where(api_keys.c.id == key.id).values(last_used_at=now))
            key = replace(key, last_used_at=now)
            self._keys.put(key_id, (stored_hash, key), generation)
        return key
