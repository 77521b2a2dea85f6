"""The conversation mode and everything that needs a terminal, driven through a pseudo-terminal
against a local server: commands, pasted blocks, saved turns, the spinner, reasoning."""

import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from conftest import CHAT, END_CHUNKS, SSE_HEAD, child_env, chunk_event, chunked, completion, json_response

pexpect = pytest.importorskip("pexpect")

PROMPT = "> "


class Script:
    """Answers the n-th request by the n-th entry: "text" streams (or returns) that reply,
    ("error", status) fails the turn, ("slow", text) streams text and then stalls,
    ("late", seconds, text) waits before answering."""

    def __init__(self, *turns):
        self.turns = list(turns)
        self.requests = []
        self.release = threading.Event()

    def __call__(self, conn, request):
        self.requests.append(request["body"])
        turn = self.turns[len(self.requests) - 1]
        if isinstance(turn, tuple) and turn[0] == "error":
            conn.sendall(json_response(turn[1], {"error": {"message": "the model is busy"}}))
            return
        if isinstance(turn, tuple) and turn[0] == "slow":
            conn.sendall(SSE_HEAD + chunked(chunk_event(turn[1])))
            self.release.wait(20)
            return
        if isinstance(turn, tuple) and turn[0] == "late":
            time.sleep(turn[1])
            turn = turn[2]
        if request["body"].get("stream"):
            conn.sendall(SSE_HEAD + chunked(chunk_event(turn)) + chunked(
                chunk_event(finish_reason="stop") + b"data: [DONE]\n\n") + END_CHUNKS)
        else:
            conn.sendall(json_response(200, completion(turn)))

    def contents(self, index):
        return [(message["role"], message["content"]) for message in self.requests[index]["messages"]]


def spawn(*args, **env):
    return pexpect.spawn(sys.executable, [str(CHAT), *args], env=child_env(**{"TERM": "dumb", **env}),
                         encoding="utf-8", timeout=15, dimensions=(40, 200))


@pytest.fixture
def chat_session(raw_server):
    children = []

    def start(script, *args, **env):
        url, _ = raw_server(script)
        child = spawn("--base-url", url, *args, **env)
        children.append(child)
        child.expect_exact("/exit or Ctrl-D")  # the banner
        child.expect_exact(PROMPT)
        return child

    yield start
    for child in children:
        child.close(force=True)


def ask(child, line, reply):
    child.sendline(line)
    child.expect_exact(reply)
    child.expect_exact(PROMPT)


def leave(child, line="/exit"):
    child.sendline(line)
    child.expect(pexpect.EOF)
    child.close()
    return child.exitstatus


def saved_lines(name=None) -> list[dict]:
    folder = Path(os.environ["CHAT_PY_HOME"])
    files = [folder / f"{name}.jsonl"] if name else sorted(folder.glob("*.jsonl"))
    return [json.loads(line) for path in files for line in path.read_text().splitlines()]


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


def test_banner_names_model_host_conversation_and_how_to_leave(raw_server):
    url, _ = raw_server(Script())
    child = spawn("--base-url", url, "-m", "tiny")
    child.expect(r"chat\.py \S+ · tiny at 127\.0\.0\.1:\d+ · new conversation (\d{8}-\d{6}-[0-9a-f]{3}) · "
                 r"/help, /exit or Ctrl-D")
    assert leave(child) == 0


def test_banner_says_when_the_model_is_only_chat_pys_default(raw_server):
    url, _ = raw_server(Script())
    child = spawn("--base-url", url)
    child.expect_exact("gpt-5.4-mini at 127.0.0.1:")
    child.expect_exact("(a default model name: --models lists the server's)")
    assert leave(child) == 0


@pytest.mark.parametrize("word", ["exit", "quit", "/exit", "/quit", "EXIT"])
def test_leaving_words_send_nothing(chat_session, word):
    script = Script()
    child = chat_session(script)
    assert leave(child, word) == 0
    assert script.requests == []


def test_help_and_unknown_commands_send_nothing(chat_session):
    script = Script("answer")
    child = chat_session(script)
    child.sendline("/help")
    for command in ("/reset", "/retry", "/model NAME", "/system TEXT", '"""', "//text"):
        child.expect_exact(command)
    child.expect_exact(PROMPT)
    child.sendline("/frobnicate")
    child.expect_exact("unknown command /frobnicate, /help lists them")
    child.expect_exact(PROMPT)
    ask(child, "a real question", "answer")
    assert script.contents(0) == [("user", "a real question")]


def test_a_double_slash_sends_the_rest_with_one_slash(chat_session):
    script = Script("it holds hosts", "a path")
    child = chat_session(script)
    ask(child, "//etc/hosts", "it holds hosts")
    ask(child, "/usr/bin is what?", "a path")  # several words: a question, not a command
    assert script.contents(0) == [("user", "/etc/hosts")]
    assert script.contents(1)[-1] == ("user", "/usr/bin is what?")


