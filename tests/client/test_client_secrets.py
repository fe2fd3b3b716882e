"""The API key (and a URL's user:password@) as secrets in the SDK and the `fd2-client` command.

A key pasted from a file (`$(cat key)`) ends in a newline: it must work, not end in "is the service
running?" with the whole key printed. A key a header cannot carry is refused up front (exit 2) with
a message that names the problem; no error, exception, repr or log line ever shows the key.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import subprocess
import sys
import traceback

import httpx
import pytest
from client_service import service  # noqa: F401 (fixture)
from http_stub import Reply, Seen, StubServer, json_reply
from service_harness import REPO_ROOT

from fd2_client import Client, ConnectionFailed, Unauthorized
from fd2_client.cli import EXIT_OK, EXIT_REFUSED
from fd2_client.retries import RetryPolicy
from fd2_client.transport import Transport

CLIENT_ROOT = REPO_ROOT / "clients" / "python"
NOBODY = "http://127.0.0.1:1"  # never reached: these keys are refused before anything is sent
ONE_TRY = RetryPolicy(attempts=1)
# A character a header cannot carry inside a key, and the words the refusal names it with.
BAD_INSIDE = [("\n", "a line break"), ("\r\n", "a line break"), (" ", "whitespace"), ("\t", "whitespace"),
              ("\x07", "a control character"), ("\x00", "a control character"), ("é", "a non-ASCII character")]


def fd2_client(*args: str, url: str, key: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The command as a script runs it: FD2_URL / FD2_API_KEY set, no other FD2_* of ours."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FD2_")}
    env["FD2_URL"] = url
    if key is not None:
        env["FD2_API_KEY"] = key
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CLIENT_ROOT), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "fd2_client", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT)


def halves(key: str) -> tuple[str, str]:
    """Two pieces of a key that no output may contain (one of them alone would already leak it)."""
    return key[: len(key) // 2], key[len(key) // 2:]


def assert_nowhere(secret: str, *texts: str) -> None:
    for text in texts:
        for piece in (secret, *halves(secret)):
            assert piece not in text, f"the secret (or half of it) was shown: {text!r}"


def exception_text(exc: BaseException) -> str:
    """All a caller could print of an exception: str, repr, args, the traceback with its causes."""
    return "\n".join([str(exc), repr(exc), repr(exc.args), *traceback.format_exception(exc)])


def random_key() -> str:
    return f"fd2_{secrets.token_hex(4)}_{secrets.token_urlsafe(24)}"


# ------------------------------------------------------------ a key with whitespace around it works


@pytest.mark.service
@pytest.mark.parametrize("around", [("", "\n"), ("", "\r\n"), ("  ", "  "), ("\t", " \n")])
def test_a_key_with_whitespace_around_it_works_in_the_sdk(service, around, caplog):  # noqa: F811
    caplog.set_level(logging.DEBUG)
    with Client(service.url, around[0] + service.key + around[1], retry=ONE_TRY) as sdk:
        assert isinstance(list(sdk.iter_jobs()), list)
        assert_nowhere(service.key, repr(sdk), repr(sdk.transport), repr(vars(sdk.transport)),
                       str(sdk.transport.key), repr(sdk.transport.headers))
    assert_nowhere(service.key, caplog.text)  # httpx's and httpcore's log lines too


@pytest.mark.service
def test_a_key_with_a_trailing_newline_or_spaces_works_through_the_command(service):  # noqa: F811
    # FD2_API_KEY=$(cat key) keeps the newline; --key "  $KEY  " the spaces
    from_file = fd2_client("ls", "jobs", url=service.url, key=service.key + "\n")
    assert from_file.returncode == EXIT_OK, from_file.stderr
    as_argument = fd2_client("ls", "jobs", "--json", "--key", f"  {service.key}  ", url=service.url)
    assert as_argument.returncode == EXIT_OK, as_argument.stderr
    assert json.loads(as_argument.stdout)["items"] is not None
    assert_nowhere(service.key, from_file.stdout, from_file.stderr, as_argument.stdout, as_argument.stderr)


# ------------------------------------------------------------ a key no header can carry is refused


@pytest.mark.parametrize("inside, named", BAD_INSIDE)
def test_a_key_with_a_character_inside_that_a_header_cannot_carry_is_refused_by_the_sdk(inside, named):
    head, tail = halves(random_key())
    with pytest.raises(ValueError) as refused:
        Client(NOBODY, f"{head}{inside}{tail}\n", retry=ONE_TRY)
    assert f"the API key has {named} at character {len(head) + 1}" in str(refused.value)
    assert_nowhere(head + tail, exception_text(refused.value))  # neither half of it either


@pytest.mark.service
@pytest.mark.parametrize("inside, named", [BAD_INSIDE[0], BAD_INSIDE[4], BAD_INSIDE[6]])
def test_a_key_no_header_can_carry_is_a_usage_error(service, inside, named):  # noqa: F811
    """Against the running service: on the old code such a key reached httpx, which failed (exit 3)
    with the whole key in "Illegal header value"."""
    head, tail = halves(service.key)
    from_env = fd2_client("ls", "jobs", "--json", url=service.url, key=f"{head}{inside}{tail}\n")
    as_argument = fd2_client("ls", "jobs", "--key", f"{head}{inside}{tail}", url=service.url)
    for result in (from_env, as_argument):
        assert result.returncode == EXIT_REFUSED, result.stderr
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("fd2-client: error: --key/$FD2_API_KEY: the API key has " + named), last
        assert "connection_failed" not in result.stderr and "is the service running" not in result.stderr
        assert head not in result.stdout + result.stderr and tail not in result.stdout + result.stderr


def test_an_empty_key_or_only_whitespace_is_refused_as_not_given():
    for blank in ("", " ", "\n", "\t\r\n"):
        with pytest.raises(ValueError, match="the API key is empty"):
            Client(NOBODY, blank)
        result = fd2_client("ls", "jobs", url=NOBODY, key=blank, timeout=60)
        assert result.returncode == EXIT_REFUSED and "--key/$FD2_API_KEY not given" in result.stderr


# ---------------------------------------------------------------- no error quotes the key


@pytest.mark.service
def test_a_wrong_keys_401_never_echoes_the_key(service):  # noqa: F811
    wrong = random_key()
    with Client(service.url, wrong + "\n", retry=ONE_TRY) as sdk, pytest.raises(Unauthorized) as refused:
        sdk.get_job("job_x")
    assert refused.value.status == 401 and refused.value.code == "unauthorized"
    assert_nowhere(wrong, exception_text(refused.value), json.dumps(refused.value.details))
    result = fd2_client("ls", "jobs", "--json", url=service.url, key=wrong + "\n")
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert json.loads(result.stdout)["error"]["status"] == 401
    assert_nowhere(wrong, result.stdout, result.stderr)


def _echoing_proxy(seen: Seen) -> Reply:
    """A proxy in front of the service that quotes the Authorization header back in its 401."""
    sent = seen.headers.get("authorization", "")
    return json_reply(401, {"error": {"code": "unauthorized", "message": f"rejected {sent!r}",
                                      "details": [{"header": sent, "echo": {sent: [sent]}}]}})


def test_an_error_answer_that_quotes_the_key_back_has_it_masked():
    key = random_key()
    with StubServer(_echoing_proxy) as stub:
        with Client(stub.url, key, retry=ONE_TRY) as sdk, pytest.raises(Unauthorized) as refused:
            sdk.get_job("job_x")
        result = fd2_client("ls", "jobs", "--json", url=stub.url, key=key, timeout=60)
    assert stub.requests[0].headers["authorization"] == f"Bearer {key}"  # the key was sent
    assert "***" in refused.value.message
    assert_nowhere(key, exception_text(refused.value), json.dumps(refused.value.details))
    assert result.returncode == EXIT_REFUSED, result.stderr
    assert_nowhere(key, result.stdout, result.stderr)


def test_a_short_key_is_masked_where_it_stands_alone_and_words_keep_their_letters():
    with StubServer(_echoing_proxy) as stub:
        with Client(stub.url, "ject", retry=ONE_TRY) as sdk, pytest.raises(Unauthorized) as refused:
            sdk.get_job("job_x")
    assert refused.value.message == "rejected 'Bearer ***'"
    assert refused.value.details == [{"header": "Bearer ***", "echo": {"Bearer ***": ["Bearer ***"]}}]


def test_a_transport_error_that_quotes_the_header_does_not_carry_the_key_on():
    key = random_key()

    def quoting(request: httpx.Request) -> httpx.Response:
        raise httpx.LocalProtocolError(f"Illegal header value {request.headers['authorization'].encode()!r}")

    transport = Transport(NOBODY, key, retry=ONE_TRY, http_client=httpx.Client(transport=httpx.MockTransport(quoting)))
    with pytest.raises(ConnectionFailed) as failed:
        transport.request("GET", "/v1/jobs")
    assert "Illegal header value" in str(failed.value) and "***" in str(failed.value)
    assert_nowhere(key, exception_text(failed.value))


# ---------------------------------------------------------------- a URL's user:password@


@pytest.mark.parametrize("url", ["http://alice:{pw}@127.0.0.1:1", "https://{pw}@host.example/fd2/v1",
                                 "http://alice:{pw}@", "alice:{pw}@127.0.0.1:8000"])
def test_a_url_with_a_password_is_refused_without_showing_it(url):
    """httpx would send user:password@ as Basic auth in place of the key, so it could never work."""
    password = secrets.token_urlsafe(12)
    with pytest.raises(ValueError) as refused:
        Client(url.format(pw=password), random_key())
    assert "***@" in str(refused.value)
    assert_nowhere(password, exception_text(refused.value))
    result = fd2_client("ls", "jobs", url=url.format(pw=password), key=random_key(), timeout=60)
    assert result.returncode == EXIT_REFUSED and "--url/$FD2_URL" in result.stderr, result.stderr
    assert_nowhere(password, result.stdout, result.stderr)
