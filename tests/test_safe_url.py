"""The upload guard: a presigned Location (or a storage redirect) is refused, before any byte is
sent, when the host aiohttp would connect to is a metadata, link-local, unspecified, multicast
or (unless the API itself is local) loopback target, however the server spells it. Tables of
bypass attempts and of real storage URLs, then whole uploads against a raw server."""

from __future__ import annotations

import ipaddress
import re
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from raw_server import RawConnection, RawRequest, RawServer, http_response

from together_async import AsyncTogether, ClientConfig, UnsafeURLError
from together_async._safe_url import Refusal, _loose_ipv4, check_upload_url, host_for_message

HTTPS_API = "https://api.together.ai/v1"
LOOPBACK_API = "http://127.0.0.1:8080/v1"
SIGNATURE = "X-Amz-Signature=SIGSECRET"
DATA = b'{"custom_id": "a", "body": {"model": "m", "messages": []}}\n'

# (Location, why it is refused); each is checked against an https API on a public host.
BYPASSES: list[tuple[str, Refusal]] = [
    # cloud metadata, by address and by name
    ("https://169.254.169.254/latest/meta-data/", Refusal.METADATA),
    ("https://169.254.170.2/v2/credentials", Refusal.METADATA),
    ("https://100.100.100.200/latest/meta-data/", Refusal.METADATA),
    ("https://192.0.0.192/opc/v2/", Refusal.METADATA),
    ("https://168.63.129.16/machine", Refusal.METADATA),
    ("https://[fd00:ec2::254]/latest/meta-data/", Refusal.METADATA),
    ("https://metadata.google.internal/computeMetadata/v1/", Refusal.METADATA),
    ("https://METADATA.GOOGLE.INTERNAL./computeMetadata/v1/", Refusal.METADATA),
    ("https://metadata/computeMetadata/v1/", Refusal.METADATA),
    ("https://metadata.goog/computeMetadata/v1/", Refusal.METADATA),
    ("https://instance-data.ec2.internal/latest/", Refusal.METADATA),
    ("https://instance-data.eu-west-1.compute.internal/latest/", Refusal.METADATA),
    # legacy IPv4 spellings the system resolver still accepts
    ("https://2852039166/latest/", Refusal.METADATA),
    ("https://0xa9fea9fe/latest/", Refusal.METADATA),
    ("https://0xa9.0xfe.0xa9.0xfe/latest/", Refusal.METADATA),
    ("https://0XA9.0XFE.0XA9.0XFE/latest/", Refusal.METADATA),
    ("https://0251.0376.0251.0376/latest/", Refusal.METADATA),
    ("https://00000251.0376.0251.0376/latest/", Refusal.METADATA),
    ("https://169.254.43518/latest/", Refusal.METADATA),
    ("https://169.16689662/latest/", Refusal.METADATA),
    ("https://0xa9.0376.43518/latest/", Refusal.METADATA),
    ("https://169.254.169.254./latest/", Refusal.METADATA),
    ("https://169.254.169.254../latest/", Refusal.METADATA),
    ("https://169.254.169.254:80/latest/", Refusal.METADATA),
    # Unicode that IDNA folds: fullwidth digits, ideographic full stops, circled letters
    (
        "https://\uff11\uff16\uff19.\uff12\uff15\uff14.\uff11\uff16\uff19.\uff12\uff15\uff14/",
        Refusal.METADATA,
    ),
    ("https://169\u3002254\u3002169\u3002254/latest/", Refusal.METADATA),
    ("https://169\uff0e254\uff0e169\uff0e254/latest/", Refusal.METADATA),
    ("https://\uff2d\uff25\uff34\uff21\uff24\uff21\uff34\uff21.google.internal/", Refusal.METADATA),
    ("https://metadata.google.internal\u3002/", Refusal.METADATA),
    ("https://\u24dcetadata.google.internal/", Refusal.METADATA),
    # IPv6 forms that carry an IPv4 address
    ("https://[::ffff:169.254.169.254]/", Refusal.METADATA),
    ("https://[::ffff:a9fe:a9fe]/", Refusal.METADATA),
    ("https://[0:0:0:0:0:ffff:a9fe:a9fe]/", Refusal.METADATA),
    ("https://[::ffff:0:169.254.169.254]/", Refusal.METADATA),
    ("https://[64:ff9b::169.254.169.254]/", Refusal.METADATA),
    ("https://[64:ff9b:1::a9fe:a9fe]/", Refusal.METADATA),
    ("https://[64:ff9b:1:a9fe:a9:fe00::]/", Refusal.METADATA),
    ("https://[64:ff9b:1:0:a9:fea9:fe00:0]/", Refusal.METADATA),
    ("https://[::169.254.169.254]/", Refusal.METADATA),
    ("https://[2002:a9fe:a9fe::1]/", Refusal.METADATA),
    ("https://[2001:0:4136:e378:8000:ffff:5601:5601]/", Refusal.METADATA),
    ("https://[2001:db8::5efe:169.254.169.254]/", Refusal.METADATA),
    ("https://[2001:db8::200:5efe:169.254.169.254]/", Refusal.METADATA),
    ("https://[::ffff:169.254.1.1]/", Refusal.LINK_LOCAL),
    ("https://[64:ff9b::7f00:1]/", Refusal.LOOPBACK),
    # link-local, unspecified, multicast, broadcast
    ("https://169.254.1.1/x", Refusal.LINK_LOCAL),
    ("https://[fe80::1]/x", Refusal.LINK_LOCAL),
    ("https://[FE80::abcd]/x", Refusal.LINK_LOCAL),
    ("https://0.0.0.0/x", Refusal.UNSPECIFIED),
    ("https://0/x", Refusal.UNSPECIFIED),
    ("https://0x0.0/x", Refusal.UNSPECIFIED),
    ("https://0.1.2.3/x", Refusal.UNSPECIFIED),
    ("https://[::]/x", Refusal.UNSPECIFIED),
    ("https://[::ffff:0.0.0.0]/x", Refusal.UNSPECIFIED),
    ("https://224.0.0.1/x", Refusal.MULTICAST),
    ("https://[ff02::1]/x", Refusal.MULTICAST),
    ("https://255.255.255.255/x", Refusal.MULTICAST),
    ("https://240.0.0.1/x", Refusal.RESERVED),
    # loopback, while the API is not on this machine
    ("https://127.0.0.1/x", Refusal.LOOPBACK),
    ("https://127.1/x", Refusal.LOOPBACK),
    ("https://0x7f000001/x", Refusal.LOOPBACK),
    ("https://2130706433/x", Refusal.LOOPBACK),
    ("https://017700000001/x", Refusal.LOOPBACK),
    ("https://127.255.255.254/x", Refusal.LOOPBACK),
    ("https://[::1]/x", Refusal.LOOPBACK),
    ("https://[0:0:0:0:0:0:0:1]/x", Refusal.LOOPBACK),
    ("https://[::ffff:127.0.0.1]/x", Refusal.LOOPBACK),
    ("https://localhost/x", Refusal.LOOPBACK),
    ("https://LocalHost./x", Refusal.LOOPBACK),
    ("https://localhost../x", Refusal.LOOPBACK),
    ("https://storage.localhost/x", Refusal.LOOPBACK),
    ("https://localhost.localdomain/x", Refusal.LOOPBACK),
    ("https://ip6-localhost/x", Refusal.LOOPBACK),
    ("https://\u24dbocalhost/x", Refusal.LOOPBACK),
    ("https://\uff4c\uff4f\uff43\uff41\uff4c\uff48\uff4f\uff53\uff54/x", Refusal.LOOPBACK),
    # hosts that are not hosts
    ("https://[zz::1]/x", Refusal.BAD_HOST),
    ("https://[v1.fe80::1]/x", Refusal.BAD_HOST),
    ("https://a b/x", Refusal.BAD_HOST),
    ("https://127.0.0.1 x/x", Refusal.BAD_HOST),
    ("https://./x", Refusal.BAD_HOST),
    ("https://%31%36%39.254.169.254/x", Refusal.ESCAPED_HOST),
    ("https://[fe80::1%25eth0]/x", Refusal.ESCAPED_HOST),
    ("https://u:p@bucket.example/x", Refusal.CREDENTIALS),
    ("https://user@bucket.example/x", Refusal.CREDENTIALS),
    ("https://:@bucket.example/x", Refusal.CREDENTIALS),
    ("https://@bucket.example/x", Refusal.CREDENTIALS),
    ("https:///nohost", Refusal.NO_HOST),
    # URLs no parser takes
    ("https://bucket.example:99999/x", Refusal.MALFORMED),
    ("https://[::1/x", Refusal.MALFORMED),
    ("https://bucket.example\\@169.254.169.254/x", Refusal.MALFORMED),
    ("https://meta\u00addata.google.internal/", Refusal.MALFORMED),
    ("https://169.254.169.254\u200b/", Refusal.MALFORMED),
    # schemes
    ("http://bucket.example/key", Refusal.PLAIN_HTTP),
    ("HTTP://bucket.example/key", Refusal.PLAIN_HTTP),
    ("ftp://storage.example/x", Refusal.SCHEME),
    ("file:///etc/passwd", Refusal.SCHEME),
    ("bucket.example/key", Refusal.SCHEME),
]