def test_model_and_system_change_the_following_turns(chat_session):
    script = Script("one", "two")
    child = chat_session(script, "-m", "first-model")
    ask(child, "q1", "one")
    child.sendline("/model second-model")
    child.expect_exact("(model: second-model)")
    child.sendline("/system Answer in French.")
    child.expect_exact("(system prompt: Answer in French.)")
    ask(child, "q2", "two")
    assert script.requests[0]["model"] == "first-model"
    assert script.requests[1]["model"] == "second-model"
    assert script.contents(1)[0] == ("system", "Answer in French.")
    assert saved_lines()[1]["model"] == "second-model" and saved_lines()[1]["system"] == "Answer in French."


def test_ctrl_d_leaves_the_shell_prompt_on_the_next_line(chat_session):
    child = chat_session(Script(), TERM="xterm")  # xterm: readline turns bracketed paste on
    child.sendeof()
    child.expect(pexpect.EOF)
    visible = re.sub(r"\x1b\[\?2004[hl]", "", child.before)
    assert visible.count("\n") == 1 and visible.strip("\r\n") == ""
    child.close()
    assert child.exitstatus == 0


def test_a_pasted_block_is_one_message(raw_server):
    script = Script("one answer")
    url, _ = raw_server(script)
    child = spawn("--base-url", url, TERM="xterm")
    # A terminal brackets a paste only once the program has asked for it (ESC [ ? 2004 h).
    child.expect_exact("\x1b[?2004h")
    child.expect_exact(PROMPT)
    child.send("\x1b[200~first line\rsecond line\r\rlast line\x1b[201~")
    child.send("\r")
    child.expect_exact("one answer")
    child.expect_exact(PROMPT)
    assert len(script.requests) == 1
    assert script.contents(0) == [("user", "first line\nsecond line\n\nlast line")]


def test_triple_quotes_open_and_close_a_multi_line_message(chat_session):
    script = Script("got it")
    child = chat_session(script)
    for line in ('"""', "def f():", "", "    return 1", '"""'):
        child.sendline(line)
    child.expect_exact("got it")
    child.expect_exact(PROMPT)
    assert script.contents(0) == [("user", "def f():\n\n    return 1")]


def test_retry_resends_the_last_question_without_duplicating_it(chat_session):
    script = Script("first answer", "second answer", "second answer again")
    child = chat_session(script)
    ask(child, "one", "first answer")
    ask(child, "two", "second answer")
    ask(child, "/retry", "second answer again")
    assert script.contents(2) == script.contents(1)
    lines = saved_lines()
    assert [line["assistant"] for line in lines] == ["first answer", "second answer", "second answer again"]
    assert lines[2]["retry"] is True and "retry" not in lines[1]


def test_each_turn_is_on_disk_when_its_reply_ends(chat_session):
    script = Script("a1", "a2")
    child = chat_session(script)
    ask(child, "q1", "a1")
    assert [line["user"]["content"] for line in saved_lines()] == ["q1"]
    ask(child, "q2", "a2")
    assert [line["assistant"] for line in saved_lines()] == ["a1", "a2"]


def test_reset_starts_a_new_conversation_and_keeps_the_old_file(chat_session):
    script = Script("a1", "a2")
    child = chat_session(script, "-s", "Be brief.")
    ask(child, "q1", "a1")
    first = saved_lines()
    child.sendline("/reset")
    child.expect(r"\(new conversation (\S+); the last one stays saved\)")
    new_name = child.match.group(1)
    ask(child, "q2", "a2")
    assert script.contents(1) == [("system", "Be brief."), ("user", "q2")]
    assert script.contents(0)[0] == ("system", "Be brief.")
    assert [line["user"]["content"] for line in saved_lines(new_name)] == ["q2"]
    assert len(list(Path(os.environ["CHAT_PY_HOME"]).glob("*.jsonl"))) == 2
    assert first[0] in saved_lines()


def test_continue_resumes_the_newest_conversation(chat_session, run_chat, raw_server):
    url, _ = raw_server(Script("saved answer"))
    assert run_chat("--base-url", url, "-m", "saved-model", "saved question").code == 0
    script = Script("next answer")
    url, _ = raw_server(script)
    child = spawn("--base-url", url, "-c")
    child.expect(r"saved-model at 127\.0\.0\.1:\d+ · conversation \S+, 1 turn · ")
    child.expect_exact(PROMPT)
    ask(child, "follow-up", "next answer")
    assert script.contents(0) == [("user", "saved question"), ("assistant", "saved answer"),
                                  ("user", "follow-up")]
    assert script.requests[0]["model"] == "saved-model"
    assert len(saved_lines()) == 2  # the same file, one turn longer
    assert leave(child) == 0


