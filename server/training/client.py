"""`promptserve train`: train a task on a running server through its fine-tuning API (HTTP only).

It uploads the file, starts the job, shows a progress bar with the latest losses, and exits once the task
is served (0), or the job failed or was cancelled (1). Ctrl-C cancels the job.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

POLL_S = 0.5


def add_subparser(subparsers) -> None:
    """The `train` subcommand."""
    p = subparsers.add_parser("train", help="train a task (a soft prompt) on a running server",
                              description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="JSONL: {\"prompt\", \"completion\"} per line")
    p.add_argument("--task", required=True, help="the task to create, or replace with a new version")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    p.add_argument("--api-key", default=None, help="an admin key whose patterns cover the task")
    p.add_argument("--validation", type=Path, default=None, help="a validation JSONL file")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--learning-rate", type=float, default=None)
    p.add_argument("--virtual-tokens", type=int, default=20)
    p.add_argument("--init", choices=("random", "text", "sample_vocab"), default="random")
    p.add_argument("--init-text", default=None)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Upload, start, follow; the exit status says how the job ended."""
    console = Console(stderr=True)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=args.url, headers=headers, timeout=120) as c:
        try:
            job = _start(c, args)
        except httpx.HTTPStatusError as exc:
            console.print(f"[red]refused ({exc.response.status_code}):[/red] {_error(exc.response)}")
            return 1
        console.print(f"job {job['id']}: training task {args.task!r}")
        try:
            job = _follow(c, job)
        except KeyboardInterrupt:
            c.post(f"/v1/fine_tuning/jobs/{job['id']}/cancel")
            console.print("cancelled")
            return 1
    if job["status"] != "succeeded":
        console.print(f"[red]job {job['status']}[/red]: {(job.get('error') or {}).get('message', '')}")
        return 1
    console.print(f"task {job['fine_tuned_model']!r} is served (training loss {job['train_loss']:.4f})")
    return 0


def _start(c: httpx.Client, args: argparse.Namespace) -> dict:
    def upload(path: Path) -> str:
        r = c.post("/v1/files", data={"purpose": "fine-tune"}, files={"file": (path.name, path.read_bytes())})
        r.raise_for_status()
        return r.json()["id"]

    models = c.get("/v1/models")
    models.raise_for_status()
    hyper = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                               ("learning_rate", args.learning_rate)) if v is not None}
    body = {"training_file": upload(args.data), "model": models.json()["data"][0]["id"], "task_id": args.task,
            "hyperparameters": hyper, "seed": args.seed,
            "prompt_tuning": {"num_virtual_tokens": args.virtual_tokens, "init": args.init,
                              "init_text": args.init_text}}
    if args.validation is not None:
        body["validation_file"] = upload(args.validation)
    r = c.post("/v1/fine_tuning/jobs", json=body)
    r.raise_for_status()
    return r.json()


def _follow(c: httpx.Client, job: dict) -> dict:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[losses]}"))
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        bar = progress.add_task("training", total=None, losses="")
        while job["status"] in ("validating_files", "queued", "running"):
            time.sleep(POLL_S)
            r = c.get(f"/v1/fine_tuning/jobs/{job['id']}")
            r.raise_for_status()
            job = r.json()
            losses = " ".join(f"{name} {job[key]:.4f}" for name, key in (("loss", "train_loss"),
                                                                          ("valid", "valid_loss"))
                              if job.get(key) is not None)
            progress.update(bar, completed=job["progress"]["step"], total=job["progress"]["total_steps"],
                            description=job["status"], losses=losses)
    return job


def _error(response: httpx.Response) -> str:
    try:
        return response.json().get("error", response.text)
    except ValueError:
        return response.text
