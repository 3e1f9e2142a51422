"""The vector library: named vectors with provenance under ``$ACTENG_HOME``.

Layout: ``$ACTENG_HOME/vectors/<sha256>.safetensors`` (content-addressed, so a rename
moves nothing and identical vectors are stored once) and ``$ACTENG_HOME/library.sqlite``,
an index of name, content hash, model identity, method, layers, dataset hash, created,
tags and an optional evaluation card. ``$ACTENG_HOME`` defaults to the platform's user
data folder (``~/.local/share/acteng`` on Linux).

Safety: the file is written atomically before its row is committed, and every change runs
in one SQLite ``IMMEDIATE`` transaction, so two processes adding at once serialise and a
crash leaves at worst an unreferenced file, never a row without its file. An entry whose
file was deleted or changed behind the library's back is reported as broken by name.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from acteng.bundled import bundled_files
from acteng.errors import ConfigError, LibraryError, VectorFileError
from acteng.home import default_home
from acteng.names import NAME_PATTERN, refuse_bundled_name, validate_name
from acteng.vectors import SteeringVector, atomic_write_bytes, check_magnitude

if TYPE_CHECKING:
    from acteng.models import Model

__all__ = [
    "LibraryEntry",
    "LibraryError",
    "VectorLibrary",
    "default_home",
    "load_vector",
    "refuse_bundled_name",
    "validate_name",
]

_SHA = re.compile(r"[0-9a-f]{64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (
    name TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL,
    model TEXT,
    model_hash TEXT,
    hidden_size INTEGER NOT NULL,
    method TEXT,
    layers TEXT NOT NULL,
    dataset_hash TEXT,
    created TEXT,
    added TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now')),
    tags TEXT NOT NULL DEFAULT '[]',
    card TEXT
)
"""


def _read_checked(path: Path, sha: str) -> tuple[SteeringVector | None, str | None]:
    """The vector in an entry's file and None, or None and why the file cannot be trusted."""
    if not path.is_file():
        return None, f"its file {path.name} is missing"
    try:
        vector = SteeringVector.from_bytes(path.read_bytes(), source=path)
    except VectorFileError as exc:
        return None, f"its file {path.name} is unreadable ({exc})"
    if vector.content_hash() != sha:
        return None, f"its file {path.name} was changed since it was added"
    return vector, None


def _index_error(index: Path, exc: sqlite3.DatabaseError) -> LibraryError:
    """Say what went wrong with the index; only real corruption earns the move-aside advice."""
    code = getattr(exc, "sqlite_errorname", "")
    if code in ("SQLITE_BUSY", "SQLITE_LOCKED"):
        return LibraryError(
            f"the library at {index.parent} is busy (another acteng process is writing to it); "
            "retry in a moment"
        )
    if code in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
        return LibraryError(
            f"the library index {index} is unreadable ({exc}); move it aside and re-add the "
            "vectors from their files"
        )
    return LibraryError(f"the library index {index} cannot be used: {exc} ({code or 'error'})")


@dataclass(frozen=True)
class LibraryEntry:
    """One row of the index."""

    name: str
    sha256: str
    model: str | None
    model_hash: str | None
    hidden_size: int
    method: str | None
    layers: list[int]
    dataset_hash: str | None
    created: str | None
    added: str
    tags: list[str]
    card: dict[str, Any] | None
    path: Path
    problem: str | None = None  # why the entry is broken, if it is

    def to_json(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "path"}
        out["path"] = str(self.path)
        return out


