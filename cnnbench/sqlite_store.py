"""The SQLite file behind a ``sqlite:///`` tracking URI: its path, the lock that keeps a second
``cnnbench run`` off it, and the write-ahead mode cnnbench writes it in. Nothing here talks to MLflow."""

from __future__ import annotations

import contextlib
import os
import socket
import sqlite3
from pathlib import Path


def sqlite_path(uri: str) -> Path | None:
    """The absolute database file of a ``sqlite:///`` URI (None for other stores and in-memory ones):
    the one parser of SQLite URIs, for the store itself, its lock, the Optuna journal and checkpoints."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix) or ":memory:" in uri:
        return None
    return Path(uri[len(prefix):]).resolve()


def absolute_uri(uri: str) -> str:
    """A relative SQLite path made absolute: MLflow caches stores per URI string, so a relative one would
    keep pointing at the first directory it was opened from."""
    path = sqlite_path(uri)
    return uri if path is None else f"sqlite:///{path}"


_WAL_STORES: set[str] = set()  # SQLite tracking stores this process writes in WAL mode


def _wal_on_connect(dbapi_connection, _record) -> None:
    """SQLAlchemy ``connect`` hook: a connection to one of ``_WAL_STORES`` switches it to write-ahead logging
    with ``synchronous=NORMAL``. In SQLite's default rollback mode each of MLflow's commits (several a run)
    creates, syncs and deletes a journal file: WAL costs 0.71 of that a run (benchmarks/tracking_floor.py).
    A commit in WAL mode is safe when the process dies (the log is on disk before the commit returns);
    only a power cut may lose the last ones, never the database. The mode stays with the file, so
    ``cnnbench ui`` and any later reader open it in WAL too (not for a file on NFS: SQLite's WAL needs
    shared memory on one host)."""
    if not isinstance(dbapi_connection, sqlite3.Connection):
        return
    files = {row[2] for row in dbapi_connection.execute("PRAGMA database_list") if row[1] == "main"}
    if files & _WAL_STORES:
        try:
            if dbapi_connection.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal":
                dbapi_connection.execute("PRAGMA synchronous=NORMAL")  # only with WAL: safe when a process dies
        except sqlite3.OperationalError:  # a read-only or network file: SQLite keeps its rollback journal
            pass


def write_ahead(uri: str) -> None:
    """Open the SQLite store at ``uri`` in WAL mode from now on (see :func:`_wal_on_connect`); others: no-op."""
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if (path := sqlite_path(uri)) is None:
        return
    _WAL_STORES.add(str(path))
    if not event.contains(Engine, "connect", _wal_on_connect):
        event.listen(Engine, "connect", _wal_on_connect)


class StoreBusy(RuntimeError):
    """Another ``cnnbench run`` holds the SQLite store."""


@contextlib.contextmanager
def exclusive_sqlite(uri: str):
    """Hold ``<db>.lock`` beside a SQLite store while a suite runs, so a second ``cnnbench run`` on
    the same store is refused with a clear message rather than racing the first (SQLite allows one
    writer; MLflow and Optuna retry on "database is locked" only so long). Other stores: no-op."""
    import fcntl

    path = sqlite_path(uri)
    if path is None:
        yield
        return
    lock = Path(f"{path}.lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise StoreBusy(
                f"another cnnbench run ({holder}) is writing to {uri}; wait for it to finish, give this run its own "
                f"store (--tracking-uri sqlite:///other.db), or run several workers against PostgreSQL and an MLflow "
                f"server (README: Scale out)") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
