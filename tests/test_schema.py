"""--schema: the SPEC forms and the request they make, bad SPECs, the json_object fallback for
servers that reject json_schema (llama-cpp-python), and the check of the reply. chat.main() runs
in this process against a local fake server."""

import json
import threading

import pytest
from conftest import (
    END_CHUNKS,
    SSE_HEAD,
    chunk,
    chunk_of,
    completion,
    json_response,
    saved,
    sse_response,
    stream_events,
)

import chat

PERSON = {
    "type": "object",
    "title": "Person",
    "properties": {"name": {"type": "string"}},
    "required": ["name"],
    "additionalProperties": False,
}


def json_schema(schema: dict, name: str = "reply") -> dict:
    """response_format as --schema sends it first."""
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


def fields(**properties: dict) -> dict:
    """The JSON Schema the short form stands for: exactly these fields, all required."""
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def say(text: str, **details) -> bytes:
    """A whole reply with this text."""
    return json_response(completion(text, **details))


# What servers that take only {"type": "json_object", "schema": ...} answer to json_schema.
# llama-cpp-python validates the body with pydantic inside its RouteErrorHandler, which turns
# every exception into a 500 carrying str(exception) (llama_cpp/server/errors.py); with older
# FastAPI that is the list of errors, with newer FastAPI "1 validation error:" and the list.
PYDANTIC_ERROR = (
    "{'type': 'literal_error', 'loc': ('body', 'response_format', 'type'), 'msg': \"Input "
    "should be 'text' or 'json_object'\", 'input': 'json_schema', 'ctx': {'expected': "
    "\"'text' or 'json_object'\"}}"
)
LLAMA_CPP_PYTHON = json_response(
    {
        "error": {
            "message": f"[{PYDANTIC_ERROR}]",
            "type": "internal_server_error",
            "param": None,
            "code": None,
        }
    },
    500,
)
REJECTIONS = {
    "llama-cpp-python": LLAMA_CPP_PYTHON,
    "llama-cpp-python-newer-fastapi": json_response(
        {
            "error": {
                "message": f"1 validation error:\n  {PYDANTIC_ERROR}\n",
                "type": "internal_server_error",
                "param": None,
                "code": None,
            }
        },
        500,
    ),
    # llama-server before it took json_schema (llama.cpp issue #9522, September 2024)
    "llama-server-2024": json_response(
        {
            "error": {
                "code": 500,
                "message": 'response_format type must be one of "text" or "json_object", but got: '
                "json_schema",
                "type": "server_error",
            }
        },
        500,
    ),
    "fastapi-detail": json_response(
        {"detail": "json_schema is not supported here: use response_format json_object"}, 400
    ),
}


def json_error(text: str) -> str:
    """What Python's json module says of text (its wording differs between Python versions)."""
    try:
        json.loads(text)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{text!r} is JSON")


