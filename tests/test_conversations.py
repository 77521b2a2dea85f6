"""Saved conversations: where and how turns are written, -c and --chat, listing, showing and
forgetting, what is never saved, and what survives concurrent runs, kills and torn lines.

Every test runs with CHAT_PY_HOME (and HOME) in its own temp folder (conftest.clean_environ).
"""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import (CHAT, END_CHUNKS, FAKE_KEY, SSE_HEAD, chunk_event, chunked, completion, json_response,
                      stream_events)

NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{3}")


def home() -> Path:
    return Path(os.environ["CHAT_PY_HOME"])


def files(folder=None) -> list[Path]:
    return sorted((folder or home()).glob("*.jsonl"))


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


class Answers:
    """A server that answers the n-th request with the n-th text (the last repeats) and keeps
    every request body."""

    def __init__(self, *texts, delay=0.0):
        self.texts = texts
        self.delay = delay
        self.bodies = []
        self.lock = threading.Lock()

    def __call__(self, conn, request):
        with self.lock:
            self.bodies.append(request["body"])
            text = self.texts[min(len(self.bodies), len(self.texts)) - 1]
        time.sleep(self.delay)
        if request["body"].get("stream"):
            conn.sendall(SSE_HEAD + chunked(stream_events(text)) + END_CHUNKS)
        else:
            conn.sendall(json_response(200, completion(text)))


@pytest.fixture
def server(raw_server):
    def start(*texts, delay=0.0):
        answers = Answers(*texts, delay=delay)
        url, _ = raw_server(answers)
        return url, answers

    return start


class TestSaving:
    def test_a_run_is_saved_as_one_json_line(self, run_chat, server):
        url, _ = server("Quicksort.")
        done = run_chat("--base-url", url, "-s", "Be brief.", "Name a sorting algorithm")
        assert (done.code, done.out, done.err) == (0, "Quicksort.\n", "")
        [path] = files()
        assert NAME.fullmatch(path.stem)
        [turn] = lines(path)
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", turn.pop("time"))
        assert turn == {"model": "gpt-5.4-mini", "system": "Be brief.",
                        "user": {"role": "user", "content": "Name a sorting algorithm"},
                        "assistant": "Quicksort.", "finish_reason": "stop",
                        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
                        "base_url": url}

    def test_files_are_utf8_and_readable(self, run_chat, server):
        url, _ = server("Très bien ☕ 日本")
        assert run_chat("--base-url", url, "Ça va ?", env={"LANG": "C", "LC_ALL": "C"}).code == 0
        [path] = files()
        text = path.read_bytes().decode("utf-8")
        assert "Très bien ☕ 日本" in text and "Ça va ?" in text  # as written, not \\u escapes

    def test_each_run_without_c_starts_a_new_conversation(self, run_chat, server):
        url, answers = server("one", "two")
        assert run_chat("--base-url", url, "first").code == 0
        time.sleep(1.1)  # names carry the second they were made in
        assert run_chat("--base-url", url, "second").code == 0
        assert len(files()) == 2
        assert answers.bodies[1]["messages"] == [{"role": "user", "content": "second"}]

    def test_modes_are_private_whatever_the_umask(self, server, tmp_path):
        url, _ = server("ok")
        for umask, folder in ((0o000, tmp_path / "open"), (0o077, tmp_path / "closed"),
                              (0o277, tmp_path / "unwritable")):
            env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY, "CHAT_PY_HOME": str(folder / "deep" / "chats")}
            done = subprocess.run([sys.executable, str(CHAT), "--base-url", url, "q"], env=env,
                                  capture_output=True, preexec_fn=lambda umask=umask: os.umask(umask))
            assert done.returncode == 0, done.stderr
            assert stat.S_IMODE((folder / "deep" / "chats").stat().st_mode) == 0o700
            assert [stat.S_IMODE(path.stat().st_mode) for path in files(folder / "deep" / "chats")] == [0o600]

    def test_images_are_saved_exactly_as_sent(self, run_chat, server, tmp_path):
        from PIL import Image

        Image.new("RGB", (30, 20), "red").save(tmp_path / "red.png")
        url, answers = server("a red square", "still red")
        assert run_chat("--base-url", url, "--image", "red.png", "What is it?").code == 0
        sent = answers.bodies[0]["messages"][0]
        assert lines(files()[0])[0]["user"] == sent
        assert run_chat("--base-url", url, "-c", "Sure?").code == 0
        assert answers.bodies[1]["messages"][0] == sent  # the model still sees the picture

    def test_the_key_and_url_secrets_are_never_written(self, run_chat, raw_server, tmp_path):
        url, _ = raw_server(lambda conn, request: conn.sendall(json_response(200, completion(
            f"echo {request['headers'].get('authorization')}"))))
        secret_url = url.replace("http://", "http://alice:hunter2-password@") + "?api-key=query-secret"
        done = run_chat("--base-url", secret_url, "q")
        assert done.code == 0
        assert done.out == f"echo Bearer {FAKE_KEY}\n"  # stdout is the server's reply, word for word
        text = files()[0].read_text()
        assert FAKE_KEY not in text and lines(files()[0])[0]["assistant"] == "echo Bearer [redacted]"
        assert "hunter2" not in text and "query-secret" not in text and "alice" not in text
        assert lines(files()[0])[0]["base_url"] == url
        assert list(home().iterdir()) == files()  # nothing else in the folder

    def test_the_key_is_not_in_the_file_chat_py_writes_itself(self, run_chat, server):
        url, _ = server("hello")
        assert run_chat("--base-url", url, "-v", "q").code == 0
        assert FAKE_KEY not in files()[0].read_text()
        assert FAKE_KEY[-12:] not in files()[0].read_text()


