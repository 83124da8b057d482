"""Reproduce the shipped demo tasks: write their data, train each with `promptserve train` on a server
running the default model, and copy the trained PEFT folders into server/data/demo_tasks/.

    python demo_tasks/train_demo_tasks.py                 # starts its own server on a free port
    python demo_tasks/train_demo_tasks.py --url URL --store DIR   # or uses a running one and its store

About 9 minutes on 2 CPU cores. Each task: 20 virtual tokens, a fixed seed; the prompt tensors come out bit
for bit as shipped (only the store's time stamp in the files' headers differs).
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere: the data modules are in this package
from demo_tasks import json_data, sentiment_data  # noqa: E402

OUT = REPO / "server" / "data" / "demo_tasks"
JSON_INSTRUCTION = "Answer only with a JSON object of the name, age and city of the person in this sentence:"  # 20 tokens
# task -> (training examples, hyperparameters); the counts keep each task to a few minutes on 2 cores.
TASKS = {
    "demo-sentiment": (sentiment_data.training_examples(320), dict(epochs=3, batch_size=8, learning_rate=3e-2)),
    # The instruction as the prompt's first value (TEXT init): the learnt prompt then generalises to sentences
    # unlike the training ones (from RANDOM init, with 10 templates, it learnt them: 60 % on the held-back ones).
    "demo-json": (json_data.training_examples(480), dict(epochs=3, batch_size=8, learning_rate=3e-2, init="text",
                                                         init_text=JSON_INSTRUCTION)),
}
HELD_BACK = {"demo-sentiment": sentiment_data.held_back_examples(), "demo-json": json_data.held_back_examples()}


def write_data(folder: Path) -> dict[str, Path]:
    """Each task's training file, and its held-back file (the tests score on it), as JSONL."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, (examples, _) in TASKS.items():
        paths[task] = folder / f"{task}.train.jsonl"
        paths[task].write_text("".join(json.dumps(e) + "\n" for e in examples))
        (folder / f"{task}.heldout.jsonl").write_text("".join(json.dumps(e) + "\n" for e in HELD_BACK[task]))
    return paths


def train(task: str, data: Path, url: str) -> float:
    """`promptserve train` for one task; seconds it took."""
    hyper = TASKS[task][1]
    cmd = [sys.executable, "-m", "server.cli", "train", "--url", url, "--task", task, "--data", str(data),
           "--virtual-tokens", "20", "--seed", "0", "--epochs", str(hyper["epochs"]),
           "--batch-size", str(hyper["batch_size"]), "--learning-rate", str(hyper["learning_rate"]),
           "--init", hyper.get("init", "random")]
    if "init_text" in hyper:
        cmd += ["--init-text", hyper["init_text"]]
    start = time.monotonic()
    subprocess.run(cmd, check=True, cwd=REPO)
    return time.monotonic() - start


def start_server(store: Path) -> tuple[subprocess.Popen, str]:
    """`promptserve serve` on the default model, its own store, a free port; returns once /ready."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "server.cli", "serve", "--store", str(store), "--port", str(port),
           "--no-demo-tasks", "--kv-cache-memory", str(256 << 20), "--no-compile", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)  # stdout: the access log
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"the server stopped (exit {proc.returncode})")
        try:
            if httpx.get(url + "/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(1)
    proc.terminate()
    raise SystemExit("the server was not ready within 10 minutes")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server on the default model (else one is started)")
    parser.add_argument("--store", type=Path, help="that server's --store (where trained tasks are copied from)")
    parser.add_argument("--tasks", nargs="*", default=list(TASKS), choices=list(TASKS))
    args = parser.parse_args()
    if bool(args.url) != bool(args.store):
        parser.error("--url and --store go together")
    data = write_data(HERE / "data")
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, store = (None, args.url, args.store) if args.url else (*start_server(Path(tmp)), Path(tmp))
        try:
            for task in args.tasks:
                print(f"{task}: trained in {train(task, data[task], url):.0f} s", flush=True)
                shutil.rmtree(OUT / task, ignore_errors=True)
                (OUT / task).mkdir(parents=True)
                for name in ("adapter_config.json", "adapter_model.safetensors"):
                    shutil.copy2(store / task / name, OUT / task / name)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
