"""Real replies, replayed byte for byte: each file in tests/replays/ holds one HTTP response a
provider really sent, as another client library recorded it (its `source` names the project,
path and commit; tests/replays/README.md lists them). chat.py must print what a user should see.

Shapes no recording was found for (Gemini's error array, FastAPI's top-level "detail", a whole
`{"error": "text"}` body) are tested with bodies written from the providers' documentation."""

import json
from pathlib import Path

import pytest
from conftest import http_response, json_response

REPLAYS = sorted((Path(__file__).parent / "replays").glob("*.json"))


@pytest.mark.parametrize("path", REPLAYS, ids=[path.stem for path in REPLAYS])
def test_a_real_reply_prints_what_the_user_should_see(cli, server, path):
    replay = json.loads(path.read_text())
    server.reply(http_response(replay["status"], replay["body"].encode(), replay["content_type"]))
    done = cli("--base-url", server.url, "--retries", "0", *replay["args"], "q")
    assert (done.code, done.out) == (replay["code"], replay["stdout"]), done.err
    for words in replay["stderr"]:
        assert words in done.err
    assert done.err.count("\n") == len(
        done.err.splitlines()
    )  # whole lines, none over 300 characters
    assert all(len(line) <= 300 for line in done.err.splitlines())
    if replay["code"] == 0 and not replay["stderr"]:
        assert done.err == ""


def test_every_kind_of_reply_is_among_the_replays():
    kinds = " ".join(path.stem for path in REPLAYS)
    for kind in ("whole", "stream", "n3", "tool-call", "error", "reasoning", "refusal", "length"):
        assert kind in kinds


@pytest.mark.parametrize(
    "status, body, message",
    [
        (
            400,
            [
                {
                    "error": {
                        "code": 400,
                        "message": "API key not valid. Please pass a valid API key.",
                        "status": "INVALID_ARGUMENT",
                    }
                }
            ],
            "API key not valid. Please pass a valid API key.",
        ),
        (
            422,
            {
                "detail": [
                    {"loc": ["body", "messages"], "msg": "Field required", "type": "missing"},
                    {"loc": ["body", "model"], "msg": "Input should be a valid string"},
                ]
            },
            "body.messages: Field required; body.model: Input should be a valid string",
        ),
        (400, {"detail": "Model not loaded"}, "Model not loaded"),
        (400, {"error": "unknown model 'x'"}, "unknown model 'x'"),
        (
            400,
            {"object": "error", "message": "Invalid model: x", "type": "invalid_model"},
            "Invalid model: x",
        ),
    ],
)
def test_error_bodies_of_every_shape_show_the_providers_message(cli, server, status, body, message):
    server.reply(json_response(body, status))
    done = cli("--base-url", server.url, "q")
    reason = {400: "Bad Request", 422: "Status"}[status]
    assert (done.code, done.out, done.err) == (1, "", f"error: HTTP {status} {reason}: {message}\n")