LEGIT = [
    "https://bucket.s3.amazonaws.com/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature=abc",
    "https://bucket.s3.us-west-2.amazonaws.com/k%20ey?X-Amz-Credential=A%2F2025&X-Amz-Expires=900",
    "https://s3.us-east-1.amazonaws.com/bucket/key.jsonl?X-Amz-Signature=ab12",
    "https://storage.googleapis.com/bucket/object?X-Goog-Signature=abc",
    "https://account.blob.core.windows.net/c/b?sv=2024&sig=abc%3D",
    "https://api.together.ai/v1/files/upload/file-1",
    "https://api.together.xyz/upload?token=t",
    "https://together-batch.s3.amazonaws.com/file-abc?X-Amz-Signature=def",
    "https://BUCKET.S3.AMAZONAWS.COM./key",
    "https://my_bucket.storage.example/key",
    "https://10.0.0.5/minio/key",
    "https://192.168.1.20:9000/bucket/key",
    "https://172.16.0.1/key",
    "https://100.64.0.1/key",
    "https://52.216.1.1/bucket/key",
    "https://[2600:1f18:1234::1]/bucket/key",
    "https://[fd12:3456::1]/key",
    "https://[64:ff9b::3.5.140.2]/bucket",
    "https://[64:ff9b:1::3.5.140.2]/bucket",
    "https://[64:ff9b:1:305:8c:200::]/bucket",
    "https://b\u00fccher.example/key",
    "https://metadata.example.com/key",
    "https://localhost.example.com/key",
    "https://bucket.example:443/key",
]


