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

    def test_system_prompt_comes_first(self):
        user = {"role": "user", "content": "q2"}
        history = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
        messages = chat.build_messages(history, user, "be brief")
        assert messages == [{"role": "system", "content": "be brief"}, *history, user]
        assert chat.build_messages([], user, None) == [user]


class TestBody:
    MESSAGES = [{"role": "user", "content": "q"}]

    def test_only_given_options_are_sent(self):
        body = chat.build_body("m", self.MESSAGES, "https://api.openai.com/v1")
        assert body == {"model": "m", "messages": self.MESSAGES}

    def test_temperature_zero_is_sent(self):
        body = chat.build_body("m", self.MESSAGES, "http://h/v1", temperature=0.0)
        assert body["temperature"] == 0.0

    def test_stream_flag(self):
        assert chat.build_body("m", self.MESSAGES, "http://h/v1", stream=True)["stream"] is True

    @pytest.mark.parametrize(
        "base_url, field",
        [
            ("https://api.openai.com/v1", "max_completion_tokens"),
            ("https://my-resource.openai.azure.com/openai/v1", "max_completion_tokens"),
            ("http://127.0.0.1:8080/v1", "max_tokens"),
            ("https://openrouter.ai/api/v1", "max_tokens"),
            ("https://api.openai.com.evil.example/v1", "max_tokens"),
        ],
    )
    def test_max_tokens_name_depends_on_host(self, base_url, field):
        body = chat.build_body("m", self.MESSAGES, base_url, max_tokens=5)
        assert body[field] == 5
        assert len(body) == 3


@pytest.mark.parametrize(
    "base_url, expected",
    [
        ("https://api.openai.com/v1", "https://api.openai.com/v1/chat/completions"),
        ("http://127.0.0.1:8080/v1/", "http://127.0.0.1:8080/v1/chat/completions"),
        ("http://localhost:11434/v1//", "http://localhost:11434/v1/chat/completions"),
    ],
)
def test_completions_url_tolerates_trailing_slashes(base_url, expected):
    assert chat.completions_url(base_url) == expected


@pytest.mark.parametrize(
    "host, loopback",
    [("127.0.0.1", True), ("127.5.0.1", True), ("::1", True), ("localhost", True),
     ("api.localhost", True), ("10.0.0.1", False), ("example.com", False), ("", False)],
)
def test_is_loopback(host, loopback):
    assert chat.is_loopback(host) is loopback


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
