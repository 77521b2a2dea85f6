"""Every platform: chat.py with what native Windows lacks, and output in any locale.

Windows is simulated on this machine: `windows` takes away the POSIX-only parts of `os`
(O_NOFOLLOW, O_NONBLOCK, getuid, fchmod, pread ...), `readline`, `signal.SIGPIPE` and the alarm
(SIGALRM, setitimer), and chooses the Windows paths (chat.WINDOWS, %LOCALAPPDATA% and
%APPDATA% in temporary folders, no CHAT_PY_HOME); os.path and pathlib stay POSIX, as this
machine needs them. The main flows run under it in-process, and once in a real process (a
sitecustomize on PYTHONPATH does the same there before chat.py starts). Output encodings are
tested in real processes."""

import builtins
import io
import json
import os
import signal
import stat
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import (
    FAKE_KEY,
    chunk,
    completion,
    json_response,
    nap,
    saved,
    sse_response,
    stream_events,
    write_settings,
)

import chat

# What native Windows CPython's os lacks (fchmod until 3.13, set_blocking until 3.12), and what
# chat.py or the libraries it loads could reach for.
POSIX_ONLY = (
    "O_NOFOLLOW",
    "O_NONBLOCK",
    "O_CLOEXEC",
    "getuid",
    "geteuid",
    "getgid",
    "getegid",
    "getgroups",
    "fchmod",
    "fchown",
    "chown",
    "lchown",
    "pread",
    "pwrite",
    "uname",
    "sysconf",
    "statvfs",
    "set_blocking",
)
TERMINAL = (True, True, True)
CHOWN = os.chown  # taken before `windows` takes it away
LEAVES = "/help · Ctrl-Z then Enter leaves"
REPLY = "naïve café “quoted” ☕ 日本 €"  # cp1252 has the quotes, é and €; not ☕ or 日本


@pytest.fixture
def windows(monkeypatch, tmp_path, cli):
    """chat.py as native Windows runs it: run(*args, **kw) and process(*args, **kw) are cli's,
    in %LOCALAPPDATA% and %APPDATA% of their own; state is where conversations should land."""
    for name in POSIX_ONLY:
        monkeypatch.delattr(os, name, raising=False)
    for name in ("SIGPIPE", "SIGALRM", "setitimer", "ITIMER_REAL"):
        monkeypatch.delattr(signal, name, raising=False)
    monkeypatch.setitem(sys.modules, "readline", None)  # import readline: ImportError
    monkeypatch.setattr(chat, "WINDOWS", True)
    local, roaming = tmp_path / "AppData" / "Local", tmp_path / "AppData" / "Roaming"
    local.mkdir(parents=True)
    roaming.mkdir()
    environ = {"LOCALAPPDATA": str(local), "APPDATA": str(roaming), "CHAT_PY_HOME": ""}

    def run(*args, env=None, **kwargs):
        return cli(*args, env={**environ, **(env or {})}, **kwargs)

    def process(*args, env=None, **kwargs):
        simulated = {"PYTHONPATH": str(sitecustomize(tmp_path / "site"))}
        return cli.process(*args, env={**environ, **simulated, **(env or {})}, **kwargs)

    return SimpleNamespace(run=run, process=process, state=local / "chat-py", environ=environ)


