"""Model versions and their approval: which bytes of each model the service may serve, who added them and when.

Every model (a checkpoint by id; a LoRA, embedding, ControlNet or upscaler as `KIND:NAME`) has a list of versions,
each keyed by the sha256 of its bytes and never changed once written, except that an operator's approval is stamped on
it once. One version is `current`: the approved one jobs run on. The records live in the shared database
(`settings_kv`, one row per model, `model_version:KEY`), so every API node and worker agrees.

When the files change:
- a name never seen before is held like a change (recorded as a pending version, not served, not listed) unless
  `security.approve_first_seen_models` is on (off by default: a file dropped into the models folder while the service
  runs is served only once an operator approves it). The models darkroom writes itself (the smoke-test model, the
  demo model) are approved by the process that writes them (`approve_own_model`), in the database, so `make run`
  serves them at once; a file that merely looks like darkroom's (its name, its label) is held like any other;
- a file whose bytes differ from `current` is recorded as a *pending* version and not served (a submit naming it is
  refused at once, 409 `model_not_approved`, saying how to approve it) until an operator approves it, unless
  `security.auto_approve_models` is on;
- `disable` stops serving a model whatever its files hold, `enable` serves it again;
- `rollback KEY VERSION` makes an earlier approved version current and puts its bytes back in the models folder from
  the copy kept in `<data_dir>/model-versions/SHA256/` (`security.keep_model_versions`, on by default: each approved
  version costs its size on disk once).

The check runs inside the submit's write transaction (`check_in`): one SELECT for all the request's models, and the
rare first-seen or pending record written atomically with the job, not in a transaction of its own.
Listings (`/v1/models`, A1111's checkpoints and LoRAs, the UI) offer only what a submit would serve (`offered`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from pydantic import BaseModel, Field
from sqlalchemy.dialects import postgresql, sqlite

from darkroom import clock
from darkroom.auth import invalidation
from darkroom.auth.cache import TTLCache
from darkroom.config import SecuritySettings
from darkroom.errors import Conflict, InvalidRequest, NotFound
from darkroom.jobs.db import read_tx, write_tx
from darkroom.models.registry import ModelRegistry
from darkroom.webhooks.tables import settings_kv

log = logging.getLogger(__name__)
T = TypeVar("T")
OWN = "system:made-by-darkroom"  # who approved a model darkroom wrote itself

PREFIX = "model_version:"
# How long a version found servable is remembered. On PostgreSQL an operator's decision reaches every API process at
# once (a `model:` notice on the auth caches' channel); on SQLite, or when a notice is lost, this is how stale a
# disable or approval made by another process may look here.
SERVABLE_SECONDS = 30.0
_SERVABLE: TTLCache[tuple[int, str, str], bool] = TTLCache(SERVABLE_SECONDS)


class _ServableCache:
    """What `auth.invalidation.Listener` drops on a `model:KEY` notice: every remembered decision (they are few)."""

    def forget(self, ident: str) -> None:
        _SERVABLE.forget_all()

    def forget_all(self) -> None:
        _SERVABLE.forget_all()


SERVABLE_CACHE = _ServableCache()
LEGACY_KEY = "approved_models"  # model id → sha256, what earlier releases kept: read once as approved versions


class ModelNotApproved(Conflict):
    code = "model_not_approved"


class Version(BaseModel):
    sha256: str
    added_at: str
    added_by: str
    path: str = Field(description="where the file was when this version was seen")
    approved_at: str | None = None
    approved_by: str | None = None

    @property
    def approved(self) -> bool:
        return self.approved_at is not None


class ModelVersions(BaseModel):
    key: str
    current: str | None = None
    disabled: bool = False
    versions: list[Version] = Field(default_factory=list)

    def version(self, sha256: str) -> Version | None:
        wanted = sha256.lower()
        found = [v for v in self.versions if v.sha256 == wanted or (len(wanted) >= 8 and v.sha256.startswith(wanted))]
        return found[0] if len(found) == 1 else None

    def servable(self, sha256: str) -> bool:
        return not self.disabled and self.current == sha256


def model_key(kind: str, name: str) -> str:
    """Checkpoints keep their plain id (what earlier releases approved); other kinds are named with theirs."""
    return name if kind == "checkpoint" else f"{kind}:{name}"


def _now() -> str:
    return clock.utcnow().isoformat()


def _read(conn: sa.Connection, keys: Iterable[str]) -> tuple[dict[str, ModelVersions], dict[str, str]]:
    """The records of these keys, and (in the same SELECT) what an earlier release approved for them."""
    wanted = [PREFIX + k for k in keys]
    rows = conn.execute(
        sa.select(settings_kv.c.key, settings_kv.c.value).where(settings_kv.c.key.in_([*wanted, LEGACY_KEY]))
    ).all()
    records = {r.key[len(PREFIX) :]: ModelVersions.model_validate(r.value) for r in rows if r.key != LEGACY_KEY}
    legacy = next((r.value for r in rows if r.key == LEGACY_KEY), None) or {}
    return records, {k: v for k, v in legacy.items() if k in keys}


def _write(conn: sa.Connection, record: ModelVersions, exists: bool) -> None:
    value = record.model_dump(mode="json")
    row = {"value": value, "updated_at": clock.utcnow()}
    if exists:
        conn.execute(settings_kv.update().where(settings_kv.c.key == PREFIX + record.key).values(**row))
        return
    # Two first submits for a new model may race on PostgreSQL: the other's record (the same first version) stands.
    insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(settings_kv)
    conn.execute(insert.values(key=PREFIX + record.key, **row).on_conflict_do_nothing(index_elements=["key"]))


class Approvals:
    """The versions of every model, and the decisions on them. `archive_dir`: where approved versions are kept."""

    def __init__(self, engine: sa.Engine, security: SecuritySettings, archive_dir: Path) -> None:
        self.engine = engine
        self.security = security
        self.archive_dir = Path(archive_dir)

    @classmethod
    def for_services(cls, svc: Any) -> Approvals:
        """A deployment's approvals: its database, its security settings, kept copies in its data dir."""
        registry: ModelRegistry = svc.registry
        return cls(svc.store.engine, svc.settings.security, registry.cache_file.parent / "model-versions")

    # --- reads --------------------------------------------------------------------------------------------------

    def all(self) -> dict[str, ModelVersions]:
        with read_tx(self.engine) as conn:
            rows = conn.execute(
                sa.select(settings_kv.c.key, settings_kv.c.value).where(settings_kv.c.key.startswith(PREFIX))
            ).all()
            legacy = conn.execute(sa.select(settings_kv.c.value).where(settings_kv.c.key == LEGACY_KEY)).first()
        found = {r.key[len(PREFIX) :]: ModelVersions.model_validate(r.value) for r in rows}
        for model_id, sha in ((legacy.value if legacy else None) or {}).items():
            found.setdefault(model_id, _legacy(model_id, sha))
        return dict(sorted(found.items()))

    def get(self, key: str) -> ModelVersions:
        record = self.all().get(key)
        if record is None:
            raise NotFound(f"no versions recorded for model {key!r}", field="model")
        return record

    def approved_map(self) -> dict[str, str]:
        """Checkpoint id → the sha256 a worker may serve; a disabled model maps to '' (serve nothing)."""
        return {
            k: ("" if r.disabled else r.current or "")
            for k, r in self.all().items()
            if ":" not in k  # checkpoints: what a worker's claim filter is about
        }

    def offered(self, kind: str, items: Iterable[T], name: Callable[[T], str], sha: Callable[[T], str]) -> list[T]:
        """The items a listing may offer, in their order: those a submit would serve now (the file is the current
        approved version of an enabled model, or would be approved on sight per settings). One SELECT."""
        listed = list(items)
        if not listed:
            return []
        with read_tx(self.engine) as conn:
            records, legacy = _read(conn, [model_key(kind, name(i)) for i in listed])
        return [i for i in listed if self._would_serve(records, legacy, model_key(kind, name(i)), sha(i))]

    def _would_serve(self, records: dict[str, ModelVersions], legacy: dict[str, str], key: str, sha: str) -> bool:
        record = records.get(key) or (_legacy(key, legacy[key]) if key in legacy else None)
        if record is None:
            return self.security.auto_approve_models or self.security.approve_first_seen_models
        if record.disabled:
            return False
        if all(v.sha256 != sha for v in record.versions):
            return self.security.auto_approve_models
        return record.current == sha

    # --- the submit's check ---------------------------------------------------------------------------------------

    def check_in(self, conn: sa.Connection, wanted: list[tuple[str, str, str, str]], refuse: bool = True) -> list[str]:
        """(kind, name, sha256, path) for every model a request uses, checked in the caller's write transaction: a
        first-seen model is recorded (and approved, per settings), a changed file recorded as pending, and (with
        `refuse`) the request refused unless every file is the current approved version of an enabled model.
        Returns the keys whose record was written. A version found servable is remembered (`SERVABLE_SECONDS`), so
        a steady stream of submits reads nothing here; an API node's start (`observe`) remembers what it found."""
        generation = _SERVABLE.generation
        todo = [w for w in wanted if not (refuse and _SERVABLE.get((id(self.engine), model_key(w[0], w[1]), w[2])))]
        if not todo:
            return []
        keys = [model_key(kind, name) for kind, name, _, _ in todo]
        records, legacy = _read(conn, keys)
        written: list[str] = []
        for (kind, name, sha, path), key in zip(todo, keys, strict=True):
            record = records.get(key) or (_legacy(key, legacy[key]) if key in legacy else None)
            if record is None or all(v.sha256 != sha for v in record.versions):
                record = self._observe(record or ModelVersions(key=key), sha, path)
                _write(conn, record, key in records)
                records[key] = record
                written.append(key)
                if record.current == sha:
                    self._archive(sha, Path(path))
            if refuse:
                self._refuse_unless_servable(record, kind, name, sha)
            if record.servable(sha):  # remembered: a submit of it reads nothing here for a while
                _SERVABLE.put((id(self.engine), key, sha), True, generation)
        return written

    def observe(self, models: list[tuple[str, str, str, str]]) -> list[str]:
        """Record what the folder holds now (an API node's start): first-seen names approved per settings."""
        with write_tx(self.engine) as conn:
            return self.check_in(conn, models, refuse=False)

    def _legacy_record(self, conn: sa.Connection, model_id: str) -> ModelVersions | None:
        row = conn.execute(sa.select(settings_kv.c.value).where(settings_kv.c.key == LEGACY_KEY)).first()
        sha = ((row.value if row else None) or {}).get(model_id)
        return _legacy(model_id, sha) if sha else None

    def _observe(self, record: ModelVersions, sha: str, path: str) -> ModelVersions:
        first = not record.versions
        approve = self.security.auto_approve_models or (first and self.security.approve_first_seen_models)
        who = "system:auto-approve" if approve and not first else "system:first-seen" if approve else "system:scan"
        now = _now()
        version = Version(
            sha256=sha,
            added_at=now,
            added_by=who,
            path=path,
            approved_at=now if approve else None,
            approved_by=who if approve else None,
        )
        if not approve:
            log.warning("model %s: new file version %s is held until approved", record.key, sha[:12])
        return record.model_copy(
            update={"versions": [*record.versions, version], "current": sha if approve else record.current}
        )

    @staticmethod
    def _refuse_unless_servable(record: ModelVersions, kind: str, name: str, sha: str) -> None:
        field = {"checkpoint": "model", "lora": "loras", "embedding": "prompt"}.get(kind, kind)
        if record.disabled:
            raise ModelNotApproved(f"{kind} {name!r} is disabled by an operator", field=field)
        if record.current == sha:
            return
        how = f"`darkroom models approve {record.key} {sha[:12]}`"
        if record.current is None:
            raise ModelNotApproved(
                f"{kind} {name!r} version {sha[:12]} is not approved yet; an operator runs {how}", field=field
            )
        raise ModelNotApproved(
            f"{kind} {name!r}: its file changed to version {sha[:12]}, which is not approved (approved: "
            f"{record.current[:12]}); an operator approves it with {how} or restores the approved file",
            field=field,
        )

    # --- operator decisions ---------------------------------------------------------------------------------------

    def approve(self, key: str, sha: str, path: str, who: str) -> ModelVersions:
        """Approve the version `sha` (recording it if it is new) and make it current."""

        def change(record: ModelVersions) -> ModelVersions:
            if record.version(sha) is None:
                record = record.model_copy(
                    update={
                        "versions": [*record.versions, Version(sha256=sha, added_at=_now(), added_by=who, path=path)]
                    }
                )
            version = record.version(sha)
            assert version is not None
            if not version.approved:
                stamped = version.model_copy(update={"approved_at": _now(), "approved_by": who})
                record = record.model_copy(
                    update={"versions": [stamped if v is version else v for v in record.versions]}
                )
            return record.model_copy(update={"current": version.sha256})

        record = self._change(key, change, create=True)
        self._archive(record.current or sha, Path(path))
        return record

    def set_disabled(self, key: str, disabled: bool) -> ModelVersions:
        return self._change(key, lambda r: r.model_copy(update={"disabled": disabled}))

    def rollback(self, key: str, sha: str) -> ModelVersions:
        """Make an earlier approved version current again, its bytes restored from the kept copy."""
        record = self.get(key)
        version = record.version(sha)
        if version is None:
            raise NotFound(f"model {key!r} has no version {sha!r}", field="version")
        if not version.approved:
            raise InvalidRequest(f"version {version.sha256[:12]} of {key!r} was never approved", field="version")
        self._restore(version)
        return self._change(key, lambda r: r.model_copy(update={"current": version.sha256}))

    def _change(self, key: str, change: Any, create: bool = False) -> ModelVersions:
        with write_tx(self.engine) as conn:
            records, legacy_map = _read(conn, [key])
            found = records.get(key)
            legacy = _legacy(key, legacy_map[key]) if found is None and key in legacy_map else None
            if found is None and legacy is None and not create:
                raise NotFound(f"no versions recorded for model {key!r}", field="model")
            record = change(found or legacy or ModelVersions(key=key))
            _write(conn, record, found is not None)
            invalidation.announce(conn, "model", key)  # other API processes forget on commit (PostgreSQL)
        _SERVABLE.forget_all()  # rare operator actions: drop every remembered decision
        return record

    # --- kept copies --------------------------------------------------------------------------------------------

    def _archive(self, sha: str, path: Path) -> None:
        if not self.security.keep_model_versions or not path.is_absolute() or not path.exists():
            return
        dest = self.archive_dir / sha / path.name
        if dest.exists():
            return
        tmp = dest.with_name(f".copying-{dest.name}")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copytree(path, tmp) if path.is_dir() else shutil.copy2(path, tmp)
            tmp.rename(dest)
        except OSError as exc:  # a full disk must not fail the submit that first saw the model
            log.warning("could not keep a copy of %s version %s: %s", path, sha[:12], exc)
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def _restore(self, version: Version) -> None:
        """The kept copy back into place: copied beside the target, then swapped in by rename."""
        target = Path(version.path)
        kept = self.archive_dir / version.sha256 / target.name
        if not kept.exists():
            raise Conflict(
                f"no kept copy of version {version.sha256[:12]} (in {kept.parent}); put its file back at {target} "
                "and approve it",
                field="version",
            )
        tmp = target.with_name(f".restoring-{target.name}")
        old = target.with_name(f".replaced-{target.name}")
        shutil.copytree(kept, tmp) if kept.is_dir() else shutil.copy2(kept, tmp)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)


