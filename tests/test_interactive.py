"""The interactive conversation, driven through a pseudo-terminal against a local server."""

import os
import sys
import threading

import pytest
from PIL import Image

from conftest import CHAT, END_CHUNKS, FAKE_KEY, SSE_HEAD, chunk_event, chunked, completion, json_response

pexpect = pytest.importorskip("pexpect")

PROMPT = "> "


class Script:
    """Answers the n-th request by the n-th entry: "text" streams (or returns) that reply,
    ("error", status) fails the turn, ("slow", text) streams text and then stalls."""

    def __init__(self, *turns):
        self.turns = list(turns)
        self.requests = []
        self.release = threading.Event()

    def __call__(self, conn, request):
        self.requests.append(request["body"])
        turn = self.turns[len(self.requests) - 1]
        if isinstance(turn, tuple) and turn[0] == "error":
            conn.sendall(json_response(turn[1], {"error": {"message": "the model is busy"}}))
        elif isinstance(turn, tuple) and turn[0] == "slow":
            conn.sendall(SSE_HEAD + chunked(chunk_event(turn[1])))
            self.release.wait(20)
        elif request["body"].get("stream"):
            conn.sendall(SSE_HEAD + chunked(chunk_event(turn)) + chunked(
                chunk_event(finish_reason="stop") + b"data: [DONE]\n\n") + END_CHUNKS)
        else:
            conn.sendall(json_response(200, completion(turn)))

    def contents(self, index):
        return [(message["role"], message["content"]) for message in self.requests[index]["messages"]]


@pytest.fixture
def chat_session(raw_server, tmp_path):
    children = []

    def start(script, *args):
        url, _ = raw_server(script)
        child = pexpect.spawn(sys.executable, [str(CHAT), "--base-url", url, *args], cwd=str(tmp_path),
                              env={"PATH": os.environ["PATH"], "OPENAI_API_KEY": FAKE_KEY, "TERM": "dumb"},
                              encoding="utf-8", timeout=15, dimensions=(40, 200))
        children.append(child)
        child.expect_exact("/exit")  # the banner
        child.expect_exact(PROMPT)
        return child

    yield start
    for child in children:
        child.close(force=True)


def ask(child, line, reply):
    child.sendline(line)
    child.expect_exact(reply)
    child.expect_exact(PROMPT)


def test_a_conversation_keeps_its_history(chat_session):
    script = Script("Paris.", "About 2.1 million.")
    child = chat_session(script)
    ask(child, "Capital of France?", "Paris.")
    ask(child, "Population?", "About 2.1 million.")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert script.contents(1) == [("user", "Capital of France?"), ("assistant", "Paris."),
                                  ("user", "Population?")]
    assert all(request["stream"] is True for request in script.requests)


def test_banner_names_model_host_and_how_to_leave(raw_server, tmp_path):
    url, _ = raw_server(Script())
    child = pexpect.spawn(sys.executable, [str(CHAT), "--base-url", url, "-m", "tiny"],
                          cwd=str(tmp_path), env={"PATH": os.environ["PATH"], "TERM": "dumb"},
                          encoding="utf-8", timeout=15)
    child.expect(r"tiny at 127\.0\.0\.1:\d+ .*/exit or Ctrl-D")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_retry_resends_the_last_question_without_duplicating_it(chat_session):
    script = Script("first answer", "second answer", "second answer again")
    child = chat_session(script)
    ask(child, "one", "first answer")
    ask(child, "two", "second answer")
    ask(child, "/retry", "second answer again")
    assert script.contents(2) == script.contents(1)


def test_reset_forgets_the_history(chat_session):
    script = Script("a1", "a2")
    child = chat_session(script, "-s", "Be brief.")
    ask(child, "q1", "a1")
    child.sendline("/reset")
    child.expect_exact("history cleared")
    ask(child, "q2", "a2")
    assert script.contents(1) == [("system", "Be brief."), ("user", "q2")]
    assert script.contents(0)[0] == ("system", "Be brief.")


def test_a_failed_turn_keeps_the_session_and_the_question(chat_session):
    script = Script(("error", 400), "finally")
    child = chat_session(script)
    child.sendline("hard question")
    child.expect_exact("error: HTTP 400 Status: the model is busy (/retry to ask again)")
    child.expect_exact(PROMPT)
    ask(child, "/retry", "finally")
    assert script.contents(1) == [("user", "hard question")]


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(chat_session):
    script = Script(("slow", "half an ans"), "fresh")
    child = chat_session(script)
    child.sendline("long question")
    child.expect_exact("half an ans")
    child.sendintr()
    child.expect_exact(PROMPT)
    script.release.set()
    ask(child, "next", "fresh")
    # the interrupted turn is not part of the history
    assert script.contents(1) == [("user", "next")]
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_no_stream_and_image_on_the_first_question_only(chat_session, tmp_path):
    Image.new("RGB", (10, 10), "red").save(tmp_path / "pic.png")
    script = Script("a red square", "yes")
    child = chat_session(script, "--no-stream", "--image", "pic.png")
    ask(child, "what is it?", "a red square")
    ask(child, "sure?", "yes")
    first, second = script.requests
    assert "stream" not in first
    assert [part["type"] for part in first["messages"][0]["content"]] == ["text", "image_url"]
    assert second["messages"][0] == first["messages"][0]  # the image stays in the history
    assert second["messages"][2] == {"role": "user", "content": "sure?"}


def test_ctrl_c_at_the_prompt_exits_130(chat_session):
    child = chat_session(Script())
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in child.before