class TestSpec:
    @pytest.mark.parametrize(
        "spec, response_format",
        [
            (
                "name, age int, height float, alive bool, bio: one sentence",
                json_schema(
                    fields(
                        name={"type": "string"},
                        age={"type": "integer"},
                        height={"type": "number"},
                        alive={"type": "boolean"},
                        bio={"type": "string", "description": "one sentence"},
                    )
                ),
            ),
            (
                "a string, b integer, c number, d boolean, e str",
                json_schema(
                    fields(
                        a={"type": "string"},
                        b={"type": "integer"},
                        c={"type": "number"},
                        d={"type": "boolean"},
                        e={"type": "string"},
                    )
                ),
            ),
            (
                "  age int: in whole years,mood: one word: or two ,  city  ",
                json_schema(
                    fields(
                        age={"type": "integer", "description": "in whole years"},
                        mood={"type": "string", "description": "one word: or two"},
                        city={"type": "string"},
                    )
                ),
            ),
            ("solo", json_schema(fields(solo={"type": "string"}))),
            (json.dumps(PERSON), json_schema(PERSON, "Person")),
            (
                '  {"type": "array", "title": "two words"}',
                json_schema({"type": "array", "title": "two words"}),
            ),
        ],
        ids=[
            "short",
            "long-type-names",
            "descriptions",
            "one-field",
            "inline-titled",
            "inline-untitled",
        ],
    )
    def test_each_form_is_sent_as_a_strict_json_schema(self, cli, server, spec, response_format):
        required = response_format["json_schema"]["schema"].get("required", [])
        text = json.dumps({name: "x" for name in required})
        server.reply(say(text))
        done = cli("--base-url", server.url, "--schema", spec, "q")
        assert (done.code, done.out, done.err) == (0, text + "\n", "")
        assert server.bodies == [
            {
                "model": "gpt-5.4-mini",
                "messages": [{"role": "user", "content": "q"}],
                "response_format": response_format,
            }
        ]

    def test_a_file_is_read_from_the_current_folder(self, cli, server, tmp_path):
        (tmp_path / "work").mkdir()
        (tmp_path / "work" / "person.json").write_text(json.dumps(PERSON, indent=2))
        server.reply(say('{"name": "Ada"}'))
        done = cli("--base-url", server.url, "--schema", "@person.json", "q", cwd=tmp_path / "work")
        assert (done.code, done.out, done.err) == (0, '{"name": "Ada"}\n', "")
        assert server.bodies[0]["response_format"] == json_schema(PERSON, "Person")

    NOT_A_FIELD = "is not a field: write 'name', 'name type' or 'name type: description'"

    @pytest.mark.parametrize(
        "spec, err",
        [
            (
                "name, age years",
                "--schema: age has the unknown type 'years': use str, int, float or bool",
            ),
            ("name,, age int", f"--schema: '' {NOT_A_FIELD}"),
            ("name, age int,", f"--schema: '' {NOT_A_FIELD}"),
            ("", f"--schema: '' {NOT_A_FIELD}"),
            ("full name str", f"--schema: 'full name str' {NOT_A_FIELD}"),
            ("1st, 2nd", f"--schema: '1st' {NOT_A_FIELD}"),
            ("name, age int, name: again", "--schema: the field name is named twice"),
            (
                '{"type": "object",}',
                "--schema is not valid JSON: " + json_error('{"type": "object",}'),
            ),
            ("@missing.json", "cannot read the schema missing.json: No such file or directory"),
            (
                "@broken.json",
                "--schema @broken.json is not valid JSON: " + json_error('{"a": 1 "b": 2}'),
            ),
            (
                '["name", "age"]',
                "--schema must be a JSON Schema object, or fields such as 'name, age int'",
            ),
            (
                "@list.json",
                (
                    "--schema @list.json must be a JSON Schema object, "
                    "or fields such as 'name, age int'"
                ),
            ),
        ],
        ids=[
            "unknown-type",
            "empty-field",
            "trailing-comma",
            "empty",
            "three-words",
            "bad-name",
            "duplicate",
            "invalid-json",
            "missing-file",
            "invalid-json-file",
            "json-array",
            "json-array-file",
        ],
    )
    def test_a_bad_spec_is_exit_2_before_anything_is_sent(self, cli, server, tmp_path, spec, err):
        (tmp_path / "broken.json").write_text('{"a": 1 "b": 2}')
        (tmp_path / "list.json").write_text("[1, 2]")
        done = cli("--base-url", server.url, "--schema", spec, "q")
        assert (done.code, done.out, done.err) == (2, "", f"error: {err}\n")
        assert server.requests == []