def _legacy(model_id: str, sha: str) -> ModelVersions:
    version = Version(sha256=sha, added_at="", added_by="legacy", path="", approved_at="", approved_by="legacy")
    return ModelVersions(key=model_id, current=sha, versions=[version])


def for_services(engine: sa.Engine, security: SecuritySettings, registry: ModelRegistry) -> Approvals:
    return Approvals(engine, security, registry.cache_file.parent / "model-versions")


def approved(engine_or_kv: Any) -> dict[str, str]:
    """Checkpoint id → approved sha256 ('' when disabled): what a worker's claim filter serves."""
    engine = getattr(engine_or_kv, "engine", engine_or_kv)
    return Approvals(engine, SecuritySettings(), Path(".")).approved_map()


def on_disk(registry: ModelRegistry, key: str) -> tuple[str, str]:
    """(sha256, path) of the file the models folder holds now for a model key (unknown → 422 naming it)."""
    kind, sep, name = key.partition(":")
    if not sep:
        info = registry.get(key)
        return info.sha256, info.path
    if kind == "lora":
        adapter = registry.lora(name)
    elif kind == "embedding":
        adapter = registry.embedding(name)
    elif kind == "controlnet":
        control = registry.controlnet(name)
        return control.sha256, control.path
    elif kind == "upscaler" and name in registry.upscaler_files():
        path = registry.upscaler_files()[name]
        return registry.file_sha256(path), str(path.resolve())
    else:
        raise InvalidRequest(
            f"unknown model {key!r} (checkpoint id, or lora:, embedding:, upscaler: NAME)", field="model"
        )
    return adapter.sha256, adapter.path