@pytest.mark.parametrize(("url", "refusal"), BYPASSES)
def test_bypass_attempts_are_refused_with_their_reason(url: str, refusal: Refusal) -> None:
    """Every spelling of a forbidden target is refused, and the message says why."""
    with pytest.raises(UnsafeURLError, match=re.escape(refusal.value)):
        check_upload_url(url, api_base_url=HTTPS_API)


@pytest.mark.parametrize(("url", "refusal"), BYPASSES)
def test_refusals_never_show_the_signature(url: str, refusal: Refusal) -> None:
    """The query (a presigned URL's signature) is in no refusal's message."""
    with pytest.raises(UnsafeURLError) as caught:
        check_upload_url(f"{url}?{SIGNATURE}", api_base_url=HTTPS_API)
    assert "SIGSECRET" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://0xa9.0xfe.0xa9.0xfe/latest?s=1", "0xa9.0xfe.0xa9.0xfe (169.254.169.254)"),
        ("https://[64:ff9b::a9fe:a9fe]/", "[64:ff9b::a9fe:a9fe] (169.254.169.254)"),
        ("https://u:secret@localhost:9/x", "localhost:9"),
        ("https://169.254.169.254:80/", "169.254.169.254:80:"),
    ],
)
def test_refusals_name_the_host_and_the_address_it_reaches(url: str, shown: str) -> None:
    """The message names the host as written (never its userinfo) and the address it reaches."""
    with pytest.raises(UnsafeURLError) as caught:
        check_upload_url(url, api_base_url=HTTPS_API)
    assert shown in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("url", LEGIT)
def test_storage_urls_are_allowed(url: str) -> None:
    """Presigned storage URLs, Together's own hosts, private and public addresses pass as is."""
    assert check_upload_url(url, api_base_url=HTTPS_API) == url


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9000/upload/f1",
        "http://localhost:9000/upload/f1",
        "http://[::1]:9000/upload/f1",
        "http://127.0.0.2:9000/upload/f1",
        "http://0x7f.1:9000/upload/f1",
        "https://storage.localhost/upload/f1",
    ],
)
@pytest.mark.parametrize("api", [LOOPBACK_API, "http://localhost:8080/v1", "http://[::1]:8080/v1"])
def test_loopback_is_allowed_when_the_api_is_loopback(api: str, url: str) -> None:
    """A local API (the emulator) may point at storage on this machine, over http or https."""
    assert check_upload_url(url, api_base_url=api) == url