class VectorLibrary:
    """Named steering vectors on disk.

    >>> lib = acteng.VectorLibrary()
    >>> lib.add("happy", vector, tags=["sentiment"])
    >>> vector = lib.load("happy", model=model)
    """

    def __init__(
        self, home: str | os.PathLike[str] | None = None, *, timeout: float = 30.0
    ) -> None:
        self.home = Path(home).expanduser() if home is not None else default_home()
        self.timeout = timeout  # seconds to wait for another process's write to finish
        self.files = self.home / "vectors"
        self.index = self.home / "library.sqlite"

    def __repr__(self) -> str:
        return f"VectorLibrary({str(self.home)!r})"

    # --- storage -------------------------------------------------------------------------
    @contextmanager
    def _db(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        try:
            self.files.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # e.g. $ACTENG_HOME names a file
            raise LibraryError(
                f"cannot use {self.home} as the acteng home ({exc.strerror}); point "
                "$ACTENG_HOME (or --home) at a folder"
            ) from exc
        try:
            conn = sqlite3.connect(self.index, timeout=self.timeout, isolation_level=None)
        except sqlite3.Error as exc:
            raise LibraryError(f"cannot open the library index {self.index}: {exc}") from exc
        with closing(conn):
            try:
                conn.execute(_SCHEMA)
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.DatabaseError as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise _index_error(self.index, exc) from exc
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _row_to_entry(self, row: sqlite3.Row | tuple[Any, ...]) -> LibraryEntry:
        return self._read_entry(row)[0]

    def _read_entry(
        self, row: sqlite3.Row | tuple[Any, ...]
    ) -> tuple[LibraryEntry, SteeringVector | None]:
        """The entry of an index row and, when its file is sound, the vector (read once)."""
        (
            name,
            sha,
            model,
            model_hash,
            hidden,
            method,
            layers,
            dataset,
            created,
            added,
            tags,
            card,
        ) = row
        problem = None
        if _SHA.fullmatch(sha) is None:  # never build a path from a hand-edited index value
            problem = f"its recorded hash {sha!r} is not a SHA-256"
            sha = "invalid"
        path = self.files / f"{sha}.safetensors"
        vector = None
        if problem is None:
            vector, problem = _read_checked(path, sha)
        entry = LibraryEntry(
            name=name,
            sha256=sha,
            model=model,
            model_hash=model_hash,
            hidden_size=hidden,
            method=method,
            layers=json.loads(layers),
            dataset_hash=dataset,
            created=created,
            added=added,
            tags=json.loads(tags),
            card=json.loads(card) if card else None,
            path=path,
            problem=problem,
        )
        return entry, vector

    # --- queries ---------------------------------------------------------------------------
    def list(self, *, tag: str | None = None) -> list[LibraryEntry]:
        """All entries (broken ones included, with `problem` set), by name."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM vectors ORDER BY name").fetchall()
        entries = [self._row_to_entry(r) for r in rows]
        return [e for e in entries if tag is None or tag in e.tags]

    def _row(self, name: str) -> tuple[Any, ...]:
        validate_name(name)
        with self._db() as db:
            row = db.execute("SELECT * FROM vectors WHERE name = ?", (name,)).fetchone()
            if row is None:
                names = db.execute("SELECT name FROM vectors ORDER BY name LIMIT 20").fetchall()
        if row is None:
            known = ", ".join(n for (n,) in names) or "none yet"
            raise LibraryError(
                f"no vector named {name!r} in the library at {self.home} (known: {known}); "
                "add one with `acteng vectors add NAME FILE`"
            )
        return tuple(row)

    def get(self, name: str) -> LibraryEntry:
        return self._row_to_entry(self._row(name))

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str) or NAME_PATTERN.fullmatch(name) is None:
            return False
        with self._db() as db:
            return (
                db.execute("SELECT 1 FROM vectors WHERE name = ?", (name,)).fetchone() is not None
            )

    def load(self, name: str, *, model: Model | None = None) -> SteeringVector:
        """The vector stored under `name`, checked against its recorded hash."""
        entry, vector = self._read_entry(self._row(name))
        if vector is None:
            raise LibraryError(
                f"library entry {name!r} is broken: {entry.problem}; remove it with "
                f"`acteng vectors rm {name}` and add it again from the original file"
            )
        if model is not None:
            vector.check_compatible(model)
        return vector

    # --- changes ---------------------------------------------------------------------------
    def add(
        self,
        name: str,
        vector: SteeringVector | str | os.PathLike[str],
        *,
        tags: Sequence[str] = (),
        card: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> LibraryEntry:
        """Store a vector (or a vector file) under `name` (not a bundled name)."""
        validate_name(name)
        refuse_bundled_name(name)
        if not isinstance(vector, SteeringVector):
            vector = SteeringVector.load(vector)
        check_magnitude(vector)
        data = vector.to_bytes()
        stored = SteeringVector.from_bytes(data)  # what a later load will see
        sha = stored.content_hash()
        path = self.files / f"{sha}.safetensors"
        meta = stored.metadata
        model: dict[str, Any] = meta.get("model") or {}
        dataset: dict[str, Any] = meta.get("dataset") or {}
        if not isinstance(model, dict) or not isinstance(dataset, dict):
            model, dataset = {}, {}
        row = (
            name,
            sha,
            model.get("name"),
            model.get("hash"),
            stored.hidden_size,
            meta.get("method"),
            json.dumps(list(stored.layers)),
            dataset.get("sha256"),
            meta.get("created"),
            json.dumps(sorted(set(tags))),
            json.dumps(card) if card is not None else None,
        )
        with self._db(write=True) as db:
            exists = db.execute("SELECT 1 FROM vectors WHERE name = ?", (name,)).fetchone()
            if exists and not overwrite:
                raise LibraryError(
                    f"a vector named {name!r} already exists; choose another name, remove it "
                    "first, or pass overwrite=True (--force)"
                )
            # Under the write lock, so a concurrent clean-up cannot delete the file before
            # the commit; always rewritten, which also repairs a damaged shared file.
            atomic_write_bytes(path, data)
            db.execute("DELETE FROM vectors WHERE name = ?", (name,))
            db.execute(
                "INSERT INTO vectors (name, sha256, model, model_hash, hidden_size, method, "
                "layers, dataset_hash, created, tags, card) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                row,
            )
        if exists:
            self._sweep()  # the replaced vector's file may now be unused
        return self.get(name)

    def _change(self, name: str, sql: str, params: tuple[Any, ...]) -> None:
        """Run one UPDATE/DELETE on `name` under the write lock; it must hit exactly one row."""
        validate_name(name)
        with self._db(write=True) as db:
            if db.execute(sql, params).rowcount != 1:
                raise LibraryError(
                    f"no vector named {name!r} in the library at {self.home}; "
                    "`acteng vectors list` shows what is there"
                )

    def set_card(self, name: str, card: dict[str, Any]) -> LibraryEntry:
        """Attach an evaluation card (written by tune/eval) to an entry."""
        self._change(name, "UPDATE vectors SET card = ? WHERE name = ?", (json.dumps(card), name))
        return self.get(name)

    def rename(self, old: str, new: str) -> LibraryEntry:
        validate_name(old)
        validate_name(new)
        refuse_bundled_name(new)
        if old == new:
            return self.get(old)
        try:
            self._change(old, "UPDATE vectors SET name = ? WHERE name = ?", (new, old))
        except LibraryError as exc:
            if isinstance(exc.__cause__, sqlite3.IntegrityError):
                raise LibraryError(f"cannot rename {old!r}: a vector named {new!r} exists") from exc
            raise
        return self.get(new)

    def remove(self, name: str) -> None:
        """Delete an entry; its file goes too unless another entry shares it.

        The row goes first (committed), then unreferenced files are swept, so a crash in
        between leaves only an orphan file, never a row without its file.
        """
        self._change(name, "DELETE FROM vectors WHERE name = ?", (name,))
        self._sweep()

    def _sweep(self) -> None:
        """Delete files no entry refers to (under the write lock, so no add races it)."""
        with self._db(write=True) as db:
            used = {row[0] for row in db.execute("SELECT sha256 FROM vectors")}
            for path in self.files.glob("*.safetensors"):
                if path.stem not in used:
                    path.unlink(missing_ok=True)


def load_vector(
    text: str | os.PathLike[str], *, model: Model | None = None, what: str = "vector"
) -> SteeringVector:
    """A vector from a file path, else a library name, else a vector bundled with acteng.

    >>> load_vector("happy")              # the library entry
    >>> load_vector("out/v.safetensors")  # a file
    >>> load_vector("harmful_request")    # bundled: bundled names always mean these
    """
    path = Path(text)
    if path.is_file():
        return SteeringVector.load(path, model=model)
    name = os.fspath(text)
    try:
        validate_name(name)
    except ConfigError:
        return SteeringVector.load(path, model=model)  # not a name: report the missing file
    bundled = bundled_files()
    if name in bundled:
        return SteeringVector.load(bundled[name], model=model)
    library = VectorLibrary()
    if name in library:
        return library.load(name, model=model)
    raise VectorFileError(
        f"no {what} named {name!r}: not a file, not in the library at {library.home} and not "
        f"bundled ({', '.join(sorted(bundled))}); give a .safetensors path or a name from "
        "`acteng vectors list`"
    )