class TestFallback:
    """A server that rejects json_schema gets the request once more as json_object + schema."""

    SCHEMA = fields(name={"type": "string"})

    @pytest.mark.parametrize("stream", [False, True])
    @pytest.mark.parametrize("rejection", REJECTIONS.values(), ids=REJECTIONS.keys())
    def test_one_more_request_as_json_object_and_no_5xx_retry_first(
        self, cli, server, rejection, stream
    ):
        good = (
            sse_response(stream_events('{"name": ', '"Ada"}')) if stream else say('{"name": "Ada"}')
        )
        server.reply(rejection, good)
        done = cli(
            "--base-url",
            server.url,
            "--schema",
            "name",
            "--retries",
            "2",
            *(["--stream"] if stream else []),
            "q",
        )
        assert (done.code, done.out, done.err) == (0, '{"name": "Ada"}\n', "")
        assert cli.waits == [] and len(server.requests) == 2
        first, second = server.bodies
        assert first["response_format"] == json_schema(self.SCHEMA)
        assert second == {
            **first,
            "response_format": {"type": "json_object", "schema": self.SCHEMA},
        }
        assert [turn["assistant"] for turn in saved_turns()] == ['{"name": "Ada"}']

    def test_v_says_so(self, cli, server):
        server.reply(LLAMA_CPP_PYTHON, say('{"name": "Ada"}'))
        done = cli("--base-url", server.url, "--schema", "name", "-v", "q")
        assert (done.code, done.out) == (0, '{"name": "Ada"}\n')
        lines = done.err.splitlines()
        note = (
            "* the server rejects this response_format; sending it as "
            '{"type": "json_object", "schema": ...}'
        )
        assert lines.count(note) == 1
        assert lines.index(note) > lines.index("< HTTP/1.1 500 Internal Server Error")
        assert lines.count("> POST /v1/chat/completions HTTP/1.1") == 2

    def test_when_both_forms_are_rejected_the_first_error_is_shown(self, cli, server):
        second = json_response(
            {"error": {"message": "response_format: unsupported keyword 'pattern'"}}, 500
        )
        server.reply(LLAMA_CPP_PYTHON, second)
        done = cli("--base-url", server.url, "--schema", "name", "--retries", "2", "q")
        assert (done.code, done.out, done.err) == (
            1,
            "",
            f"error: HTTP 500 Internal Server Error: [{PYDANTIC_ERROR}]\n",
        )
        assert len(server.requests) == 2 and cli.waits == []
        assert saved() == {}

    def test_other_errors_are_retried_as_always(self, cli, server):
        crash = json_response({"error": {"message": "CUDA out of memory"}}, 500)
        server.reply(crash, crash, say('{"name": "Ada"}'))
        done = cli("--base-url", server.url, "--schema", "name", "q")
        assert (done.code, done.out) == (0, '{"name": "Ada"}\n')
        assert done.err == "".join(
            f"warning: HTTP 500; retrying in {wait:.1f} s ({n} of 3)\n"
            for n, wait in enumerate(cli.waits, start=2)
        )
        assert len(cli.waits) == 2
        assert [body["response_format"] for body in server.bodies] == [json_schema(self.SCHEMA)] * 3

    def test_a_client_error_not_naming_the_format_is_not_a_rejection(self, cli, server):
        server.reply(json_response({"error": {"message": "model 'x' is not loaded"}}, 400))
        done = cli("--base-url", server.url, "--schema", "name", "q")
        assert (done.code, done.out, done.err) == (
            1,
            "",
            "error: HTTP 400 Bad Request: model 'x' is not loaded\n",
        )
        assert len(server.requests) == 1

    def test_a_busy_server_is_retried_after_the_fallback(self, cli, server):
        busy = json_response({"error": {"message": "loading model"}}, 503)
        server.reply(LLAMA_CPP_PYTHON, busy, say('{"name": "Ada"}'))
        done = cli("--base-url", server.url, "--schema", "name", "q")
        assert (done.code, done.out) == (0, '{"name": "Ada"}\n')
        assert len(server.requests) == 3 and len(cli.waits) == 1
        assert server.bodies[2]["response_format"] == {"type": "json_object", "schema": self.SCHEMA}

    def test_no_fallback_when_o_replaced_the_format(self, cli, server):
        server.reply(LLAMA_CPP_PYTHON)
        done = cli(
            "--base-url",
            server.url,
            "--schema",
            "name",
            "-o",
            "response_format",
            '{"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}',
            "--retries",
            "0",
            "q",
        )
        assert (done.code, done.err) == (
            1,
            f"error: HTTP 500 Internal Server Error: [{PYDANTIC_ERROR}]\n",
        )
        assert len(server.requests) == 1


def saved_turns() -> list[dict]:
    return [turn for turns in saved().values() for turn in turns]