def test_loopback_is_allowed_when_an_https_api_is_loopback() -> None:
    """A local API over https unlocks https storage on this machine (http stays refused)."""
    url = "https://localhost:9000/upload/f1"
    assert check_upload_url(url, api_base_url="https://127.0.0.1:8443/v1") == url


@pytest.mark.parametrize(
    ("url", "refusal"),
    [
        ("http://169.254.169.254/latest/", Refusal.METADATA),
        ("http://[::ffff:169.254.169.254]/latest/", Refusal.METADATA),
        ("http://0x0.0:9000/upload", Refusal.UNSPECIFIED),
        ("http://[fe80::1]:9000/upload", Refusal.LINK_LOCAL),
        ("ftp://127.0.0.1/upload", Refusal.SCHEME),
    ],
)
def test_a_loopback_api_still_refuses_everything_but_loopback(url: str, refusal: Refusal) -> None:
    """A local API unlocks loopback targets only: metadata and the rest stay refused."""
    with pytest.raises(UnsafeURLError, match=re.escape(refusal.value)):
        check_upload_url(url, api_base_url=LOOPBACK_API)


@pytest.mark.parametrize(
    "api",
    [
        "http://10.0.0.2:8080/v1",
        "http://127.0.0.1.example.com/v1",
        "http://169.254.169.254/v1",
        "http://[::1/v1",
    ],
)
def test_loopback_is_refused_when_the_api_is_elsewhere(api: str) -> None:
    """An API that is not on this machine (or not a URL) does not unlock loopback targets."""
    with pytest.raises(UnsafeURLError, match=re.escape(Refusal.LOOPBACK.value)):
        check_upload_url("https://127.0.0.1:9000/upload", api_base_url=api)


def test_plain_http_is_allowed_when_the_api_is_http() -> None:
    """An http API (an on-premises gateway) may point at http storage on its network."""
    url = "http://10.0.0.9:9000/upload/f1?sig=abc"
    assert check_upload_url(url, api_base_url="http://10.0.0.2:8080/v1") == url


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://user:pw@host.example:1/p?sig=S", "host.example:1"),
        ("https://[::1/p?sig=S", "[::1"),
        ("no scheme at all?sig=S", "no scheme at all"),
        ("https://a\nb/x", "a\\x0ab"),
        ("https:///x", "(no host)"),
    ],
)
def test_host_for_message_keeps_only_the_host(url: str, shown: str) -> None:
    """The text shown for a URL is its host as written: no userinfo, path, query or newline."""
    assert host_for_message(url) == shown


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's inet_aton is the reference")
@given(st.text(alphabet="0123456789abcdefxX.", min_size=1, max_size=24))
@example("0xa9.0376.43518")
@example("0x7f.00000.0.01")
@example("4311744513")
def test_ipv4_is_read_as_the_system_resolver_reads_it(host: str) -> None:
    """Whenever the C library reads a host as an IPv4 address, the guard reads the same one."""
    try:
        packed = socket.inet_aton(host)
    except OSError:
        return
    assert _loose_ipv4(host) == ipaddress.IPv4Address(packed)


# ---- whole uploads against a raw server ---------------------------------------------------


def api_client(base_url: str) -> AsyncTogether:
    settings: dict[str, Any] = {
        "api_key": "sk-urlguard-test",
        "base_url": base_url,
        "max_retries": 3,
        "retry_wait_initial": 0.0,
        "retry_wait_max": 0.0,
        "retry_wait_jitter": 0.0,
    }
    return AsyncTogether.from_config(ClientConfig(**settings))


