"""Where settings come from (v4): the user's own settings file, what it may set and when it is
refused, the precedence of every place a setting comes from, base URLs as requests reads them,
and the whole way to the state folder.

Each attack is run as an attacker would: a URL that two parsers read two ways, with a proxy
that must see nothing; a file or link of another user (uid 65534: the suite runs as root, so
os.chown and os.lchown can make one); a folder on the way that others can write to."""

import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest
from conftest import (
    FAKE_KEY,
    completion,
    json_response,
    saved,
    settings_file,
    write_settings,
)

import chat

OTHER_USER = 65534  # nobody
SETTINGS_NAMES = "OPENAI_API_KEY, OPENAI_BASE_URL, OPENAI_MODEL, CHAT_PY_HOME, CHAT_PY_NO_SAVE"


@pytest.fixture
def proxy(another_server, monkeypatch):
    """A proxy for everything, set in this process's environment as a user's shell sets it
    (requests reads it there): whatever chat.py would send, to any host, goes to it."""
    fake = another_server().reply(json_response(completion("via the proxy")))
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.setenv(name, fake.url.removesuffix("/v1"))
    monkeypatch.setenv("NO_PROXY", "")
    return fake


# ------------------------------------------------------------ base URLs as requests reads them


class TestBaseUrlAsRequestsReadsIt:
    """A URL that chat.py's parser and requests' would read as two hosts is refused before
    anything is sent: the proxy, which would see any request to any host, sees nothing."""

    @pytest.mark.parametrize(
        "url, shown",
        [
            # urlsplit: user "collector.example\", host 127.0.0.1; urllib3: host collector.example
            (r"http://collector.example\@127.0.0.1:{port}/v1", None),
            # the other way round; urlsplit reads "{port}\" as a password, so it is not shown
            (
                r"http://127.0.0.1:{port}\@collector.example/v1",
                "http://127.0.0.1:***@collector.example/v1",
            ),
            ("http://collector.example @127.0.0.1:{port}/v1", None),
            ("http://[127.0.0.1]:{port}/v1", None),
            ("http://[::1:{port}/v1", None),
            ("http://collectör.example/v1", None),
        ],
    )
    def test_refused_from_the_command_line(self, cli, server, proxy, url, shown):
        url = url.format(port=server.port)
        done = cli("--base-url", url, "the diff")
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            "error: --base-url must be a plain http:// or https:// URL with a valid host and "
            f"port, not '{shown or url}'\n"
        )
        assert proxy.requests == [] and server.requests == []

    @pytest.mark.parametrize("where", ["environment", "settings file"])
    def test_refused_from_the_environment_and_the_settings_file(self, cli, server, proxy, where):
        url = rf"http://collector.example\@127.0.0.1:{server.port}/v1"
        env = {"OPENAI_BASE_URL": url} if where == "environment" else {}
        if where == "settings file":
            write_settings(f"OPENAI_BASE_URL={url}\n")
        done = cli("the diff", env=env)
        source = "OPENAI_BASE_URL" + ("" if env else f" in {settings_file()}")
        assert (done.code, done.out) == (2, "")
        assert done.err == (
            f"error: {source} must be a plain http:// or https:// URL with a valid host and port, "
            f"not '{url}'\n"
        )
        assert proxy.requests == [] and server.requests == []

    def test_refused_in_a_real_process(self, cli, server, another_server):
        """As the review ran it: a real process, the proxy in its environment."""
        proxy = another_server()
        origin = proxy.url.removesuffix("/v1")
        url = rf"http://collector.example\@127.0.0.1:{server.port}/v1"
        done = cli.process(
            "the diff", env={"OPENAI_BASE_URL": url, "HTTP_PROXY": origin, "ALL_PROXY": origin}
        )
        assert (done.code, done.out) == (2, "")
        assert done.err.count("\n") == 1 and done.err.startswith("error: OPENAI_BASE_URL must")
        assert proxy.requests == [] and server.requests == []

    @pytest.mark.parametrize(
        "url, host, saved_url",
        [
            ("http://models.example/v1", "models.example", "http://models.example/v1"),
            (
                "HTTP://Models.Example:8080/v1/",
                "models.example:8080",
                "http://Models.Example:8080/v1/",
            ),
            ("http://user:pw@[::1]:8080/v1", "[::1]:8080", "http://[::1]:8080/v1"),
            ("http://127.0.0.1:8080#@collector.example/v1", "127.0.0.1:8080", None),
        ],
    )
    def test_a_plain_url_goes_where_it_says(self, cli, proxy, url, host, saved_url):
        """The proxy sees what requests sends: the host chat.py decided on, shows and saves."""
        done = cli("--base-url", url, "q")
        assert (done.code, done.out) == (0, "via the proxy\n")
        [request] = proxy.requests
        assert request.path.startswith(f"http://{host}/")
        if saved_url:
            [[turn]] = saved().values()
            assert turn["base_url"] == saved_url

    @pytest.mark.parametrize("host", ["api.localhost", "localhost.example.com", "127.0.0.1.nip.io"])
    def test_a_name_that_looks_local_is_not_loopback(self, cli, proxy, host):
        done = cli("--base-url", f"http://{host}/v1", "q")
        assert done.err == f"warning: sending the API key unencrypted to {host} over http://\n"


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:8080/v1",
        "https://api.openai.com/v1",
        "HTTP://Models.Example:8080/v1/",
        "http://user:p%40ss@127.0.0.1:1/v1?x=1#y",
        "http://[::1]:8080/v1",
        "http://[2001:db8::1]/v1",
        "http://my_host-1.internal:65535",
        "http://" + "a." * 126 + "b/v1",  # 253 characters
    ],
)
def test_check_base_url_takes_a_plain_url(url):
    assert chat.check_base_url(url, "--base-url") == url


