"""Training state on disk: uploaded files and jobs, so both survive a restart.

Layout under the training folder (default `<store>/.training`, which the store's listing never shows):
`files/<id>.jsonl` + `files/<id>.json` (metadata), `jobs/<id>.json` (the job), `jobs/<id>.events.jsonl`
(its events, appended), `jobs/<id>.ckpt` (prompt and optimizer state, every few steps), `jobs/<id>.cancel`
(a cancel asked for, for whichever server runs the job), `owner.lock` (held by that server: owner_lock.py).
Every JSON write is a temporary file renamed into place: a crash leaves the old record or the new one,
never half of one. Several servers may share the folder: each event is one appended write.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
import time
from pathlib import Path
from typing import Any

import torch

ACTIVE_STATUSES = ("validating_files", "queued", "running")  # a job that has not ended
MAX_ID_CHARS = 64


class TrainingState:
    """Thread-safe: the API (event loop) and the runner (engine thread) both use it."""

    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        (self.root / "jobs").mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    # ---- files ----
    def add_file(self, data: bytes, *, filename: str, purpose: str, tenant: str, counts: dict, ttl_s: float) -> dict:
        """Store an uploaded (and checked) file; its OpenAI file object, plus the owner and what was counted
        when it was checked (`counts`: a job's bounds need them, the file is not read again for them). A failed
        write (disk full) leaves no part of it."""
        now = int(time.time())
        record = {"id": f"file-{secrets.token_hex(12)}", "object": "file", "bytes": len(data), "created_at": now,
                  "expires_at": now + math.ceil(ttl_s), "filename": filename, "purpose": purpose,
                  "status": "processed", "tenant": tenant, **counts}
        data_path = self.root / "files" / f"{record['id']}.jsonl"
        _write_atomic(data_path, data)
        try:
            self._write_json(self.root / "files" / f"{record['id']}.json", record)
        except BaseException:
            data_path.unlink(missing_ok=True)
            raise
        return record

    def file(self, file_id: str) -> dict | None:
        """The file's record; None once it has expired (the watcher deletes it soon after)."""
        record = self._read_json(self.root / "files" / f"{_safe(file_id)}.json")
        return None if record is None or _is_expired(record) else record

    def file_data(self, file_id: str) -> bytes:
        return (self.root / "files" / f"{_safe(file_id)}.jsonl").read_bytes()

    def files(self) -> list[dict]:
        return sorted((r for p in (self.root / "files").glob("*.json")
                       if (r := self._read_json(p)) and not _is_expired(r)),
                      key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete_file(self, file_id: str) -> None:
        for suffix in (".json", ".jsonl"):  # the record first: no record without its data
            (self.root / "files" / f"{_safe(file_id)}{suffix}").unlink(missing_ok=True)

    def delete_expired_files(self) -> int:
        """Delete every expired file; how many went."""
        gone = 0
        for path in (self.root / "files").glob("*.json"):
            record = self._read_json(path)
            if record is not None and _is_expired(record):
                self.delete_file(record["id"])
                gone += 1
        return gone

    # ---- jobs ----
    def save_job(self, job: dict) -> None:
        self._write_json(self.root / "jobs" / f"{job['id']}.json", job)

    def job(self, job_id: str) -> dict | None:
        return self._read_json(self.root / "jobs" / f"{_safe(job_id)}.json")

    def jobs(self) -> list[dict]:
        return sorted((r for p in (self.root / "jobs").glob("*.json") if (r := self._read_json(p))),
                      key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def job_ids(self) -> set[str]:
        """Every job's id, without reading the records."""
        return {p.stem for p in (self.root / "jobs").glob("*.json")}

    def jobs_changed_at(self) -> int:
        """When a job's record, checkpoint or cancel was last written, created or removed (the folder's
        time stamp, in ns): a cheap way to see another server's writes."""
        return (self.root / "jobs").stat().st_mtime_ns

    def add_event(self, job_id: str, message: str, *, level: str = "info", data: dict | None = None) -> dict:
        event = {"id": f"ftevent-{secrets.token_hex(8)}", "object": "fine_tuning.job.event",
                 "created_at": int(time.time()), "level": level, "message": message, "type": "message",
                 "data": data or {}}
        line = (json.dumps(event) + "\n").encode()
        # One O_APPEND write: lines from several servers (shared store) never interleave.
        fd = os.open(self.root / "jobs" / f"{_safe(job_id)}.events.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT,
                     0o644)
        try:
            with self._lock:
                os.write(fd, line)
        finally:
            os.close(fd)
        return event

    def events(self, job_id: str) -> list[dict]:
        """Oldest first."""
        path = self.root / "jobs" / f"{_safe(job_id)}.events.jsonl"
        if not path.exists():
            return []
        complete = path.read_text().split("\n")[:-1]  # a line another server is still writing has no "\n" yet
        return [json.loads(line) for line in complete if line.strip()]

    def request_cancel(self, job_id: str) -> None:
        """Ask whichever server runs the job to cancel it (it may be another one, on a shared store)."""
        _write_atomic(self.root / "jobs" / f"{_safe(job_id)}.cancel", b"")

    def cancel_requests(self) -> set[str]:
        """Jobs a cancel was asked for and not yet carried out."""
        return {p.name.removesuffix(".cancel") for p in (self.root / "jobs").glob("*.cancel")}

    def clear_cancel(self, job_id: str) -> None:
        (self.root / "jobs" / f"{_safe(job_id)}.cancel").unlink(missing_ok=True)

    def save_checkpoint(self, job_id: str, state: dict) -> None:
        tmp = self.root / "jobs" / f".{_safe(job_id)}.ckpt.tmp"
        try:
            torch.save(state, tmp)
            os.replace(tmp, self.root / "jobs" / f"{_safe(job_id)}.ckpt")
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def checkpoint(self, job_id: str) -> dict | None:
        """The job's last checkpoint; weights_only: tensors and plain containers, a planted pickle runs nothing."""
        path = self.root / "jobs" / f"{_safe(job_id)}.ckpt"
        return torch.load(path, weights_only=True) if path.exists() else None

    # ---- helpers ----
    def _write_json(self, path: Path, record: dict) -> None:
        with self._lock:
            _write_atomic(path, json.dumps(record).encode())

    @staticmethod
    def _read_json(path: Path) -> Any:
        try:
            return json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            return None


def new_job(*, model: str, task_id: str, training_file: str, validation_file: str | None, hyperparameters: dict,
            prompt_tuning: dict, seed: int | None, tenant: str) -> dict:
    """A queued job's record: OpenAI's fine_tuning.job fields, then ours (task, prompt tuning, progress)."""
    return {"id": f"ftjob-{secrets.token_hex(12)}", "object": "fine_tuning.job", "model": model,
            "created_at": int(time.time()), "finished_at": None, "fine_tuned_model": None,
            "organization_id": tenant, "result_files": [], "status": "queued", "training_file": training_file,
            "validation_file": validation_file, "hyperparameters": hyperparameters, "trained_tokens": 0,
            "error": None, "seed": seed if seed is not None else secrets.randbits(31), "estimated_finish": None,
            "integrations": [], "task_id": task_id, "prompt_tuning": prompt_tuning,
            "progress": {"step": 0, "total_steps": None}, "train_loss": None, "valid_loss": None, "tenant": tenant}


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # disk full, read-only: no partial file is left behind
        tmp.unlink(missing_ok=True)
        raise


def _is_expired(record: dict) -> bool:
    expires_at = record.get("expires_at")
    return isinstance(expires_at, (int, float)) and expires_at <= time.time()


def _safe(identifier: str) -> str:
    """Ids come from URLs: never a path, and never longer than a file name may be (ours are 29 characters)."""
    if not identifier or len(identifier) > MAX_ID_CHARS or not identifier.isascii() \
            or not identifier.replace("-", "").replace("_", "").isalnum():
        raise KeyError(identifier[:MAX_ID_CHARS])
    return identifier
