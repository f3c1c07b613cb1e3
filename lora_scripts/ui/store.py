"""The job queue and its history in SQLite: one row per job, plus the UI's settings.

Every call opens its own connection (the server's threads and the scheduler share the file; WAL
lets readers work while a write is in progress), so a UI restart reads exactly what was there.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# A job's life: new (its folder being written) -> queued -> running -> (stopping ->) done |
# stopped | failed; stopped and failed train jobs can be queued again (resume).
NEW, QUEUED, RUNNING, STOPPING, DONE, STOPPED, FAILED = "new", "queued", "running", "stopping", "done", "stopped", "failed"
ACTIVE = (RUNNING, STOPPING)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,              -- "train" or "label"
    status TEXT NOT NULL,
    args TEXT NOT NULL,              -- JSON list: the lora-scripts arguments of the next start
    cwd TEXT NOT NULL,               -- relative config paths are relative to this folder
    job_dir TEXT NOT NULL DEFAULT '',-- config.yaml, log.txt, exit_code
    output_dir TEXT,                 -- train jobs: the run's output_dir
    pid INTEGER,                     -- the wrapper process while running
    exit_code INTEGER,
    error TEXT,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    queued REAL NOT NULL,            -- queue order
    started REAL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass
class Job:
    """One row of the jobs table."""

    id: int
    name: str
    kind: str
    status: str
    args: list[str]
    cwd: str
    job_dir: str
    output_dir: str | None
    pid: int | None
    exit_code: int | None
    error: str | None
    stop_requested: bool
    created: float
    queued: float
    started: float | None
    finished: float | None

    @property
    def folder(self) -> Path:
        """The job's own folder under the state dir."""
        return Path(self.job_dir)

    def to_json(self) -> dict[str, Any]:
        """The row as the API shows it."""
        return {k: v for k, v in self.__dict__.items()}


class JobStore:
    """Jobs and settings in `state_dir/ui.sqlite3`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        try:
            with db:  # commit on success, roll back on error
                yield db
        finally:
            db.close()

    def add(self, name: str, kind: str, cwd: str, output_dir: str | None) -> Job:
        """Insert a `new` job (the scheduler ignores it); `update` it to queued, with its folder and
        arguments, once its folder is written."""
        now = time.time()
        with self._db() as db:
            cursor = db.execute(
                "INSERT INTO jobs (name, kind, status, args, cwd, output_dir, created, queued) VALUES (?,?,?,?,?,?,?,?)",
                (name, kind, NEW, "[]", cwd, output_dir, now, now),
            )
            job_id = int(cursor.lastrowid)
        return self.get(job_id)

    def get(self, job_id: int) -> Job | None:
        """The job with this id, or None."""
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return _job(row) if row else None

    def all(self, statuses: tuple[str, ...] | None = None) -> list[Job]:
        """Jobs in queue order (oldest first), optionally only those in `statuses`."""
        query, params = "SELECT * FROM jobs", ()
        if statuses:
            query += f" WHERE status IN ({','.join('?' * len(statuses))})"
            params = statuses
        with self._db() as db:
            rows = db.execute(query + " ORDER BY queued, id", params).fetchall()
        return [_job(row) for row in rows]

    def update(self, job_id: int, **fields: Any) -> None:
        """Set columns of one job (`args` may be given as a list)."""
        if "args" in fields:
            fields["args"] = json.dumps(fields["args"])
        columns = ", ".join(f"{name} = ?" for name in fields)
        with self._db() as db:
            db.execute(f"UPDATE jobs SET {columns} WHERE id = ?", (*fields.values(), job_id))

    def delete(self, job_id: int) -> None:
        """Forget a job."""
        with self._db() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def setting(self, key: str, default: str) -> str:
        """A stored setting, or `default`."""
        with self._db() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return row["value"] if row else default

    def set_setting(self, key: str, value: str) -> None:
        """Store a setting."""
        with self._db() as db:
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value", (key, value))


def _job(row: sqlite3.Row) -> Job:
    data = dict(row)
    data["args"] = json.loads(data["args"])
    data["stop_requested"] = bool(data["stop_requested"])
    return Job(**data)
