"""Pure functions of chat.py, called directly: question, messages, body, URLs, keys, retry timing."""

import email.utils

import pytest

import chat


class TestBuildQuestion:
    @pytest.mark.parametrize(
        "words, piped, expected",
        [
            (["Write", "a", "haiku"], None, "Write a haiku"),
            (["Review", "this"], "diff --git a b\n+x\n", "Review this\n\ndiff --git a b\n+x"),
            ([], "just the piped text\n", "just the piped text"),
            (["  spaced  "], "   \n", "spaced"),
            ([], None, ""),
            ([" ", ""], "\n\t", ""),
            (["Explain"], "\n\n    indented()\n    code()\n\n", "Explain\n\n    indented()\n    code()"),
        ],
    )
    def test_joins_question_and_stdin(self, words, piped, expected):
        assert chat.build_question(words, piped) == expected


class TestMessages:
    def test_plain_question_is_a_string_content(self):
        assert chat.build_user_message("hi", [], None) == {"role": "user", "content": "hi"}

    def test_images_follow_the_text_part_in_order(self):
        message = chat.build_user_message("what?", ["data:a", "https://b"], None)
        assert message["content"] == [
            {"type": "text", "text": "what?"},
            {"type": "image_url", "image_url": {"url": "data:a"}},
            {"type": "image_url", "image_url": {"url": "https://b"}},
        ]

    def test_detail_is_sent_only_when_given(self):
        message = chat.build_user_message("q", ["https://x/y.png"], "low")
        assert message["content"][1]["image_url"] == {"url": "https://x/y.png", "detail": "low"}

    def test_system_prompt_then_saved_turns_then_the_question(self):
        user = {"role": "user", "content": "q2"}
        turns = [{"time": "t", "model": "m", "user": {"role": "user", "content": "q1"}, "assistant": "a1"}]
        messages = chat.build_messages(turns, user, "be brief")
        assert messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"},
                            {"role": "assistant", "content": "a1"}, user]
        assert chat.build_messages([], user, None) == [user]
        assert chat.build_messages([], user, "") == [user]  # -s '' means no system prompt


def settings(base_url="http://h/v1", **fields):
    return chat.Settings(model="m", base_url=base_url, **fields)


class TestBody:
    MESSAGES = [{"role": "user", "content": "q"}]

    def test_only_given_options_are_sent(self):
        body = chat.build_body(settings("https://api.openai.com/v1"), self.MESSAGES)
        assert body == {"model": "m", "messages": self.MESSAGES}

    def test_temperature_zero_is_sent(self):
        assert chat.build_body(settings(temperature=0.0), self.MESSAGES)["temperature"] == 0.0

    def test_stream_flag(self):
        assert chat.build_body(settings(stream=True), self.MESSAGES)["stream"] is True

    def test_reasoning_effort_is_any_string(self):
        body = chat.build_body(settings(reasoning_effort="xhigh"), self.MESSAGES)
        assert body["reasoning_effort"] == "xhigh"

    def test_stream_options_only_when_streaming_with_usage(self):
        assert "stream_options" not in chat.build_body(settings(usage=True), self.MESSAGES)
        assert "stream_options" not in chat.build_body(settings(stream=True), self.MESSAGES)
        body = chat.build_body(settings(stream=True, usage=True), self.MESSAGES)
        assert body["stream_options"] == {"include_usage": True}

    def test_options_go_last_and_null_removes(self):
        options = [("model", "other"), ("temperature", None), ("max_tokens", None), ("seed", 7),
                   ("stop", ["\n"])]
        body = chat.build_body(settings(temperature=1.0, max_tokens=9, options=options), self.MESSAGES)
        assert body == {"model": "other", "messages": self.MESSAGES, "seed": 7, "stop": ["\n"]}

    @pytest.mark.parametrize(
        "base_url, field",
        [
            ("https://api.openai.com/v1", "max_completion_tokens"),
            ("https://eu.api.openai.com/v1", "max_completion_tokens"),
            ("https://my-resource.openai.azure.com/openai/v1", "max_completion_tokens"),
            ("https://my-resource.cognitiveservices.azure.com/openai/v1", "max_completion_tokens"),
            ("https://my-project.services.ai.azure.com/openai/v1?api-version=preview",
             "max_completion_tokens"),
            ("http://127.0.0.1:8080/v1", "max_tokens"),
            ("https://openrouter.ai/api/v1", "max_tokens"),
            ("https://api.openai.com.evil.example/v1", "max_tokens"),
            ("https://notapi.openai.com/v1", "max_tokens"),
            ("https://services.ai.azure.com.example/v1", "max_tokens"),
        ],
    )
    def test_max_tokens_name_depends_on_host(self, base_url, field):
        body = chat.build_body(settings(base_url, max_tokens=5), self.MESSAGES)
        assert body[field] == 5
        assert len(body) == 3