class TestWhere:
    def run_in(self, run_chat, url, env) -> Path:
        done = run_chat("--base-url", url, "q", env=env)
        assert done.code == 0, done.err
        [path] = list(Path(os.environ["HOME"]).parent.rglob("*.jsonl"))
        return path.parent

    @pytest.mark.parametrize(
        "xdg, where",
        [("{tmp}/xdg", "{tmp}/xdg/chat-py"), ("", "{home}/.local/state/chat-py"),
         ("relative/state", "{home}/.local/state/chat-py")],
    )
    def test_fallback_folders(self, run_chat, server, tmp_path, xdg, where):
        url, _ = server("ok")
        home_folder = os.environ["HOME"]
        env = {"CHAT_PY_HOME": "", "XDG_STATE_HOME": xdg.format(tmp=tmp_path)}
        assert str(self.run_in(run_chat, url, env)) == where.format(tmp=tmp_path, home=home_folder)

    def test_chat_py_home_wins(self, run_chat, server, tmp_path):
        url, _ = server("ok")
        env = {"CHAT_PY_HOME": str(tmp_path / "mine"), "XDG_STATE_HOME": str(tmp_path / "xdg")}
        assert self.run_in(run_chat, url, env) == tmp_path / "mine"


class TestGoingOn:
    def test_c_sends_the_saved_turns_then_the_new_question(self, run_chat, server):
        url, answers = server("Quicksort.", "O(n log n) on average.")
        assert run_chat("--base-url", url, "-m", "first-model", "-s", "Be brief.",
                        "Name a sorting algorithm").code == 0
        done = run_chat("--base-url", url, "-c", "How fast is it?")
        assert (done.code, done.out) == (0, "O(n log n) on average.\n")
        assert answers.bodies[1] == {"model": "first-model", "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Name a sorting algorithm"},
            {"role": "assistant", "content": "Quicksort."},
            {"role": "user", "content": "How fast is it?"}]}
        [path] = files()
        assert [turn["assistant"] for turn in lines(path)] == ["Quicksort.", "O(n log n) on average."]

    def test_m_and_s_override_what_the_conversation_had(self, run_chat, server):
        url, answers = server("a", "b", "c")
        assert run_chat("--base-url", url, "-m", "old", "-s", "Old.", "q1").code == 0
        assert run_chat("--base-url", url, "-c", "-m", "new", "-s", "New.", "q2").code == 0
        assert run_chat("--base-url", url, "-c", "-s", "", "q3").code == 0
        assert answers.bodies[1]["model"] == "new" and answers.bodies[1]["messages"][0]["content"] == "New."
        assert answers.bodies[2]["model"] == "new"  # the last turn's model carries over
        assert answers.bodies[2]["messages"][0]["role"] == "user"  # -s '' drops the system prompt

    def test_the_server_and_key_come_from_now_not_from_the_file(self, run_chat, server):
        first_url, _ = server("from the first server")
        second_url, second = server("from the second server")
        assert run_chat("--base-url", first_url, "q1").code == 0
        done = run_chat("--base-url", second_url, "-c", "q2", key="sk-test-another-fake-key-0000")
        assert (done.code, done.out) == (0, "from the second server\n")
        assert len(second.bodies) == 1

    def test_c_takes_the_file_written_last_not_the_last_name(self, run_chat, server):
        url, answers = server("a", "b", "c")
        assert run_chat("--base-url", url, "--chat", "zzz-older", "about zebras").code == 0
        assert run_chat("--base-url", url, "--chat", "aaa-newer", "about apples").code == 0
        os.utime(home() / "zzz-older.jsonl", (time.time() + 5, time.time() + 5))
        assert run_chat("--base-url", url, "-c", "and?").code == 0
        assert answers.bodies[2]["messages"][0]["content"] == "about zebras"
        assert len(lines(home() / "zzz-older.jsonl")) == 2

    def test_chat_name_starts_then_continues_its_own_conversation(self, run_chat, server):
        url, answers = server("a", "b", "c")
        assert run_chat("--base-url", url, "--chat", "work", "w1").code == 0
        assert run_chat("--base-url", url, "--chat", "home", "h1").code == 0
        assert run_chat("--base-url", url, "--chat", "work", "w2").code == 0
        assert [m["content"] for m in answers.bodies[2]["messages"]] == ["w1", "a", "w2"]
        assert sorted(path.name for path in files()) == ["home.jsonl", "work.jsonl"]

    def test_c_with_nothing_saved_is_a_usage_error(self, run_chat, server):
        url, answers = server("never")
        done = run_chat("--base-url", url, "-c", "q")
        assert done.code == 2 and "no saved conversation" in done.err and answers.bodies == []

    def test_c_and_chat_together_is_a_usage_error(self, run_chat, server):
        url, answers = server("never")
        done = run_chat("--base-url", url, "-c", "--chat", "x", "q")
        assert done.code == 2 and done.err.startswith("error: -c and --chat") and answers.bodies == []


