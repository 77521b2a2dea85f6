"""Pure functions of chat.py, called directly with inputs the command-line tests do not reach:
the question, file fences, URLs, hosts, -o values, one-line messages, keys, usage, commands
and retry timing. (What the command line shows of each is tested end to end elsewhere.)"""

import email.utils
import json

import pytest

import chat


@pytest.mark.parametrize(
    "words, piped, expected",
    [
        (["  spaced  "], "   \n", "spaced"),
        ([], None, ""),
        ([" ", ""], "\n\t", ""),
        (
            ["Explain"],
            "\n\n    indented()\n    code()\n\n",
            "Explain\n\n    indented()\n    code()",
        ),
    ],
)
def test_build_question_trims_blank_space_but_keeps_indentation(words, piped, expected):
    assert chat.build_question(words, piped) == expected


class TestFileBlock:
    @pytest.mark.parametrize(
        "text, fence", [("``````six", "```````"), ("`one`", "```"), ("", "```")]
    )
    def test_the_fence_is_longer_than_any_backtick_run(self, text, fence):
        block = chat.file_block("a.md", text)
        assert block.startswith(f"a.md\n{fence}\n") and block.endswith(f"\n{fence}")
        assert block[len(f"a.md\n{fence}\n") : -len(fence)].rstrip("\n") == text

    def test_the_closing_fence_has_a_line_of_its_own(self):
        assert chat.file_block("x", "last line") == "x\n```\nlast line\n```"
        assert chat.file_block("x", "ends\n") == "x\n```\nends\n```"


@pytest.mark.parametrize(
    "base_url, expected",
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://localhost:11434/v1//", "http://localhost:11434/v1/chat/completions"),
        (
            "https://r.openai.azure.com/openai/v1?api-version=preview",
            "https://r.openai.azure.com/openai/v1/chat/completions?api-version=preview",
        ),
        ("https://h/openai/v1/?a=1&b=2#frag", "https://h/openai/v1/chat/completions?a=1&b=2"),
    ],
)
def test_api_url_keeps_the_query_after_the_path(base_url, expected):
    assert chat.api_url(base_url, "/chat/completions") == expected


@pytest.mark.parametrize(
    "base_url, public",
    [
        ("https://user:secret@h.example:8443/v1?api-key=sk-xyz", "https://h.example:8443/v1"),
        ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
        ("http://[::1]:8080/v1", "http://[::1]:8080/v1"),
    ],
)
def test_public_url_has_no_user_password_or_query(base_url, public):
    assert chat.public_url(base_url) == public


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.5.0.1", True),
        ("::1", True),
        ("localhost", True),
        ("api.localhost", False),  # v4: a name goes to the resolver, which may send it anywhere
        ("10.0.0.1", False),
        ("example.com", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host, loopback):
    assert chat.is_loopback(host) is loopback


@pytest.mark.parametrize(
    "base_url, field",
    [
        # Hosts that only look like OpenAI's or Azure's (the real ones: test_request_options.py).
        ("https://notapi.openai.com/v1", "max_tokens"),
        ("https://services.ai.azure.com.example/v1", "max_tokens"),
        ("https://openrouter.ai/api/v1", "max_tokens"),
        (
            "https://my-project.services.ai.azure.com/openai/v1?api-version=preview",
            "max_completion_tokens",
        ),
    ],
)
def test_max_tokens_field_matches_whole_host_names(base_url, field):
    assert chat.max_tokens_field(base_url) == field


@pytest.mark.parametrize(
    "text, value",
    [
        ("0.5", 0.5),
        ("true", True),
        ('"quoted"', "quoted"),
        ('"[not JSON"', "[not JSON"),
        ("", ""),
        ("broken}", "broken}"),
        ("-Infinity", "-Infinity"),
    ],
)
def test_an_option_value_is_json_when_it_parses_else_text(text, value):
    assert chat.parse_options([["k", text]]) == [("k", value)]


def json_error(text: str) -> str:
    """What Python's json module says of text (its wording differs between Python versions)."""
    try:
        json.loads(text)
    except ValueError as exc:
        return str(exc)
    raise AssertionError(f"{text!r} is JSON")


@pytest.mark.parametrize("text", ["{broken", '[{"type": "function"', ' "open', '{"a": 1}}'])
def test_an_option_value_that_starts_like_json_but_breaks_is_a_usage_error(text):
    with pytest.raises(chat.UsageError) as raised:
        chat.parse_options([["tools", text]])
    assert str(raised.value) == f"-o tools is not valid JSON: {json_error(text)}"
    assert (
        raised.value.hint == "(to send text that starts so, write it as a JSON string: '\"...\"')"
    )


@pytest.mark.parametrize(
    "text, why",
    [("[1, NaN]", "NaN is no JSON number"), ("[" * 100_000, "it is nested too deeply")],
)
def test_nan_or_nesting_past_the_recursion_limit_is_a_usage_error(text, why):
    with pytest.raises(chat.UsageError) as raised:
        chat.parse_options([["tools", text]])
    assert str(raised.value) == f"-o tools is not valid JSON: {why}"