@pytest.mark.parametrize(
    "url",
    [
        r"http://collector.example\@127.0.0.1/v1",
        r"http://127.0.0.1\@collector.example/v1",
        r"http://127.0.0.1/v1\..\x",
        "http://collector.example @127.0.0.1/v1",
        "http://collector.example%5C@127.0.0.1%2F/v1",
        "http://a@b@127.0.0.1/v1",
        "http://collector.example\t@127.0.0.1/v1",
        "http://[127.0.0.1]/v1",
        "http://[::1/v1",
        "http://[::1%25eth0]/v1",
        "http://[1:2:3]/v1",
        "http://collector..example/v1",
        "http://.example/v1",
        "http://" + "a" * 64 + ".example/v1",
        "http://" + "a." * 127 + "b/v1",  # 255 characters
        "http://collectör.example/v1",
        "http://127.0.0.1:8080:80/v1",
        "http://127.0.0.1:99999/v1",
        "http://127.0.0.1:0/v1",
        "http://127.0.0.1:/v1",
        "http:///v1",
        "ftp://example.com",
        "localhost:8080/v1",
        "",
    ],
)
def test_check_base_url_refuses_what_could_be_read_two_ways(url):
    with pytest.raises(chat.UsageError, match="^--base-url must be a plain http:// or https://"):
        chat.check_base_url(url, "--base-url")


# ------------------------------------------------------------ the user's own settings file


@pytest.fixture
def short_home(monkeypatch):
    """HOME in a short folder of /tmp, so that the messages that name paths there twice fit in
    one line (a pytest tmp_path is long enough to have them cut with …)."""
    folder = Path(tempfile.mkdtemp(prefix="chat-py-"))
    (folder / "home").mkdir()
    monkeypatch.setenv("HOME", str(folder / "home"))
    yield folder
    shutil.rmtree(folder)