def approve_own_model(svc: Any, path: Path) -> ModelVersions | None:
    """Approve a model darkroom has just written itself (the smoke-test or demo model): the process that wrote it
    records the approval of exactly those bytes in the database, audited. Returns None when the registry does not
    list the path (then it waits for an operator like any other file)."""
    from darkroom.auth.principal import DEFAULT_TENANT, Principal, Role

    registry: ModelRegistry = svc.registry
    wanted = Path(path).resolve()
    info = next((m for m in registry.rescan() if Path(m.path).resolve() == wanted), None)
    if info is None:
        log.warning("model written at %s is not listed by the registry; it waits for an operator's approval", path)
        return None
    record = Approvals.for_services(svc).approve(info.id, info.sha256, info.path, OWN)
    system = Principal(actor=OWN, role=Role.admin, tenant=DEFAULT_TENANT)
    svc.audit.record(system, "model.approve", info.id, {"current": record.current, "made_by": "darkroom"})
    return record


def approve_version(
    approvals: Approvals, registry: ModelRegistry, key: str, version: str | None, who: str
) -> ModelVersions:
    """Approve the file on disk now (`version` absent, or naming it), or an already recorded version by (a prefix
    of) its sha256."""
    sha, path = on_disk(registry, key) if version is None or _is_on_disk(registry, key, version) else ("", "")
    if not sha:
        found = approvals.all().get(key)
        recorded = found.version(version or "") if found else None
        if recorded is None:
            raise NotFound(f"model {key!r} has no version {version!r} on disk or recorded", field="version")
        sha, path = recorded.sha256, recorded.path
    return approvals.approve(key, sha, path, who)


def _is_on_disk(registry: ModelRegistry, key: str, version: str) -> bool:
    try:
        return on_disk(registry, key)[0].startswith(version.lower())
    except InvalidRequest:
        return False