class TestOneLine:
    def test_long_text_is_cut_with_an_ellipsis(self):
        line = chat.one_line("word " * 200, room=50)
        assert len(line) == 50 and line.endswith("…")

    def test_line_breaks_and_runs_of_space_become_one_space(self):
        assert chat.one_line("a\n\n  b\r\tc") == "a b c"

    def test_data_urls_and_base64_runs_are_elided_before_cutting(self):
        data = "QUJD" * 250_000  # a megabyte of Base64
        text = f'bad request: {{"url": "data:image/png;base64,{data}"}} and raw {data[:3000]} end'
        assert chat.one_line(text) == (
            'bad request: {"url": "data:image/png;base64,…(1,000,000 '
            'characters)"} and raw …(3,000 characters of Base64) end'
        )

    def test_the_key_is_redacted_before_the_cut(self):
        key = "sk-test-not-a-real-key-0123456789"
        assert chat.one_line("x" * 35 + " " + key, (key,), room=50) == "x" * 35 + " [redacted]"

    def test_short_base64_looking_words_stay(self):
        assert chat.elide_base64("gpt-5.4-mini and abcdEFGH1234") == "gpt-5.4-mini and abcdEFGH1234"


def test_redact_replaces_every_occurrence_of_each_secret_but_not_short_ones():
    key, password = "sk-test-not-a-real-key-1234", "hunter2-password"
    assert chat.redact(f"a {key} b {key} {password}", (key, password)) == (
        "a [redacted] b [redacted] [redacted]"
    )
    assert chat.redact("none of the nonsense", ("none",)) == "none of the nonsense"


@pytest.mark.parametrize(
    "key, shown",
    [
        ("sk-test-not-a-real-key-WXYZ", "sk-…WXYZ"),
        ("local-token-abcdefgh", "…efgh"),
        ("sk-short", "sk-…"),
        ("x", "…"),
    ],
)
def test_mask_key_shows_at_most_the_last_four(key, shown):
    assert chat.mask_key(key) == shown


@pytest.mark.parametrize(
    "usage, line",
    [
        (None, "usage: not reported by the server"),
        ({}, "usage: not reported by the server"),
        ({"prompt_tokens": 3}, "usage: not reported by the server"),
        (
            {
                "prompt_tokens": 12,
                "completion_tokens": 34,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 20},
            },
            "usage: 12 in, 34 out, 0 cached, 20 reasoning",
        ),
        (
            {
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "prompt_tokens_details": None,
                "completion_tokens_details": {"reasoning_tokens": "x"},
            },
            "usage: 1 in, 2 out",
        ),
    ],
)
def test_usage_line(usage, line):
    assert chat.usage_line(usage) == line


@pytest.mark.parametrize(
    "usage",
    [
        ["not", "a", "dict"],
        {"completion_tokens_details": None},
        {"completion_tokens_details": {"reasoning_tokens": "64"}},
    ],
)
def test_a_limit_spent_on_reasoning_counts_only_reported_tokens(usage):
    reply = chat.Reply()
    reply.finish_reason, reply.usage = "length", usage
    assert chat.reply_warnings(reply) == [
        (
            "the token limit went to reasoning before any answer: "
            "raise --max-tokens or lower --reasoning-effort"
        )
    ]


@pytest.mark.parametrize(
    "line, name, argument",
    [
        ("/help", "/help", None),
        ("/model  tiny-model ", "/model", "tiny-model"),
        ("/system Be brief. Very.", "/system", "Be brief. Very."),
        ("/system ''", "/system", ""),
        ('/system "Be brief."', "/system", "Be brief."),
        ("/exit", "/exit", None),
        ("/quit", "/exit", None),
        ("/usr/bin/env is what?", None, None),
        ("//help", None, None),
        ("hello /help", None, None),
        ("/etc/hosts\nexplain this", None, None),
        ("", None, None),
    ],
)
def test_parse_command(line, name, argument):
    handler = chat.COMMAND_NAMED[name][3] if name else None
    assert chat.parse_command(line) == (handler, argument)


def test_an_unknown_command_is_an_error_not_a_message():
    with pytest.raises(chat.UsageError, match=r"^unknown command /frobnicate$"):
        chat.parse_command("/frobnicate")


class TestRetryTiming:
    NOW = 1_700_000_000.0

    @pytest.mark.parametrize(
        "headers, expected",
        [
            ({}, None),
            ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
            ({"retry-after": "1.5"}, 1.5),
            ({"retry-after": "-4"}, 0.0),
            ({"retry-after": email.utils.formatdate(NOW + 30, usegmt=True)}, 30.0),
            ({"retry-after": email.utils.formatdate(NOW - 30, usegmt=True)}, 0.0),
            ({"retry-after": "not a date"}, None),
            ({"retry-after": "nan"}, None),
            ({"retry-after-ms": "inf", "retry-after": "2"}, 2.0),
            ({"retry-after": "1e400"}, None),
        ],
    )
    def test_parse_retry_after(self, headers, expected):
        assert chat.parse_retry_after(headers, now=self.NOW) == expected

    @pytest.mark.parametrize(
        "attempt, rand, expected",
        [
            (0, 0.0, 0.5),
            (0, 1.0, 0.375),
            (1, 0.0, 1.0),
            (2, 0.0, 2.0),
            (3, 0.0, 4.0),
            (4, 0.0, 8.0),
            (5, 0.0, 8.0),
            (9, 1.0, 6.0),
        ],
    )
    def test_backoff_doubles_caps_and_jitters(self, attempt, rand, expected):
        assert chat.backoff_delay(attempt, rand=lambda: rand) == pytest.approx(expected)