def test_each_setting_the_file_can_hold(cli, server, tmp_path):
    """Key, base URL, model and state folder from the file: no --base-url, nothing exported."""
    folder = tmp_path / "chats-from-settings"
    settings = (
        "OPENAI_API_KEY=sk-test-from-the-settings-file\n"
        f"OPENAI_BASE_URL={server.url}\n"
        "OPENAI_MODEL=model-from-settings\n"
        f"CHAT_PY_HOME={folder}\n"
    )
    write_settings(settings)
    done = cli("q", key=None, env={"CHAT_PY_HOME": ""})
    assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
    [request] = server.requests
    assert request.headers["authorization"] == "Bearer sk-test-from-the-settings-file"
    assert request.body["model"] == "model-from-settings"
    assert list(saved(folder)) and not (tmp_path / "state").exists()
    assert cli("--chats", key=None, env={"CHAT_PY_HOME": ""}).out.startswith(
        next(iter(saved(folder)))
    )
    write_settings(settings + "CHAT_PY_NO_SAVE=1\n")
    assert cli("again", key=None, env={"CHAT_PY_HOME": ""}).code == 0
    assert [len(turns) for turns in saved(folder).values()] == [1]  # nothing more saved
    assert not {"OPENAI_BASE_URL", "OPENAI_MODEL", "CHAT_PY_NO_SAVE"} & set(os.environ)


@pytest.mark.parametrize("where", ["settings file", ".env", "environment"])
def test_curl_reads_the_key_from_the_environment(cli, server, tmp_path, where):
    """--curl writes $OPENAI_API_KEY, never the key: a key read from a file needs exporting
    first, and chat.py says so."""
    key = "sk-test-for-the-curl-command"
    if where == "settings file":
        write_settings(f"OPENAI_API_KEY={key}\n")
    elif where == ".env":
        (tmp_path / ".env").write_text(f"OPENAI_API_KEY={key}\n")
    done = cli("--base-url", server.url, "--curl", "q", key=key if where == "environment" else None)
    assert done.code == 0 and server.requests == []
    assert '-H "Authorization: Bearer $OPENAI_API_KEY"' in done.out
    assert key not in done.out + done.err
    assert done.err == (
        ""
        if where == "environment"
        else "warning: the key came from a file: export OPENAI_API_KEY for the command to send it\n"
    )


def test_other_names_and_broken_lines_are_warnings(cli, server, another_server):
    """The file may set five names; a proxy or anything else in it is ignored, and never
    reaches requests."""
    proxy = another_server()
    path = write_settings(
        f"OPENAI_BASE_URL={server.url}\nHTTP_PROXY={proxy.url}\nEDITOR=vi\nbroken 'line\n"
    )
    done = cli("q")
    assert (done.code, done.out) == (0, "Hello!\n")
    assert done.err == (
        f"warning: {path}: could not parse statement starting at line 4 (skipped)\n"
        f"warning: {path}: EDITOR, HTTP_PROXY ignored: it sets only {SETTINGS_NAMES}\n"
    )
    assert proxy.requests == [] and len(server.requests) == 1
    assert "HTTP_PROXY" not in os.environ


LAYERS = ("command line", "environment", ".env", "settings file", "default")


@pytest.mark.parametrize("args", [["--chats"], ["q"]], ids=["--chats", "a question"])
def test_a_nul_in_the_state_folders_name_is_a_usage_error(cli, server, tmp_path, args):
    # os.lstat raised ValueError (exit 70), for a question after the reply was shown
    write_settings(f"CHAT_PY_HOME={tmp_path}/x\0y\n")
    done = cli("--base-url", server.url, *args, env={"CHAT_PY_HOME": ""})
    assert (done.code, done.out) == (2, "")
    assert done.err == f"error: no file can be named '{tmp_path}/x\\x00y'\n"
    assert server.requests == []