class TestRequestOptions:
    @pytest.mark.parametrize(
        "text, value",
        [("42", 42), ("0.5", 0.5), ("true", True), ("null", None), ('["\\n"]', ["\n"]),
         ('{"type": "json_object"}', {"type": "json_object"}), ("low", "low"), ("NaN", "NaN"),
         ("Infinity", "Infinity"), ("[1, NaN]", "[1, NaN]"), ('"quoted"', "quoted"), ("", ""),
         ("{broken", "{broken")],
    )
    def test_value_is_json_when_it_parses_else_text(self, text, value):
        assert chat.parse_options([["k", text]]) == [("k", value)]

    @pytest.mark.parametrize("key", ["messages", "stream"])
    def test_fields_chat_py_builds_are_refused(self, key):
        with pytest.raises(chat.UsageError):
            chat.parse_options([["seed", "1"], [key, "[]"]])


class TestFiles:
    @pytest.mark.parametrize(
        "text, fence",
        [("plain", "```"), ("has ``` inside", "````"), ("``````six", "```````"), ("`one`", "```"),
         ("", "```")],
    )
    def test_fence_is_longer_than_any_backtick_run(self, text, fence):
        block = chat.file_block("a.md", text)
        assert block.startswith(f"a.md\n{fence}\n") and block.endswith(f"\n{fence}")
        assert block[len(f"a.md\n{fence}\n"):-len(fence)].rstrip("\n") == text

    def test_the_closing_fence_has_a_line_of_its_own(self):
        assert chat.file_block("x", "last line") == "x\n```\nlast line\n```"
        assert chat.file_block("x", "ends\n") == "x\n```\nends\n```"

    def test_files_follow_the_question_and_stdin(self):
        assert chat.build_question(["Compare"], "piped\n", ["f1", "f2"]) == "Compare\n\npiped\n\nf1\n\nf2"
        assert chat.build_question([], None, ["only"]) == "only"


@pytest.mark.parametrize(
    "base_url, expected",
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://localhost:11434/v1//", "http://localhost:11434/v1/chat/completions"),
        ("https://r.openai.azure.com/openai/v1?api-version=preview",
         "https://r.openai.azure.com/openai/v1/chat/completions?api-version=preview"),
        ("https://h/openai/v1/?a=1&b=2#frag", "https://h/openai/v1/chat/completions?a=1&b=2"),
    ],
)
def test_api_url_keeps_the_query_after_the_path(base_url, expected):
    assert chat.api_url(base_url, "/chat/completions") == expected


@pytest.mark.parametrize(
    "base_url, public",
    [("https://user:secret@h.example:8443/v1?api-key=sk-xyz", "https://h.example:8443/v1"),
     ("http://127.0.0.1:8080/v1", "http://127.0.0.1:8080/v1"),
     ("http://[::1]:8080/v1", "http://[::1]:8080/v1")],
)
def test_public_url_has_no_user_password_or_query(base_url, public):
    assert chat.public_url(base_url) == public


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("localhost", True),
     ("api.localhost", True), ("10.0.0.1", False), ("example.com", False), ("", False)],
)
def test_is_loopback(host, loopback):
    assert chat.is_loopback(host) is loopback


class TestOneLine:
    def test_long_text_is_cut_with_an_ellipsis(self):
        line = chat.one_line("word " * 200, room=50)
        assert len(line) == 50 and line.endswith("…")

    def test_line_breaks_and_runs_of_space_become_one_space(self):
        assert chat.one_line("a\n\n  b\r\tc") == "a b c"

    def test_data_urls_and_base64_runs_are_elided_before_cutting(self):
        data = "QUJD" * 250_000  # a megabyte of Base64
        text = f'bad request: {{"url": "data:image/png;base64,{data}"}} and raw {data[:3000]} end'
        line = chat.one_line(text)
        assert line == ('bad request: {"url": "data:image/png;base64,…(1,000,000 characters)"} '
                        "and raw …(3,000 characters of Base64) end")

    def test_the_key_is_redacted_before_the_cut(self):
        key = "sk-test-not-a-real-key-0123456789"
        line = chat.one_line("x" * 35 + " " + key, key, room=50)
        assert key[:10] not in line and line.startswith("x" * 35 + " [redacted]")

    def test_short_base64_looking_words_stay(self):
        assert chat.elide_base64("gpt-5.4-mini and abcdEFGH1234") == "gpt-5.4-mini and abcdEFGH1234"