def test_a_failed_turn_keeps_the_session_and_the_question(chat_session):
    script = Script(("error", 400), "finally")
    child = chat_session(script)
    child.sendline("hard question")
    child.expect_exact("error: HTTP 400 Status: the model is busy (/retry to ask again)")
    child.expect_exact(PROMPT)
    assert saved_lines() == []
    ask(child, "/retry", "finally")
    assert script.contents(1) == [("user", "hard question")]
    assert "retry" not in saved_lines()[0]  # the failed attempt was never saved: nothing to replace


def test_ctrl_c_stops_the_reply_and_returns_to_the_prompt(chat_session):
    script = Script(("slow", "half an ans"), "fresh")
    child = chat_session(script)
    child.sendline("long question")
    child.expect_exact("half an ans")
    child.sendintr()
    child.expect_exact(PROMPT)
    script.release.set()
    ask(child, "next", "fresh")
    # the interrupted turn is not part of the history, nor of the file
    assert script.contents(1) == [("user", "next")]
    assert [line["user"]["content"] for line in saved_lines()] == ["next"]
    assert leave(child) == 0


def test_no_stream_and_attachments_on_the_first_question_only(chat_session, tmp_path):
    Image.new("RGB", (10, 10), "red").save(tmp_path / "pic.png")
    (tmp_path / "notes.txt").write_text("some notes\n")
    script = Script("a red square", "yes")
    child = chat_session(script, "--no-stream", "--image", "pic.png", "-f", "notes.txt")
    ask(child, "what is it?", "a red square")
    ask(child, "sure?", "yes")
    first, second = script.requests
    assert "stream" not in first
    parts = first["messages"][0]["content"]
    assert [part["type"] for part in parts] == ["text", "image_url"]
    assert parts[0]["text"] == "what is it?\n\nnotes.txt\n```\nsome notes\n```"
    assert second["messages"][0] == first["messages"][0]  # the image stays in the history
    assert second["messages"][2] == {"role": "user", "content": "sure?"}


def test_ctrl_c_at_the_prompt_exits_130(chat_session):
    child = chat_session(Script())
    child.sendintr()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 130
    assert "Traceback" not in child.before


class TestOnATerminal:
    """What only shows when stderr is a terminal: the spinner and the reasoning."""

    def test_a_spinner_counts_the_wait_and_is_erased_before_the_reply(self, raw_server):
        url, _ = raw_server(Script(("late", 1.6, "at last")))
        child = spawn("--base-url", url, "--no-save", "a question")
        child.expect(r"\| waiting 0 s|/ waiting 0 s|- waiting 0 s")
        child.expect(r"waiting 1 s")
        child.expect_exact("at last")
        erased = child.before
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert erased.endswith("\r" + " " * len("| waiting 1 s") + "\r")
        assert "\x1b[2m" in erased  # dimmed

    def test_a_stream_stops_the_spinner_before_its_first_text(self, raw_server):
        url, _ = raw_server(Script(("late", 1.2, "streamed at last")))
        child = spawn("--base-url", url, "--no-save", "--stream", "a question")
        child.expect_exact("waiting 1 s")
        child.expect_exact("streamed at last")
        assert child.before.endswith(" \r")  # erased first
        child.expect(pexpect.EOF)
        assert "waiting" not in child.before and " \r" not in child.before  # nothing drawn over the text

    def test_no_colour_under_no_color(self, raw_server):
        url, _ = raw_server(Script(("late", 0.5, "plain")))
        child = spawn("--base-url", url, "--no-save", "q", NO_COLOR="1")
        child.expect_exact("waiting 0 s")
        child.expect(pexpect.EOF)
        assert "\x1b[" not in child.before and "plain" in child.before

    def test_reasoning_is_dimmed_on_stderr_and_set_apart(self, raw_server):
        def handler(conn, request):
            deltas = [{"reasoning_content": "Let me think. "}, {"reasoning_content": "Done."},
                      {"content": "The answer."}]
            events = b"".join(b"data: " + json.dumps({"choices": [{"delta": delta}]}).encode() + b"\n\n"
                              for delta in deltas)
            conn.sendall(SSE_HEAD + chunked(events + b"data: [DONE]\n\n") + END_CHUNKS)

        url, _ = raw_server(handler)
        child = spawn("--base-url", url, "--stream", "--no-save", "q")
        child.expect(pexpect.EOF)
        child.close()
        assert child.exitstatus == 0
        assert "\x1b[2mLet me think. Done.\x1b[0m\r\n\r\nThe answer.\r\n" in child.before

    def test_hide_keeps_the_reasoning_off_the_terminal(self, raw_server):
        url, _ = raw_server(lambda conn, request: conn.sendall(json_response(
            200, completion("Answer.", reasoning_content="secret thoughts"))))
        child = spawn("--base-url", url, "--reasoning", "hide", "--no-save", "q")
        child.expect(pexpect.EOF)
        assert "secret thoughts" not in child.before and "Answer." in child.before