@pytest.fixture
def connects(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every address this process connects a socket to or resolves, in order. A connection
    anywhere but 127.0.0.1 is refused on the spot, so a guard that let one through fails the
    test at once instead of waiting on a real network."""
    seen: list[Any] = []
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(sock: socket.socket, address: Any) -> None:
        seen.append(address)
        if not (isinstance(address, tuple) and address[0] == "127.0.0.1"):
            raise ConnectionRefusedError(f"test: no connection to {address!r}")
        real_connect(sock, address)

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(host)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield seen


def redirecting_api(location: str) -> Any:
    """A script for POST /files answering the presigned 302 to `location`."""

    async def script(request: RawRequest, conn: RawConnection) -> None:
        assert (request.method, request.path) == ("POST", "/v1/files")
        headers = {"Location": location, "X-Together-File-Id": "file-1"}
        await conn.write(http_response(302, headers=headers))

    return script


def utf8_header(text: str) -> str:
    # http_response encodes headers as latin-1: this makes it put `text`'s UTF-8 bytes there,
    # as a server sending a raw Unicode Location does.
    return text.encode("utf-8").decode("latin-1")


@pytest.mark.parametrize(
    "location",
    [
        "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/?X-Amz-Signature=SIGSECRET",
        "http://[64:ff9b::a9fe:a9fe]/latest/meta-data/?X-Amz-Signature=SIGSECRET",
        "http://[::ffff:0:169.254.169.254]/latest/?X-Amz-Signature=SIGSECRET",
        utf8_header("http://169\u3002254\u3002169\u3002254/latest/?X-Amz-Signature=SIGSECRET"),
        "http://metadata.google.internal./computeMetadata/v1/?X-Amz-Signature=SIGSECRET",
    ],
    ids=["dotted-hex", "nat64", "ipv4-translated", "ideographic-dots", "trailing-dot-name"],
)
async def test_upload_redirected_to_metadata_connects_nowhere(
    location: str, connects: list[Any]
) -> None:
    """An upload aimed at obfuscated metadata is UnsafeURLError; only the API is connected to."""
    async with RawServer(redirecting_api(location)) as api:
        async with api_client(f"{api.url}/v1") as client:
            with pytest.raises(UnsafeURLError, match="cloud metadata") as caught:
                await client.files.upload(DATA)
        api_port = api.port
        methods = [request.method for request in api.requests]
    assert "file-1" in str(caught.value) and "SIGSECRET" not in str(caught.value)
    assert methods == ["POST"]
    assert connects and all(address == ("127.0.0.1", api_port) for address in connects)


async def test_upload_to_an_unspecified_address_never_reaches_the_local_storage() -> None:
    """A Location on `0x0.0` (0.0.0.0, this machine) never reaches the storage listening there."""

    async def storage_script(request: RawRequest, conn: RawConnection) -> None:
        await conn.write(http_response(200))

    async with RawServer(storage_script) as storage:
        location = f"http://0x0.0:{storage.port}/upload/file-1?sig=SIGSECRET"
        async with RawServer(redirecting_api(location)) as api:
            async with api_client(f"{api.url}/v1") as client:
                with pytest.raises(UnsafeURLError, match="unspecified address"):
                    await client.files.upload(DATA)
        assert storage.connections == 0 and storage.requests == []


async def test_storage_redirect_to_metadata_is_not_followed(connects: list[Any]) -> None:
    """A storage 307 to metadata (as a decimal number) is refused and never connected to."""

    async def storage_script(request: RawRequest, conn: RawConnection) -> None:
        location = "http://2852039166/latest/meta-data/iam?sig=SIGSECRET"
        await conn.write(http_response(307, headers={"Location": location}))

    async with RawServer(storage_script) as storage:
        api_script = redirecting_api(f"{storage.url}/upload/file-1")
        async with RawServer(api_script) as api:
            async with api_client(f"{api.url}/v1") as client:
                with pytest.raises(UnsafeURLError, match=r"2852039166 \(169\.254\.169\.254\)"):
                    await client.files.upload(DATA)
        assert [request.method for request in storage.requests] == ["PUT"]
    ports = {api.port, storage.port}
    assert all(address[1] in ports for address in connects)


@pytest.mark.parametrize(
    "location",
    [
        "http://[::1/upload/file-1?sig=SIGSECRET",
        "http://[zz::1]/upload/file-1?sig=SIGSECRET",
        "http://storage.example:99999/upload?sig=SIGSECRET",
    ],
)
async def test_malformed_location_is_an_unsafe_url_error(
    location: str, connects: list[Any]
) -> None:
    """A Location no parser accepts is UnsafeURLError without its signature, not ValueError."""
    async with RawServer(redirecting_api(location)) as api:
        async with api_client(f"{api.url}/v1") as client:
            with pytest.raises(UnsafeURLError) as caught:
                await client.files.upload(DATA)
        api_port = api.port
    assert "SIGSECRET" not in str(caught.value)
    assert all(address == ("127.0.0.1", api_port) for address in connects)


@pytest.mark.parametrize(
    "host", ["a" * 64 + ".example.com", ".".join(["abcdefghij"] * 24) + ".com", "a..b.com"]
)
def test_a_host_that_is_no_dns_name_is_refused(host: str) -> None:
    """A label over 63 characters, a name over 253 or an empty label is refused as a bad
    host (the resolver would fail on it with a raw UnicodeError)."""
    with pytest.raises(UnsafeURLError):
        check_upload_url(f"https://{host}/put?sig=x", api_base_url="https://api.together.ai/v1")