class TestReply:
    SPEC = "name, age int, bio: one sentence"

    @pytest.mark.parametrize("stream", [False, True])
    def test_the_json_as_sent_is_printed_and_saved(self, cli, server, stream):
        text = '{ "name":"Ada",\n  "age": 36, "bio": "Wrote the first program.", "extra": [1] }'
        server.reply(sse_response(stream_events(text[:20], text[20:])) if stream else say(text))
        done = cli(
            "--base-url", server.url, "--schema", self.SPEC, *(["--stream"] if stream else []), "q"
        )
        assert (done.code, done.out, done.err) == (0, text + "\n", "")
        [turn] = saved_turns()
        assert turn["assistant"] == text

    def test_a_stream_is_printed_as_it_arrives(self, cli, server, monkeypatch):
        shown, waited = threading.Event(), []
        show_text = chat.Output.text

        def text(output, text: str) -> None:
            show_text(output, text)
            if text:
                shown.set()

        def reply(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk('{"name": ')))
            waited.append(shown.wait(10))  # the first piece is out before the rest is even sent
            conn.sendall(
                chunk_of(chunk('"Ada"}') + chunk(finish_reason="stop") + b"data: [DONE]\n\n")
                + END_CHUNKS
            )

        monkeypatch.setattr(chat.Output, "text", text)
        server.reply(reply)
        done = cli("--base-url", server.url, "--schema", "name", "--stream", "q")
        assert (done.code, done.out, done.err) == (0, '{"name": "Ada"}\n', "")
        assert waited == [True]

    @pytest.mark.parametrize(
        "spec, text, how, err",
        [
            (
                SPEC,
                "Sure! Ada, 36.",
                "whole",
                (
                    "error: the reply is not the JSON --schema asked for: Expecting value: line 1 "
                    "column 1 (char 0)"
                ),
            ),
            (
                SPEC,
                '```json\n{"name": "Ada"}\n```',
                "whole",
                (
                    "error: the reply is not the JSON --schema asked for: Expecting value: line 1 "
                    "column 1 (char 0)"
                ),
            ),
            (
                SPEC,
                '{"name": "Ad',
                "cut-off",
                (
                    "warning: the reply was cut off at the token limit (finish_reason: length)\n"
                    "error: the reply is not the JSON --schema asked for: Unterminated string "
                    "starting at: line 1 column 10 (char 9)"
                ),
            ),
            (
                SPEC,
                '{"name": "Ada", "age": 36',
                "streamed",
                (
                    "error: the reply is not the JSON --schema asked for: Expecting ',' delimiter: "
                    "line 1 column 26 (char 25)"
                ),
            ),
            (
                SPEC,
                '{"name": "Ada", "bio": "x"}',
                "whole",
                "error: the reply lacks the field age that --schema asked for",
            ),
            (
                SPEC,
                '{"nom": "Ada"}',
                "streamed",
                "error: the reply lacks the fields name, age, bio that --schema asked for",
            ),
            (
                SPEC,
                '["Ada", 36, "x"]',
                "whole",
                "error: the reply lacks the fields name, age, bio that --schema asked for",
            ),
            (
                json.dumps(PERSON),
                "{}",
                "whole",
                "error: the reply lacks the field name that --schema asked for",
            ),
        ],
        ids=[
            "prose",
            "fenced",
            "cut-off",
            "streamed-unfinished",
            "one-field-missing",
            "streamed-fields-missing",
            "array",
            "inline-required",
        ],
    )
    def test_a_reply_that_fails_the_check_is_printed_then_exit_1_unsaved(
        self, cli, server, spec, text, how, err
    ):
        server.reply(
            {
                "whole": say(text),
                "cut-off": say(text, finish_reason="length"),
                "streamed": sse_response(stream_events(text[:9], text[9:])),
            }[how]
        )
        done = cli(
            "--base-url",
            server.url,
            "--schema",
            spec,
            *(["--stream"] if how == "streamed" else []),
            "q",
        )
        assert (done.code, done.out, done.err) == (1, text + "\n", err + "\n")
        assert saved() == {}

    def test_o_response_format_wins(self, cli, server):
        server.reply(say('{"name": "Ada"}'))
        done = cli(
            "--base-url",
            server.url,
            "--schema",
            "name",
            "-o",
            "response_format",
            '{"type":"json_object"}',
            "q",
        )
        assert (done.code, done.out, done.err) == (0, '{"name": "Ada"}\n', "")
        assert server.bodies[0]["response_format"] == {"type": "json_object"}

    def test_it_applies_to_its_run_only(self, cli, server):
        server.reply(say('{"name": "Ada"}'), say("Ada was a mathematician."))
        assert cli("--base-url", server.url, "--schema", "name", "q1").code == 0
        done = cli("--base-url", server.url, "-c", "Tell me more, in prose.")
        assert (done.code, done.out, done.err) == (0, "Ada was a mathematician.\n", "")
        assert "response_format" in server.bodies[0] and "response_format" not in server.bodies[1]
        assert server.bodies[1]["messages"][:2] == [
            {"role": "user", "content": "q1"},
            {"role": "assistant", "content": '{"name": "Ada"}'},
        ]