def sitecustomize(folder: Path) -> Path:
    """A folder whose sitecustomize.py takes away what Windows lacks before chat.py runs, and
    makes os.name "nt" once the modules chat.py loads are imported (the standard library picks
    its Windows parts by os.name when imported, and this machine has none)."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(
        textwrap.dedent(
            f"""\
            import argparse, base64, email.utils, http.client, ipaddress, logging, netrc
            import os, random, shlex, signal, socket, sys, threading, traceback, warnings
            import dotenv, PIL.Image, PIL.ImageOps, requests, urllib3

            for name in {POSIX_ONLY!r}:
                if hasattr(os, name):
                    delattr(os, name)
            del signal.SIGPIPE, signal.SIGALRM, signal.setitimer, signal.ITIMER_REAL
            sys.modules["readline"] = None
            os.name = "nt"
            """
        )
    )
    return folder


def turns(folder: Path) -> list[tuple[str, str]]:
    """(question, answer) of every saved turn in folder, conversation by conversation."""
    return [
        (turn["user"]["content"], turn["assistant"])
        for conversation in saved(folder).values()
        for turn in conversation
    ]


def sent(body: dict) -> list[tuple[str, object]]:
    return [(message["role"], message["content"]) for message in body["messages"]]


# ------------------------------------------------------------------ the main flows, in-process


class TestMainFlowsOnWindows:
    def test_a_question_is_answered_and_saved_in_localappdata(self, windows, server, tmp_path):
        done = windows.run("--base-url", server.url, "Hi?")
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert turns(windows.state) == [("Hi?", "Hello!")]
        assert not (tmp_path / "state").exists()  # nowhere else: no CHAT_PY_HOME, no ~/.local
        assert not (tmp_path / "home" / ".local").exists()

    def test_a_stream(self, windows, server):
        server.reply(sse_response(stream_events("Hel", "lo ☕")))
        done = windows.run("--base-url", server.url, "--stream", "q")
        assert (done.code, done.out, done.err) == (0, "Hello ☕\n", "")
        assert turns(windows.state) == [("q", "Hello ☕")]

    def test_piped_stdin_and_files(self, windows, server, tmp_path):
        (tmp_path / "notes.txt").write_text("line one\r\nline two\n")
        done = windows.run("--base-url", server.url, "-f", "notes.txt", "Sum up", stdin="piped")
        assert done.code == 0
        [message] = server.bodies[0]["messages"]
        assert message["content"] == "Sum up\n\npiped\n\nnotes.txt\n```\nline one\r\nline two\n```"

    def test_an_image(self, windows, server, tmp_path):
        from PIL import Image

        Image.new("RGB", (16, 8), "red").save(tmp_path / "red.png")
        assert windows.run("--base-url", server.url, "--image", "red.png", "What?").code == 0
        image = server.bodies[0]["messages"][0]["content"][1]["image_url"]["url"]
        assert image.startswith("data:image/png;base64,")

    def test_the_key_from_dotenv(self, windows, server, tmp_path):
        (tmp_path / ".env").write_text(f"OPENAI_API_KEY={FAKE_KEY}\n")
        done = windows.run("--base-url", server.url, "q", key=None)
        assert (done.code, done.err) == (0, "")
        assert server.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"

    def test_continue_and_chat_go_on_from_saved_turns(self, windows, server):
        server.reply(*(json_response(completion(answer)) for answer in ("a1", "a2", "b1", "b2")))
        assert windows.run("--base-url", server.url, "q1").code == 0
        assert windows.run("--base-url", server.url, "-c", "q2").code == 0
        assert sent(server.bodies[1]) == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
        for question in ("p1", "p2"):
            assert windows.run("--base-url", server.url, "--chat", "plan", question).code == 0
        assert sent(server.bodies[3]) == [("user", "p1"), ("assistant", "b1"), ("user", "p2")]
        assert saved(windows.state)["plan"][1]["assistant"] == "b2"
        assert len(turns(windows.state)) == 4

    def test_chats_show_and_forget(self, windows, server):
        assert windows.run("--base-url", server.url, "--chat", "kept", "Question?").code == 0
        listed = windows.run("--chats", key=None)
        assert (listed.code, listed.err) == (0, "")
        assert listed.out.split()[:3] == ["kept", "1", "turn"]
        shown = windows.run("--show", "kept", key=None)
        assert (shown.code, shown.err) == (0, "")
        assert "Question?" in shown.out and "Hello!" in shown.out
        forgotten = windows.run("--forget", "kept", key=None)
        assert (forgotten.code, forgotten.err) == (0, "")
        assert forgotten.out == f"forgot kept (deleted {windows.state / 'kept'}.jsonl)\n"
        assert saved(windows.state) == {}

    def test_no_save_keeps_nothing(self, windows, server):
        assert windows.run("--base-url", server.url, "--no-save", "q").out == "Hello!\n"
        assert not windows.state.exists()

    def test_verbose_curl_and_models(self, windows, server):
        traced = windows.run("-v", "--base-url", server.url, "q")
        assert traced.code == 0 and "> POST /v1/chat/completions" in traced.err
        curl = windows.run("--curl", "--base-url", server.url, "q")
        assert (curl.code, curl.err) == (0, "")
        assert curl.out.startswith("curl ") and f"{server.url}/chat/completions" in curl.out
        server.reply(json_response({"data": [{"id": "zeta"}, {"id": "alpha"}]}))
        assert windows.run("--base-url", server.url, "--models").out == "alpha\nzeta\n"

    def test_a_turn_after_a_torn_line_starts_on_a_line_of_its_own(self, windows, server):
        windows.state.mkdir()
        (windows.state / "torn.jsonl").write_bytes(b'{"user": {"role"')  # no pread: lseek
        done = windows.run("--base-url", server.url, "--chat", "torn", "q")
        assert done.code == 0 and "torn.jsonl line 1 is not a saved turn" in done.err
        lines = (windows.state / "torn.jsonl").read_bytes().split(b"\n")
        assert lines[0] == b'{"user": {"role"' and json.loads(lines[1])["assistant"] == "Hello!"


class TestWhatWindowsCannotTell:
    @pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
    def test_a_chunk_trickled_byte_by_byte_is_timed_without_an_alarm(self, windows, server, stream):
        # no alarm to end a chunk's read: each part of it is handed over, and the clock runs
        kind = "text/event-stream" if stream else "application/json"
        head = (
            f"HTTP/1.1 200 OK\r\nContent-Type: {kind}\r\nTransfer-Encoding: chunked\r\n"
            "Connection: close\r\n\r\nffff\r\n"
        ).encode()

        def trickle(conn, request):
            conn.sendall(head)
            for _ in range(40):
                nap(0.1)
                conn.sendall(b" ")

        server.reply(trickle)
        done = windows.run("--base-url", server.url, "--timeout", "1", "q")
        said = (
            "sent no data for 1 s, only keep-alives"
            if stream
            else ("sent its reply too slowly: not whole after 1 s")
        )
        assert (done.code, done.out, done.err) == (
            4,
            "",
            f"error: 127.0.0.1:{server.port} {said} (--timeout)\n",
        )

    def test_files_are_still_created_private(self, windows, server):
        assert windows.run("--base-url", server.url, "--chat", "mine", "q").code == 0
        assert stat.S_IMODE(windows.state.stat().st_mode) == 0o700
        assert stat.S_IMODE((windows.state / "mine.jsonl").stat().st_mode) == 0o600

    def test_ownership_and_mode_checks_are_skipped(self, windows, server):
        windows.state.mkdir()
        windows.state.chmod(0o777)  # Linux refuses this folder; Windows' stat cannot tell
        assert windows.run("--base-url", server.url, "q").code == 0
        assert len(turns(windows.state)) == 1

    def test_links_are_refused_by_lstat(self, windows, server, tmp_path):
        windows.state.mkdir()
        target = tmp_path / "target.txt"
        target.write_text("not yours")
        (windows.state / "planted.jsonl").symlink_to(target)
        done = windows.run("--base-url", server.url, "--chat", "planted", "q")
        assert (done.code, done.out) == (2, "")
        assert "is a symbolic link, which chat.py does not follow" in done.err
        assert windows.run("--base-url", server.url, "-c", "q").code == 2  # skipped: none left
        with pytest.raises(OSError, match="a symbolic link"):
            chat.open_private(str(windows.state / "planted.jsonl"), os.O_WRONLY | os.O_APPEND)
        assert target.read_text() == "not yours" and server.requests == []

    @pytest.mark.parametrize(
        "info, link",
        [
            (SimpleNamespace(st_mode=stat.S_IFLNK | 0o777), True),
            (SimpleNamespace(st_mode=stat.S_IFDIR, st_file_attributes=0x400), True),  # junction
            (SimpleNamespace(st_mode=stat.S_IFREG, st_file_attributes=0x20), False),  # archive
            (SimpleNamespace(st_mode=stat.S_IFREG | 0o600), False),
        ],
    )
    def test_a_reparse_point_is_a_link(self, info, link):
        assert chat.is_link(info) is link

    @pytest.mark.parametrize(
        "variables, folder",
        [
            ({}, "AppData/Local/chat-py"),
            ({"XDG_STATE_HOME": "{tmp}/xdg"}, "xdg/chat-py"),
            ({"XDG_STATE_HOME": "relative"}, "AppData/Local/chat-py"),  # ignored, as on Linux
            ({"CHAT_PY_HOME": "{tmp}/mine"}, "mine"),
            ({"LOCALAPPDATA": ""}, "home/AppData/Local/chat-py"),
        ],
    )
    def test_the_state_folder(self, windows, tmp_path, variables, folder):
        environ = {**windows.environ, "HOME": str(tmp_path / "home")}
        environ.update({name: value.format(tmp=tmp_path) for name, value in variables.items()})
        assert chat.state_dir(chat.Env(environ=environ)) == str(tmp_path / folder)

    @pytest.mark.parametrize(
        "variables, path",
        [
            ({}, "AppData/Roaming/chat-py/env"),
            ({"XDG_CONFIG_HOME": "{tmp}/xdg"}, "xdg/chat-py/env"),
            ({"XDG_CONFIG_HOME": "relative"}, "AppData/Roaming/chat-py/env"),  # as on Linux
            ({"CHAT_PY_CONFIG": "{tmp}/mine.env"}, "mine.env"),
            ({"APPDATA": ""}, "home/.config/chat-py/env"),
        ],
    )
    def test_the_settings_file(self, windows, tmp_path, variables, path):
        environ = {**windows.environ, "HOME": str(tmp_path / "home")}
        environ.update({name: value.format(tmp=tmp_path) for name, value in variables.items()})
        assert chat.settings_path(chat.Env(environ=environ)) == str(tmp_path / path)

    def test_the_settings_file_in_appdata_without_ownership_checks(self, windows, server):
        path = Path(windows.environ["APPDATA"], "chat-py", "env")
        write_settings(f"OPENAI_API_KEY={FAKE_KEY}\nOPENAI_BASE_URL={server.url}\n", path)
        path.chmod(0o666)  # Linux refuses this file; Windows' stat cannot tell
        CHOWN(path, 65534, 65534)  # and so would it this one, another user's
        done = windows.run("q", key=None)
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        assert server.requests[0].headers["authorization"] == f"Bearer {FAKE_KEY}"

    def test_a_settings_file_that_is_a_link_is_refused_by_lstat(self, windows, server, tmp_path):
        path = Path(windows.environ["APPDATA"], "chat-py", "env")
        path.parent.mkdir()
        path.symlink_to(write_settings(f"OPENAI_BASE_URL={server.url}\n", tmp_path / "real.env"))
        done = windows.run("q", key=None)
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            f"error: the settings file {path} is a symbolic link, which chat.py does not follow "
            "(put the file itself there)\n"
        )
        assert server.requests == []


class TestConversationModeWithoutReadline:
    def test_turns_go_on_and_banner_and_help_say_ctrl_z_then_enter(self, windows, server):
        server.reply(json_response(completion("a1")), json_response(completion("a2")))
        done = windows.run("--base-url", server.url, ttys=TERMINAL, lines=["q1", "/help", "q2"])
        assert (done.code, done.out) == (0, "a1\na2\n")
        assert done.err.split("\n")[2].endswith(LEAVES) and "Ctrl-D" not in done.err
        assert "\n/exit, /quit        leave (so do exit, quit and Ctrl-Z then Enter)\n" in done.err
        assert sent(server.bodies[1]) == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
        assert turns(windows.state) == [("q1", "a1"), ("q2", "a2")]

    def test_plain_lines_from_input_and_no_history(self, windows, server, monkeypatch):
        """input() itself, as on a Windows console: no readline to load, no history to keep."""
        typed = ["q1"]

        def read_line(prompt=""):
            if not typed:
                raise EOFError  # Ctrl-Z then Enter
            return typed.pop(0)

        monkeypatch.setattr(builtins, "input", read_line)  # what conversation mode edits with
        stdout, stderr = io.StringIO(), io.StringIO()
        env = chat.Env(
            io.BytesIO(),
            stdout,
            stderr,
            {"OPENAI_API_KEY": FAKE_KEY, **windows.environ},
            ".",
            TERMINAL,
            read_line,
            raise_bugs=True,
        )
        assert chat.main(["--base-url", server.url], env) == 0
        assert stdout.getvalue() == "Hello!\n" and LEAVES in stderr.getvalue()
        assert turns(windows.state) == [("q1", "Hello!")]
        assert not (windows.state / "history").exists()

    def test_resuming_names_the_turns(self, windows, server):
        assert windows.run("--base-url", server.url, "--chat", "plan", "q1").code == 0
        done = windows.run("--base-url", server.url, "--chat", "plan", ttys=TERMINAL, lines=[])
        assert done.code == 0 and "conversation plan · 1 turn · " + LEAVES in done.err


# ------------------------------------------------------------------ styling on a terminal


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakeConsole:
    """kernel32 as ctypes.windll has it: GetConsoleMode fills in the mode; set: what was set."""

    def __init__(self, can_set: bool):
        self.can_set, self.set = can_set, []

    def GetStdHandle(self, which):
        return {-12: 2}[which]

    def GetConsoleMode(self, handle, mode):
        mode._obj.value = 0x0003  # processed and wrapped output, as a console starts
        return 1

    def SetConsoleMode(self, handle, mode):
        self.set.append((handle, mode))
        return int(self.can_set)


def slow_reasoning(conn, request):
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n")
    nap(0.5)  # long enough for a spinner, were there one
    conn.sendall(chunk(reasoning_content="Thinking") + chunk("Answer.", finish_reason="stop"))
    conn.sendall(b"data: [DONE]\n\n")


def terminals(monkeypatch) -> SimpleNamespace:
    """This process's stdin, stdout and stderr made fake terminals, for Env.of_process() (in the
    test itself: pytest sets its own capturing streams again before the test runs)."""
    streams = SimpleNamespace(stdin=FakeTerminal(), stdout=FakeTerminal(), stderr=FakeTerminal())
    for name in ("stdin", "stdout", "stderr"):
        monkeypatch.setattr(sys, name, getattr(streams, name))
    return streams


class TestStylingOnAWindowsConsole:
    @pytest.mark.parametrize("can_set", [True, False])
    def test_virtual_terminal_processing_is_turned_on_or_no_styling(
        self, windows, monkeypatch, can_set
    ):
        import ctypes

        console = FakeConsole(can_set)
        monkeypatch.setattr(ctypes, "windll", SimpleNamespace(kernel32=console), raising=False)
        terminals(monkeypatch)
        assert chat.Env.of_process().styled is can_set
        assert console.set == [(2, 0x0003 | 0x0004)]

    def test_without_it_no_escape_codes_and_no_spinner(self, windows, server, monkeypatch):
        server.reply(slow_reasoning)
        terminal_streams = terminals(monkeypatch)
        for name, value in {"OPENAI_API_KEY": FAKE_KEY, **windows.environ}.items():
            monkeypatch.setenv(name, value)
        env = chat.Env.of_process()  # this machine has no ctypes.windll: it cannot be turned on
        env.raise_bugs = True
        assert (env.stderr_tty, env.styled, env.color) == (True, False, False)
        assert chat.main(["--base-url", server.url, "--stream", "q"], env) == 0
        assert terminal_streams.stdout.getvalue() == "Answer.\n"
        assert terminal_streams.stderr.getvalue() == "reasoning:\nThinking\n\n"

    def test_elsewhere_a_terminal_is_styled_as_before(self, monkeypatch):
        terminals(monkeypatch)
        env = chat.Env.of_process()
        assert (env.styled, env.color) == (True, True)


# ------------------------------------------------------------------ real processes


def test_a_real_process_without_the_posix_parts_answers_and_continues(windows, server):
    server.reply(json_response(completion("a1")), json_response(completion("a2")))
    first = windows.process("--base-url", server.url, "q1")
    assert (first.code, first.out, first.err) == (0, "a1\n", "")
    second = windows.process("--base-url", server.url, "-c", "q2")
    assert (second.code, second.out, second.err) == (0, "a2\n", "")
    assert sent(server.bodies[1]) == [("user", "q1"), ("assistant", "a1"), ("user", "q2")]
    assert turns(windows.state) == [("q1", "a1"), ("q2", "a2")]


def test_a_real_process_without_the_posix_parts_reads_the_settings_file(windows, server):
    write_settings(
        f"OPENAI_BASE_URL={server.url}\nOPENAI_MODEL=from-appdata\n",
        Path(windows.environ["APPDATA"], "chat-py", "env"),
    )
    done = windows.process("q", key=None)
    assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
    assert server.bodies[0]["model"] == "from-appdata"


@pytest.mark.parametrize("encoding", ["cp1252", "ascii"])
def test_a_pipe_gets_utf8_whatever_the_locales_encoding(cli, server, encoding):
    server.reply(
        json_response(completion(REPLY)),
        json_response({"error": {"message": f"no {REPLY}"}}, status=400),
    )
    done = cli.process("--base-url", server.url, "q", env={"PYTHONIOENCODING": encoding})
    assert (done.code, done.raw_out, done.err) == (0, f"{REPLY}\n".encode(), "")
    failed = cli.process("--base-url", server.url, "q", env={"PYTHONIOENCODING": encoding})
    assert (failed.code, failed.raw_out) == (1, b"")
    assert f"no {REPLY}" in failed.err  # decoded as UTF-8: exactly the bytes of the message


def test_a_terminal_gets_what_it_can_show(cli, server):
    pexpect = pytest.importorskip("pexpect")
    server.reply(json_response(completion(REPLY)))
    child = pexpect.spawn(
        sys.executable,
        [str(chat.__file__), "--base-url", server.url, "q"],
        env=cli.environ(FAKE_KEY, {"TERM": "dumb", "PYTHONIOENCODING": "ascii"}),
        cwd=str(cli.folder),
        timeout=20,
    )
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert child.before.endswith(b"na?ve caf? ?quoted? ? ?? ?\r\n")