class TestReplyReport:
    @pytest.mark.parametrize(
        "usage, line",
        [
            (None, "usage: not reported by the server"),
            ({}, "usage: not reported by the server"),
            ({"prompt_tokens": 3}, "usage: not reported by the server"),
            ({"prompt_tokens": 12, "completion_tokens": 34, "total_tokens": 46}, "usage: 12 in, 34 out"),
            ({"prompt_tokens": 12, "completion_tokens": 34,
              "prompt_tokens_details": {"cached_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 20}},
             "usage: 12 in, 34 out, 0 cached, 20 reasoning"),
            ({"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": None,
              "completion_tokens_details": {"reasoning_tokens": "x"}}, "usage: 1 in, 2 out"),
        ],
    )
    def test_usage_line(self, usage, line):
        assert chat.usage_line(usage) == line

    def test_a_limit_spent_on_reasoning_says_so(self):
        reply = chat.Reply("", "thinking...", "length",
                           {"completion_tokens": 64, "completion_tokens_details": {"reasoning_tokens": 64}})
        warning = chat.reply_warning(reply)
        assert "token limit went to reasoning (64 reasoning tokens)" in warning
        assert "--max-tokens" in warning and "--reasoning-effort" in warning
        assert "(64" not in chat.reply_warning(chat.Reply("", "", "length", None))
        assert "(64" not in chat.reply_warning(chat.Reply("", "", "length", ["not", "a", "dict"]))
        assert "cut off" in chat.reply_warning(chat.Reply("some text", "", "length", None))


class TestCommands:
    @pytest.mark.parametrize(
        "line, command",
        [("/help", ("/help", "")), ("/model  tiny-model ", ("/model", "tiny-model")),
         ("/system Be brief. Very.", ("/system", "Be brief. Very.")), ("/frobnicate", ("/frobnicate", "")),
         ("/usr/bin/env is what?", ("", "")), ("//help", ("", "")), ("hello /help", ("", "")),
         ("/etc/hosts\nexplain this", ("", "")), ("", ("", "")), ("/exit", ("/exit", ""))],
    )
    def test_parse_command(self, line, command):
        assert chat.parse_command(line) == command


class TestKeys:
    def test_redact_replaces_every_occurrence(self):
        key = "sk-test-not-a-real-key-1234"
        assert chat.redact(f"a {key} b {key}", key) == "a [redacted] b [redacted]"

    def test_short_placeholder_keys_are_left_alone(self):
        assert chat.redact("none of the nonsense", "none") == "none of the nonsense"

    @pytest.mark.parametrize(
        "key, shown",
        [("sk-test-not-a-real-key-WXYZ", "sk-…WXYZ"), ("local-token-abcdefgh", "…efgh"),
         ("sk-short", "sk-…"), ("x", "…")],
    )
    def test_mask_key_shows_at_most_the_last_four(self, key, shown):
        assert chat.mask_key(key) == shown

    @pytest.mark.parametrize("key", ["sk-test key", "sk-test\n", "sk-tést", '"sk-test"x\x00'])
    def test_keys_that_cannot_be_a_header_are_refused(self, key):
        with pytest.raises(chat.UsageError) as caught:
            chat.check_api_key(key)
        assert key not in str(caught.value)

    def test_bearer_auth_sets_the_header(self):
        class Request:
            headers = {}

        assert chat.bearer_auth("sk-abc")(Request()).headers == {"Authorization": "Bearer sk-abc"}


class TestRetryTiming:
    NOW = 1_700_000_000.0

    @pytest.mark.parametrize(
        "headers, expected",
        [
            ({}, None),
            ({"retry-after-ms": "250"}, 0.25),
            ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
            ({"retry-after-ms": "soon", "retry-after": "3"}, 3.0),
            ({"retry-after": "7"}, 7.0),
            ({"retry-after": "1.5"}, 1.5),
            ({"retry-after": "-4"}, 0.0),
            ({"retry-after": "3600"}, 3600.0),
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
        [(0, 0.0, 0.5), (0, 1.0, 0.375), (1, 0.0, 1.0), (2, 0.0, 2.0), (3, 0.0, 4.0),
         (4, 0.0, 8.0), (5, 0.0, 8.0), (9, 1.0, 6.0)],
    )
    def test_backoff_doubles_caps_and_jitters(self, attempt, rand, expected):
        assert chat.backoff_delay(attempt, rand=lambda: rand) == pytest.approx(expected)

    def test_retry_wait_follows_the_server_then_backs_off(self):
        asked = chat.ApiError("HTTP 429", retryable=True, retry_after=3.0)
        plain = chat.ApiError("HTTP 503", retryable=True)
        final = chat.ApiError("HTTP 400")
        assert chat.retry_wait(asked, attempt=0, retries=2) == 3.0
        assert 0.375 <= chat.retry_wait(plain, attempt=0, retries=2) <= 0.5
        assert chat.retry_wait(plain, attempt=2, retries=2) is None
        assert chat.retry_wait(final, attempt=0, retries=2) is None