@pytest.mark.parametrize("top", LAYERS)
def test_precedence_model_key_and_state_folder(cli, server, tmp_path, top):
    """Each layer from top down sets every name it can; the highest one present wins, name by
    name: the command line, the environment, ./.env (key and model only), the settings file."""
    present = LAYERS[LAYERS.index(top) :]
    args, env = ["--base-url", server.url], {"CHAT_PY_HOME": ""}
    if "command line" in present:
        args += ["-m", "model-from-command-line"]
    if "environment" in present:
        env.update(OPENAI_MODEL="model-from-environment", CHAT_PY_HOME=str(tmp_path / "env-chats"))
    if ".env" in present:
        (tmp_path / ".env").write_text(
            "OPENAI_API_KEY=sk-test-from-dotenv\nOPENAI_MODEL=model-from-dotenv\n"
            f"CHAT_PY_HOME={tmp_path / 'dotenv-chats'}\n"
        )
    if "settings file" in present:
        write_settings(
            "OPENAI_API_KEY=sk-test-from-settings\nOPENAI_MODEL=model-from-settings\n"
            f"CHAT_PY_HOME={tmp_path / 'settings-chats'}\n"
        )
    done = cli(*args, "q", key=FAKE_KEY if "environment" in present else None, env=env)
    assert (done.code, done.out) == (0, "Hello!\n")
    assert done.err == (
        f"warning: .env: CHAT_PY_HOME ignored: a .env sets only the key and model; set the "
        f"others in your shell (a base URL also with --base-url or in {settings_file()})\n"
        if ".env" in present
        else ""
    )

    def highest(values: dict):
        return next((values[layer] for layer in present if layer in values), values["default"])

    [request] = server.requests
    assert request.body["model"] == highest(
        {
            "command line": "model-from-command-line",
            "environment": "model-from-environment",
            ".env": "model-from-dotenv",
            "settings file": "model-from-settings",
            "default": chat.DEFAULT_MODEL,
        }
    )
    key = highest(
        {
            "environment": FAKE_KEY,
            ".env": "sk-test-from-dotenv",
            "settings file": "sk-test-from-settings",
            "default": None,
        }
    )
    assert request.headers.get("authorization") == (key and f"Bearer {key}")
    folder = highest(
        {
            "environment": tmp_path / "env-chats",
            "settings file": tmp_path / "settings-chats",
            "default": Path(os.environ["HOME"], ".local", "state", "chat-py"),
        }
    )
    assert list(saved(folder)) and not (tmp_path / "dotenv-chats").exists()


@pytest.mark.parametrize(
    "top, answered_by",
    [
        ("command line", "command line"),
        ("environment", "environment"),
        (".env", "settings file"),  # a .env never chooses
        ("settings file", "settings file"),
    ],
)
def test_precedence_base_url(cli, another_server, tmp_path, top, answered_by):
    servers = {
        layer: another_server().reply(json_response(completion(f"from the {layer}")))
        for layer in LAYERS[:4]
    }
    present = LAYERS[LAYERS.index(top) :]
    args = ["--base-url", servers["command line"].url] if "command line" in present else []
    env = {"OPENAI_BASE_URL": servers["environment"].url} if "environment" in present else {}
    if ".env" in present:
        (tmp_path / ".env").write_text(f"OPENAI_BASE_URL={servers['.env'].url}\n")
    write_settings(f"OPENAI_BASE_URL={servers['settings file'].url}\n")
    done = cli(*args, "q", key=None, env=env)
    assert (done.code, done.out) == (0, f"from the {answered_by}\n")
    assert [layer for layer, fake in servers.items() if fake.requests] == [answered_by]


PLACES = ("home/.config/chat-py/env", "xdg/chat-py/env", "mine.env")


@pytest.mark.parametrize(
    "variables, where",
    [
        ({}, PLACES[0]),
        ({"XDG_CONFIG_HOME": "xdg"}, PLACES[1]),
        ({"XDG_CONFIG_HOME": "relative/xdg"}, PLACES[0]),  # ignored, as the XDG spec says
        ({"CHAT_PY_CONFIG": "mine.env", "XDG_CONFIG_HOME": "xdg"}, PLACES[2]),
    ],
)
def test_where_the_settings_file_is(cli, server, tmp_path, variables, where):
    for place in PLACES:
        write_settings(f"OPENAI_MODEL=model-from-{Path(place).parts[0]}\n", tmp_path / place)
    env = {
        name: value if value.startswith("relative") else str(tmp_path / value)
        for name, value in variables.items()
    }
    done = cli("--base-url", server.url, "q", env=env)
    assert (done.code, done.err) == (0, "")
    assert server.bodies[0]["model"] == f"model-from-{Path(where).parts[0]}"
    shown = "".join(cli("--help", env=env).out.split())  # the path, however the help wraps it
    assert str(tmp_path / where) in shown