class TestNames:
    @pytest.mark.parametrize("name", ["../escape", "a/b", "/etc/passwd", ".hidden", "x" * 65, "",
                                      "sp ace", "..", "tab\t", "new\nline"])
    @pytest.mark.parametrize("option", ["--chat", "--show", "--forget"])
    def test_names_that_could_escape_the_folder_are_refused(self, run_chat, server, tmp_path, option,
                                                            name):
        url, answers = server("never")
        before = sorted(tmp_path.rglob("*"))
        done = run_chat("--base-url", url, option, name, *(["q"] if option == "--chat" else []))
        if option == "--show" and name == "":
            assert done.code == 2 and "no saved conversation" in done.err
        else:
            assert done.code == 2 and "not a conversation name" in done.err, done.err
        assert answers.bodies == [] and sorted(tmp_path.rglob("*")) == before

    def test_a_bad_name_is_reported_before_a_missing_key(self, run_chat):
        done = run_chat("--chat", "../etc", "q", key=None)
        assert done.code == 2 and "not a conversation name" in done.err

    @pytest.mark.parametrize("name", ["a", "Project_2.notes-v1", "x" * 64, "-dash-first"])
    def test_good_names(self, run_chat, server, name):
        url, _ = server("ok")
        assert run_chat("--base-url", url, f"--chat={name}", "q").code == 0
        assert [path.name for path in files()] == [f"{name}.jsonl"]


