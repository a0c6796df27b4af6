"""Redaction: keys, bearer tokens and URL credentials never survive a string that leaves the process."""

from __future__ import annotations

import logging

import pytest

from pipeline.redact import MASK, RedactingFilter, redact, remember_secret


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
