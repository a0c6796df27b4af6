"""Redaction: keys, bearer tokens and URL credentials never survive a string that leaves the process."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from pipeline.probe import read_probe
from pipeline.redact import MASK, RedactingFilter, redact, remember_secret
from tests.conftest import arithmetic_rows, harvest_args, run_cli, write_jsonl
from tests.openai_server import OpenAIServer


@pytest.mark.parametrize(
    "text, secret",
    [
        ("Authorization: Bearer sk-proj-abcdef1234567890", "abcdef1234567890"),
        ('{"error": {"message": "header was \\"Bearer tok.en-123456\\""}}', "tok.en-123456"),
        ("http://alice:s3cretpw@proxy.local:8080/v1", "s3cretpw"),
        ("https://api.example.com/v1?api_key=zzzz99998888", "zzzz99998888"),
        ("x-api-key: qqqqwwwweeee", "qqqqwwwweeee"),
        ("saw key sk-ant-api03-abcdefghijkl in body", "abcdefghijkl"),
    ],
)
def test_shapes_of_secrets_are_masked(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and MASK in out


def test_remembered_values_are_masked_anywhere() -> None:
    remember_secret("plain-looking-value-42")
    assert redact("echo: plain-looking-value-42!") == f"echo: {MASK}!"


def test_ordinary_text_is_left_alone() -> None:
    text = "HTTP 400 from http://127.0.0.1:8000/v1/chat/completions: key=3f2a9c7d prompt q1"
    assert redact(text) == text


def test_logging_filter_redacts_formatted_messages(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("distill.test_redact")
    log.addFilter(RedactingFilter())
    with caplog.at_level(logging.INFO, logger="distill.test_redact"):
        log.info("server said %s", "Bearer abcdefghijklmnop")
    assert "abcdefghijklmnop" not in caplog.text and MASK in caplog.text


# -- end to end: a leaky server, a key, credentials in the URL; nothing reaches disk or output ----

KEY = "plainkey-0123456789abcdef"  # no sk- prefix: only remember_secret knows it is a key
PASSWORD = "s3cretpass"


def test_nothing_leaks_when_the_server_quotes_the_request_back(
    server: OpenAIServer, tmp_path: Path
) -> None:
    """A proxy that echoes Authorization and the URL in 400/401/500 bodies; a base URL carrying
    user:password. The key and the password appear in no output, log, store, config or dataset."""
    p = write_jsonl(tmp_path / "p.jsonl", arithmetic_rows(12))
    run = tmp_path / "run"
    url = server.url.replace("http://", f"http://alice:{PASSWORD}@")
    env = {"OPENAI_API_KEY": KEY}
    outputs = []
    for base in (server.url, url):  # with credentials in the URL, httpx sends Basic auth instead
        for status in (401, 400, 500):
            server.echo_status = status
            args = harvest_args(base, p, run, "--max-retries", "0", "--json")
            proc = run_cli(*args, env=env)
            outputs += [proc.stdout, proc.stderr]
            assert proc.returncode == (1 if status == 401 else 3), proc.stderr
    assert server.status_counts[401] >= 2 and server.status_counts[500] >= 2
    auth = [h["authorization"] for h in server.headers_seen]
    assert any(KEY in a for a in auth) and any(a.startswith("Basic ") for a in auth)
    failures = sqlite3.connect(run / "store.sqlite").execute("SELECT error FROM failures")
    errors = [r[0] for r in failures]
    assert errors and all(MASK in e for e in errors)  # the echo was stored, masked
    server.echo_status = None
    done = run_cli(*args, env=env)
    assert done.returncode == 0, done.stderr
    outputs += [done.stdout, done.stderr]
    for cmd in (
        ["export", str(run), "--to", str(tmp_path / "export"), "--format", "jsonl"],
        ["build", str(run), "--to", str(tmp_path / "data"), "--format", "jsonl"],
    ):
        proc = run_cli(*cmd, env=env)
        assert proc.returncode == 0, proc.stderr
        outputs += [proc.stdout, proc.stderr]
    assert "harvest failed" in (run / "harvest.log").read_text()
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert run / "store.sqlite" in files and run / "config.yaml" in files
    for secret in (KEY, PASSWORD):
        for text in outputs:
            assert secret not in text, text
        for f in files:  # raw bytes: the SQLite file and its -wal, logs, datasets, config
            assert secret.encode() not in f.read_bytes(), f


def test_a_probe_keeps_url_credentials_out_of_its_output_and_probe_json(
    server: OpenAIServer, tmp_path: Path
) -> None:
    """`distill probe` prints and stores the URL masked; harvest still finds the probe.json of a
    teacher whose URL carries credentials."""
    url = server.url.replace("http://", f"http://alice:{PASSWORD}@")
    run = tmp_path / "run"
    table = run_cli("probe", "--base-url", url, "--model", "m")
    as_json = run_cli("probe", "--base-url", url, "--model", "m", "--json", "--out", str(run))
    for proc in (table, as_json):
        assert proc.returncode == 0, proc.stderr
        assert PASSWORD not in proc.stdout + proc.stderr
    assert f"{MASK}@127.0.0.1" in table.stdout
    assert PASSWORD not in (run / "probe.json").read_text()
    assert read_probe(run, base_url=url, model="m") is not None
