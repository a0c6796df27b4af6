"""serve_teacher: a real `transformers serve` on a tiny local model, over real HTTP on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import psutil
import pytest

from pipeline.demo.serve import serve_teacher, served_model_name
from pipeline.errors import InputError, TeacherError
from tests.tinymodels import make_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("serve") / "tiny", arch="qwen2", template="known"
    )


def _server_pids(url: str) -> list[int]:
    """Processes started by serve_teacher for this URL (found by the port on their command line)."""
    port = url.split(":")[-1].split("/")[0]
    pids = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = p.info["cmdline"] or []
        if "serve" in cmd and "--port" in cmd and port in cmd:
            pids.append(p.info["pid"])
    return pids


def _gone(pids: list[int]) -> bool:
    return not any(
        psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie" for pid in pids
    )


def test_chat_completion_has_openai_shape_and_server_stops(tiny: Path, tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    with serve_teacher(tiny, log_path=log) as url:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        pids = _server_pids(url)
        assert pids, "the server process should be running inside the block"
        listed = httpx.get(f"{url}/models", timeout=10).json()
        assert [m["id"] for m in listed["data"]] == [served_model_name(tiny)]
        r = httpx.post(
            f"{url}/chat/completions",
            json={
                "model": served_model_name(tiny),
                "messages": [{"role": "user", "content": "What is 12 + 7?"}],
                "max_tokens": 5,
            },
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        choice = body["choices"][0]
        assert isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length")
        assert 1 <= body["usage"]["completion_tokens"] <= 5
        assert body["usage"]["prompt_tokens"] > 0
        # Pinned to the folder: another model name is refused, not silently served.
        wrong = httpx.post(
            f"{url}/chat/completions",
            json={"model": "other", "messages": [{"role": "user", "content": "hi"}]},
            timeout=60,
        )
        assert wrong.status_code == 400
    assert _gone(pids)
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{url}/models", timeout=2)
    assert "Application startup complete" in log.read_text()


def test_server_stops_when_the_body_raises(tiny: Path) -> None:
    pids: list[int] = []
    with pytest.raises(RuntimeError, match="boom"), serve_teacher(tiny) as url:
        pids = _server_pids(url)
        assert pids
        raise RuntimeError("boom")
    assert _gone(pids)


def test_server_that_dies_reports_its_log(tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}))
    with pytest.raises(TeacherError, match=r"exited with code .*log"), serve_teacher(broken):
        pass


def test_missing_folder_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a model folder"), serve_teacher(tmp_path / "nope"):
        pass