@pytest.mark.parametrize("name", ["CHAT_PY_CONFIG", "XDG_CONFIG_HOME"])
def test_a_dotenv_cannot_name_another_settings_file(cli, server, another_server, tmp_path, name):
    """A repository's own files are the user's and 0644, so they would pass every check: a .env
    must not be able to point chat.py at one."""
    collector = another_server()
    planted = tmp_path / "planted" / "chat-py" / "env"
    write_settings(f"OPENAI_BASE_URL={collector.url}\n", planted)
    value = planted if name == "CHAT_PY_CONFIG" else planted.parent.parent
    (tmp_path / ".env").write_text(f"{name}={value}\n")
    done = cli("--base-url", server.url, "q")
    assert (done.code, done.out) == (0, "Hello!\n")
    assert done.err.startswith(f"warning: .env: {name} ignored: a .env sets only the key and model")
    assert collector.requests == [] and len(server.requests) == 1


class TestRefusedSettingsFile:
    """A settings file that another user could change, or that is no small regular file, is
    refused: exit 2, one line naming the file and the fix; nothing is sent."""

    @pytest.fixture
    def settings(self, server, short_home) -> Path:
        return write_settings(f"OPENAI_API_KEY=sk-test-in-settings\nOPENAI_BASE_URL={server.url}\n")

    def refused(self, cli, server, message: str) -> None:
        done = cli("q", key=None)
        assert (done.code, done.out, done.err) == (2, "", f"error: {message}\n")
        assert server.requests == []

    @pytest.mark.parametrize(
        "change, uid, mode",
        [
            (lambda path: os.chown(path, OTHER_USER, OTHER_USER), OTHER_USER, "600"),
            (lambda path: path.chmod(0o620), os.getuid(), "620"),
            (lambda path: path.chmod(0o602), os.getuid(), "602"),
        ],
        ids=["another user's", "group-writable", "writable by others"],
    )
    def test_one_another_user_can_change(self, cli, server, settings, change, uid, mode):
        change(settings)
        self.refused(
            cli,
            server,
            f"the settings file {settings} can be changed by another user (owner uid {uid}, "
            f"mode {mode}), who could send your questions anywhere "
            f"({'' if uid == os.getuid() else 'chown it to yourself, then '}chmod 600 {settings})",
        )

    def test_a_symbolic_link(self, cli, server, settings, short_home):
        real = settings.rename(short_home / "real-settings")
        settings.symlink_to(real)
        self.refused(
            cli,
            server,
            f"the settings file {settings} is a symbolic link, which chat.py does not follow "
            "(put the file itself there)",
        )

    @pytest.mark.parametrize("kind", ["fifo", "folder"])
    def test_no_regular_file(self, cli, server, settings, kind):
        settings.unlink()
        os.mkfifo(settings) if kind == "fifo" else settings.mkdir()
        message = f"error: cannot read the settings file {settings}: not a regular file\n"
        if kind == "fifo":  # a real process, which would wait forever for a writer
            done = cli.process("q", key=None, timeout=20)
            assert (done.code, done.out, done.err) == (2, "", message)
        else:
            self.refused(cli, server, message.removeprefix("error: ").rstrip("\n"))

    def test_too_large(self, cli, server, settings):
        settings.write_text(settings.read_text() + "#" * 64 * 1024)
        self.refused(cli, server, f"the settings file {settings} is larger than 64 KiB")

    def test_its_folder_writable_by_others(self, cli, server, settings):
        settings.parent.chmod(0o777)
        self.refused(
            cli,
            server,
            f"the folder {settings.parent}, on the way to {settings}, can be changed by another "
            f"user, who could swap what is in it (chmod go-w {settings.parent} if it is yours, "
            "or use another folder)",
        )

    def test_its_folder_another_users_link(self, cli, server, settings, short_home):
        real = settings.parent.rename(short_home / "real-config")
        settings.parent.symlink_to(real)
        os.lchown(settings.parent, OTHER_USER, OTHER_USER)
        self.refused(
            cli,
            server,
            f"{settings.parent} is a symbolic link of another user (uid {OTHER_USER}), who can "
            "point it anywhere (remove it, or use a folder of your own)",
        )

    def test_a_good_one_is_read(self, cli, server, settings):
        """The same file, untouched: what every test above changes is what they refuse."""
        assert cli("q", key=None).code == 0
        assert server.requests[0].headers["authorization"] == "Bearer sk-test-in-settings"