class TestNotSaved:
    def test_a_failed_turn(self, run_chat, raw_server):
        refusal = json_response(400, {"error": {"message": "no"}})
        url, _ = raw_server(lambda conn, request: conn.sendall(refusal))
        assert run_chat("--base-url", url, "q").code == 1
        assert not home().exists() or files() == []

    @pytest.mark.parametrize("how", [["--no-save"], ["--curl"]])
    def test_no_save_and_curl(self, run_chat, server, how):
        url, _ = server("ok")
        assert run_chat("--base-url", url, *how, "q").code == 0
        assert not home().exists()

    @pytest.mark.parametrize("value, saved", [("1", False), ("yes", False), ("0", True), ("", True)])
    def test_chat_py_no_save(self, run_chat, server, value, saved):
        url, _ = server("ok")
        assert run_chat("--base-url", url, "q", env={"CHAT_PY_NO_SAVE": value}).code == 0
        assert bool(home().exists() and files()) is saved

    def test_a_reply_interrupted_by_ctrl_c(self, raw_server, tmp_path):
        def handler(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("partial ")))
            time.sleep(10)

        url, _ = raw_server(handler)
        process = subprocess.Popen([sys.executable, str(CHAT), "--base-url", url, "--stream", "q"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                   env={**os.environ, "OPENAI_API_KEY": FAKE_KEY})
        assert process.stdout.read(8) == b"partial "
        process.send_signal(signal.SIGINT)
        assert process.wait(10) == 130
        assert not home().exists()

    def test_a_stream_without_done_that_the_user_saw_is_saved(self, run_chat, raw_server):
        url, _ = raw_server(lambda conn, request: conn.sendall(
            SSE_HEAD + chunked(chunk_event("half")) + END_CHUNKS))
        done = run_chat("--base-url", url, "--stream", "q")
        assert (done.code, done.out) == (0, "half\n") and "warning:" in done.err
        assert lines(files()[0])[0]["assistant"] == "half"


class TestNothingLost:
    def test_two_runs_at_once_both_land(self, server, tmp_path, run_chat):
        url, answers = server("first", "answer A", "answer B", "after", delay=0)
        assert run_chat("--base-url", url, "--chat", "shared", "start").code == 0
        answers.delay = 1.0  # both runs are waiting on the server at the same time
        env = {**os.environ, "OPENAI_API_KEY": FAKE_KEY}
        runs = [subprocess.Popen([sys.executable, str(CHAT), "--base-url", url, "--chat", "shared", question],
                                 env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                for question in ("A?", "B?")]
        assert [run.wait(30) for run in runs] == [0, 0]
        turns = lines(home() / "shared.jsonl")
        assert len(turns) == 3
        assert sorted(turn["user"]["content"] for turn in turns[1:]) == ["A?", "B?"]
        answers.delay = 0
        assert run_chat("--base-url", url, "--chat", "shared", "and now?").code == 0
        assert len(answers.bodies[-1]["messages"]) == 3 * 2 + 1

    def test_sigkill_mid_reply_leaves_earlier_turns_intact(self, raw_server, run_chat, server):
        url, _ = server("the first answer")
        assert run_chat("--base-url", url, "first").code == 0

        def endless(conn, request):
            conn.sendall(SSE_HEAD + chunked(chunk_event("streaming...")))
            time.sleep(10)

        slow_url, _ = raw_server(endless)
        process = subprocess.Popen([sys.executable, str(CHAT), "--base-url", slow_url, "-c", "--stream",
                                    "q2"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   env={**os.environ, "OPENAI_API_KEY": FAKE_KEY})
        assert process.stdout.read(12) == b"streaming..."
        process.kill()
        process.wait(10)
        [path] = files()
        assert [turn["assistant"] for turn in lines(path)] == ["the first answer"]
        url, answers = server("resumed")
        done = run_chat("--base-url", url, "-c", "q3")
        assert (done.code, done.out, done.err) == (0, "resumed\n", "")
        assert [m["content"] for m in answers.bodies[0]["messages"]] == ["first", "the first answer", "q3"]

    def test_a_torn_last_line_is_skipped_and_never_glued_to(self, run_chat, server):
        url, answers = server("one", "two")
        assert run_chat("--base-url", url, "--chat", "torn", "q1").code == 0
        path = home() / "torn.jsonl"
        with open(path, "ab") as file:
            file.write(b'{"time": "2026-11-26T10:00:00Z", "user": {"role": "user", "content": "cut sh')
        done = run_chat("--base-url", url, "--chat", "torn", "q2")
        assert (done.code, done.out) == (0, "two\n")
        assert done.err == (f"warning: {path} line 2 is not a saved turn (a torn write or a bad edit?); "
                            "skipped\n")
        assert [m["content"] for m in answers.bodies[1]["messages"]] == ["q1", "one", "q2"]
        raw = path.read_text().splitlines()
        assert len(raw) == 3 and raw[1].endswith('"content": "cut sh')
        assert json.loads(raw[2])["assistant"] == "two"

    @pytest.mark.parametrize("bad", [b"not json at all",
                                     b'{"user": "a string, not a message", "assistant": "x"}',
                                     b'{"assistant": "no question"}', b"[1, 2]", b"\xff\xfe"])
    def test_a_bad_line_in_the_middle_is_skipped_with_its_number(self, run_chat, server, bad):
        url, answers = server("one", "two", "three")
        assert run_chat("--base-url", url, "--chat", "edited", "q1").code == 0
        assert run_chat("--base-url", url, "--chat", "edited", "q2").code == 0
        path = home() / "edited.jsonl"
        first, second = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(first + bad + b"\n" + second)
        done = run_chat("--base-url", url, "--chat", "edited", "q3")
        assert done.code == 0 and done.err == (f"warning: {path} line 2 is not a saved turn "
                                               "(a torn write or a bad edit?); skipped\n")
        assert [m["content"] for m in answers.bodies[2]["messages"]] == ["q1", "one", "q2", "two", "q3"]

    def test_an_unwritable_folder_costs_only_a_warning(self, run_chat, server, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        url, _ = server("still here")
        done = run_chat("--base-url", url, "q", env={"CHAT_PY_HOME": str(tmp_path / "a-file" / "chats")})
        assert (done.code, done.out) == (0, "still here\n")
        assert done.err.startswith("warning: could not save the conversation to ")
        assert "Not a directory" in done.err
        assert done.err.count("\n") == 1

    def test_a_full_disk_costs_only_a_warning(self, run_chat, server):
        if not Path("/dev/full").exists():
            pytest.skip("no /dev/full on this system")
        home().mkdir(parents=True)
        (home() / "full.jsonl").symlink_to("/dev/full")
        url, _ = server("answer")
        done = run_chat("--base-url", url, "--chat", "full", "q")
        assert (done.code, done.out) == (0, "answer\n")
        assert "could not save" in done.err and "No space left on device" in done.err


class TestManaging:
    @pytest.fixture
    def three(self, run_chat, server):
        url, _ = server("a1", "a2", "b1", "c1")
        for args in (["--chat", "alpha", "What is the first question of alpha about? " * 3],
                     ["--chat", "alpha", "second"], ["--chat", "beta", "Beta question"],
                     ["--chat", "gamma", "Gamma question"]):
            assert run_chat("--base-url", url, *args).code == 0
        now = time.time()
        for age, name in enumerate(["beta", "gamma", "alpha"]):
            os.utime(home() / f"{name}.jsonl", (now - 60 * age, now - 60 * age))
        return url

    def test_chats_lists_newest_first_without_key_or_network(self, run_chat, three):
        done = run_chat("--chats", key=None, env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
        assert done.code == 0 and done.err == ""
        rows = done.out.splitlines()
        assert [row.split()[0] for row in rows] == ["beta", "gamma", "alpha"]
        assert re.fullmatch(r"beta\s+1 turn  \d{4}-\d\d-\d\d \d\d:\d\d  Beta question", rows[0])
        question = ("What is the first question of alpha about? " * 3).strip()
        assert re.fullmatch(r"alpha\s+2 turns  \S+ \S+  " + re.escape(question[:59] + "…"), rows[2])

    def test_chats_with_nothing_saved(self, run_chat):
        done = run_chat("--chats")
        assert (done.code, done.out) == (0, "")
        assert done.err == f"no saved conversations in {home()}\n"

    def test_a_retried_turn_replaces_the_one_before(self, run_chat, raw_server, three):
        path = home() / "beta.jsonl"
        turn = lines(path)[0]
        with open(path, "a") as file:
            file.write(json.dumps({"retry": True, **turn, "assistant": "better"}) + "\n")
        assert re.match(r"beta\s+1 turn ", run_chat("--chats").out.splitlines()[0])
        shown = run_chat("--show", "beta").out
        assert "conversation beta: 1 turn\n" in shown and "better" in shown and "b1" not in shown
        url, received = raw_server(lambda conn, request: conn.sendall(json_response(200, completion("ok"))))
        assert run_chat("--base-url", url, "--chat", "beta", "next").code == 0
        assert [m["content"] for m in received[0]["body"]["messages"]] == ["Beta question", "better", "next"]

    def test_show_prints_each_question_and_answer(self, run_chat, three):
        done = run_chat("--show", "alpha", key=None)
        assert done.code == 0 and done.err == ""
        text = re.sub(r"\d{4}-\d\d-\d\d \d\d:\d\d", "TIME", done.out)
        assert text == ("conversation alpha: 2 turns\n"
                        f"\nyou, TIME:\n{'What is the first question of alpha about? ' * 2}"
                        "What is the first question of alpha about?\n"
                        "\ngpt-5.4-mini:\na1\n"
                        "\nyou, TIME:\nsecond\n\ngpt-5.4-mini:\na2\n")

    def test_show_without_a_name_is_the_newest(self, run_chat, three):
        done = run_chat("--show")
        assert done.out.startswith("conversation beta: 1 turn\n") and "Beta question" in done.out

    def test_show_marks_system_prompts_and_images(self, run_chat, server, tmp_path):
        from PIL import Image

        Image.new("RGB", (8, 8), "red").save(tmp_path / "dot.png")
        url, _ = server("red dot")
        done = run_chat("--base-url", url, "--chat", "pic", "-s", "Be brief.", "--image", "dot.png", "What?")
        assert done.code == 0
        out = run_chat("--show", "pic").out
        assert "system prompt: Be brief.\n" in out
        assert re.search(r"What\?\n\[image: data:image/png;base64,…\(\d+ characters\)\]\n", out)

    def test_forget_deletes_one_conversation(self, run_chat, three):
        done = run_chat("--forget", "gamma", key=None)
        assert done.code == 0 and done.out == f"forgot gamma (deleted {home() / 'gamma.jsonl'})\n"
        assert sorted(path.stem for path in files()) == ["alpha", "beta"]

    @pytest.mark.parametrize("option", ["--show", "--forget"])
    def test_an_unknown_name_is_a_usage_error(self, run_chat, three, option):
        done = run_chat(option, "delta")
        assert done.code == 2 and done.err.startswith("error: no conversation named 'delta'")
        assert "--chats" in done.err
        assert len(files()) == 3


@pytest.mark.parametrize(
    "args",
    [["--help"], ["--version"], ["--chats"], ["--show"], ["--forget", "nope"], ["--bogus"],
     ["--curl", "q"], ["-c", "q"], ["--max-tokens", "0", "q"], ["--image", "missing.png", "q"]],
)
def test_commands_that_need_no_network_never_import_requests(args, tmp_path):
    done = subprocess.run([sys.executable, "-X", "importtime", str(CHAT), *args], capture_output=True,
                          text=True, env={**os.environ, "OPENAI_API_KEY": FAKE_KEY}, stdin=subprocess.DEVNULL)
    imported = {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "requests" not in imported and "urllib3" not in imported
    assert "json" in imported  # the import log itself works