# ------------------------------------------------------------ the way to the state folder


class TestTheWayToTheStateFolder:
    """A state folder that is another user's link, or one below a folder they can change, is
    refused like a group-writable folder: loading is exit 2, saving a warning."""

    def outcomes(self, cli, server, folder: str, message: str) -> None:
        """A question is answered but not saved; --chats and -c are exit 2, sending nothing."""
        env = {"CHAT_PY_HOME": folder}  # "": the default, ~/.local/state/chat-py
        done = cli("--base-url", server.url, "q", env=env)
        assert (done.code, done.out) == (0, "Hello!\n")
        assert done.err == f"warning: could not save the conversation: {message}\n"
        for args in (["--chats"], ["--base-url", server.url, "-c", "go on"]):
            done = cli(*args, env=env)
            assert (done.code, done.out, done.err) == (2, "", f"error: {message}\n")
        assert len(server.requests) == 1

    def test_another_users_link_as_the_state_folder(self, cli, server, tmp_path):
        target = tmp_path / "target"
        target.mkdir(mode=0o700)  # a folder of the user's own: only the link is theirs
        link = tmp_path / "chats"
        link.symlink_to(target)
        os.lchown(link, OTHER_USER, OTHER_USER)
        self.outcomes(
            cli,
            server,
            str(link),
            f"{link} is a symbolic link of another user (uid {OTHER_USER}), who can point it "
            "anywhere (remove it, or use a folder of your own)",
        )
        assert list(target.iterdir()) == []

    def test_another_users_link_as_a_parent_chat_py_would_create(self, cli, server, tmp_path):
        """~/.local is their link: the default state folder, ~/.local/state/chat-py, is refused."""
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        local = Path(os.environ["HOME"], ".local")
        local.symlink_to(elsewhere)
        os.lchown(local, OTHER_USER, OTHER_USER)
        self.outcomes(
            cli,
            server,
            "",
            f"{local} is a symbolic link of another user (uid {OTHER_USER}), who can point it "
            "anywhere (remove it, or use a folder of your own)",
        )
        assert list(elsewhere.iterdir()) == []

    @pytest.mark.parametrize("kind", ["writable by others", "another user's"])
    def test_a_folder_on_the_way_another_user_can_change(self, cli, server, short_home, kind):
        shared = short_home / "shared"
        shared.mkdir()
        if kind == "writable by others":
            shared.chmod(0o777)
        else:
            os.chown(shared, OTHER_USER, OTHER_USER)
        folder = shared / "me" / "chats"
        self.outcomes(
            cli,
            server,
            str(folder),
            f"the folder {shared}, on the way to {folder}, can be changed by another user, who "
            f"could swap what is in it (chmod go-w {shared} if it is yours, or use another "
            "folder)",
        )

    @pytest.mark.parametrize("through", ["sticky folder", "own link"])
    def test_a_sticky_folder_and_ones_own_link_are_fine(self, cli, server, tmp_path, through):
        """/tmp is writable by all but sticky: no one can move what is another's in it."""
        sticky = tmp_path / "tmp"
        sticky.mkdir()
        sticky.chmod(0o1777)
        assert sticky.stat().st_mode & stat.S_ISVTX
        folder = sticky / "chats"
        if through == "own link":
            (tmp_path / "mine").mkdir(mode=0o700)
            folder.symlink_to(tmp_path / "mine")
        env = {"CHAT_PY_HOME": str(folder)}
        done = cli("--base-url", server.url, "q", env=env)
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        done = cli("--base-url", server.url, "-c", "go on", env=env)
        assert (done.code, done.out, done.err) == (0, "Hello!\n", "")
        [turns] = saved(folder).values()
        assert len(turns) == 2
