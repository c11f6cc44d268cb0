"""Is this URL a safe place to send a file? The guard on the presigned upload's Location.

The server chooses where the file's bytes go (the `Location` of `POST /files`, and of any
redirect the storage answers), so a hostile or compromised server could aim them at the
cloud metadata service, at link-local addresses or at services on this machine. The host is
derived exactly as aiohttp will connect to it: yarl's `URL(url).raw_host` (IDNA, so fullwidth
digits, the ideographic full stop and compatibility letters are already folded), then the
legacy IPv4 spellings the system resolver still accepts (`2852039166`, `0xa9.0xfe.0xa9.0xfe`,
`169.254.43518`), then the IPv6 forms that carry an IPv4 address (mapped, translated, NAT64,
compatible, 6to4, Teredo, ISATAP), each checked again as the address it reaches.

DNS is not resolved: this guards against a hostile Location, not a hostile resolver (a name
that resolves to a metadata address is the resolver's business). Nothing here does I/O.
"""

from __future__ import annotations

import enum
import ipaddress
import re

from yarl import URL

from ._errors import UnsafeURLError

__all__ = ["Refusal", "check_upload_url", "host_for_message", "refusal_for_host"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class Refusal(enum.Enum):
    """Why a host is refused; the value is the wording used in the error message."""

    MALFORMED = "not a valid URL"
    SCHEME = "not an http or https URL"
    PLAIN_HTTP = "https is required when the API base URL is https"
    NO_HOST = "a URL without a host"
    CREDENTIALS = "a URL with credentials in it"
    BAD_HOST = "not a valid host name or IP address"
    ESCAPED_HOST = "a percent-escaped host"
    METADATA = "a cloud metadata endpoint"
    LINK_LOCAL = "a link-local address"
    UNSPECIFIED = "an unspecified address (it reaches this machine)"
    MULTICAST = "a multicast or broadcast address"
    RESERVED = "a reserved address"
    LOOPBACK = "a loopback address, and the API is not on this machine"


# Names the cloud providers resolve to their metadata services (GCP, AWS in every region via
# `<region>.compute.internal`, Tencent); caught by name because the address is only known
# after DNS, which this check does not do.
_METADATA_NAMES = frozenset(
    {
        "metadata",
        "metadata.goog",
        "metadata.google.internal",
        "instance-data",
        "metadata.tencentyun.com",
    }
)
_METADATA_FIRST_LABELS = frozenset({"metadata", "instance-data"})

# Names /etc/hosts (Debian, RHEL) and RFC 6761 (`*.localhost`) map to loopback.
_LOOPBACK_NAMES = frozenset(
    {
        "localhost",
        "localhost.localdomain",
        "localhost4",
        "localhost4.localdomain4",
        "localhost6",
        "localhost6.localdomain6",
        "ip6-localhost",
        "ip6-loopback",
    }
)

_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(text)
    for text in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, ...
        "169.254.170.2",  # AWS ECS task credentials
        "169.254.170.23",  # AWS EKS pod identity
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud
        "168.63.129.16",  # Azure WireServer
        "fd00:ec2::254",  # AWS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
    )
)
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")  # connecting to 0.0.0.0 reaches this host
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
_RESERVED_V4 = ipaddress.ip_network("240.0.0.0/4")

_GRAVITY = (
    Refusal.METADATA,
    Refusal.UNSPECIFIED,
    Refusal.LOOPBACK,
    Refusal.LINK_LOCAL,
    Refusal.MULTICAST,
    Refusal.RESERVED,
)

_NAT64_WELL_KNOWN = ipaddress.ip_network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
_IPV4_TRANSLATED = ipaddress.ip_network("::ffff:0:0:0/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

# After IDNA a DNS name is ASCII letters, digits, '-', '_' and dots; anything else (space,
# control characters, '%', brackets of an IPvFuture literal) is not a host we send a file to.
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_DECIMAL = re.compile(r"[0-9]+")
_OCTAL = re.compile(r"0[0-7]+")
_HEX = re.compile(r"0[xX][0-9A-Fa-f]*")


def is_dns_length(host: str) -> bool:
    """Whether a name fits DNS: labels of 1 to 63 characters, 253 in all. The resolver would
    refuse a longer one deep in the HTTP stack (an idna UnicodeError), so it is said here."""
    labels = host.rstrip(".").split(".")
    return len(host) <= 253 and all(0 < len(label) <= 63 for label in labels)


def _authority(url: str) -> str:
    # What sits between "//" and the path, query or fragment, however malformed the URL.
    rest = url.strip()
    if "//" in rest:
        rest = rest.split("//", 1)[1]
    for stop in "/?#":
        rest = rest.split(stop, 1)[0]
    return rest


def host_for_message(url: str) -> str:
    """The host of `url` as written, for an error message: no userinfo, no path or query (a
    presigned URL's signature is a credential), control characters escaped; works on URLs no
    parser accepts."""
    host = _authority(url).rpartition("@")[2]
    if len(host) > 100:
        host = host[:100] + "..."
    shown = "".join(char if char.isprintable() else f"\\x{ord(char):02x}" for char in host)
    return shown or "(no host)"


def _ipv4_component(part: str) -> int | None:
    # As inet_aton reads each part: 0x.. hexadecimal, 0.. octal, else decimal; ASCII only.
    if _HEX.fullmatch(part):
        return int(part[2:], 16) if len(part) > 2 else 0
    if _OCTAL.fullmatch(part):
        return int(part, 8)
    if _DECIMAL.fullmatch(part):
        return int(part, 10)
    return None


def _loose_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """IPv4 as getaddrinfo reads it: `127.1`, `2852039166`, `0xa9fea9fe`, `0251.0376.0251.0376`
    all name an address (the last part fills the remaining bytes)."""
    parts = host.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = [_ipv4_component(part) for part in parts]
    numbers = [value for value in values if value is not None]
    if len(numbers) != len(values):
        return None
    *head, last = numbers
    if any(value > 0xFF for value in head) or last >= 256 ** (4 - len(head)):
        return None
    address = 0
    for value in head:
        address = (address << 8) | value
    address = (address << (8 * (4 - len(head)))) | last
    return ipaddress.IPv4Address(address)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address reaches through a translation or a tunnel."""
    value = int(address)
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _IPV4_TRANSLATED or address in _NAT64_WELL_KNOWN:
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    if address in _NAT64_LOCAL:
        # RFC 6052 places the IPv4 address by prefix length (48, 56, 64 or 96 bits here), and
        # skips bits 64..71, which are zero; the operator's choice is unknown, so try each.
        # A reading inside 0.0.0.0/8 is the zero padding of another one, not a target.
        squeezed = ((value >> 64) << 56) | (value & ((1 << 56) - 1))
        readings = [value & 0xFFFFFFFF]
        if (value >> 56) & 0xFF == 0:
            readings += [(squeezed >> (88 - prefix)) & 0xFFFFFFFF for prefix in (48, 56, 64)]
        found += [ipaddress.IPv4Address(reading) for reading in readings if reading >> 24 != 0]
    if address in _IPV4_COMPATIBLE and value > 1:
        found.append(ipaddress.IPv4Address(value))
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if (value >> 32) & 0xFDFFFFFF == 0x00005EFE:  # ISATAP interface identifier
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    return found


def _address_refusal(address: Address, *, allow_loopback: bool) -> tuple[Refusal, Address] | None:
    """Why `address` is refused, and the address that decided it (an embedded IPv4 one)."""
    if address in _METADATA_ADDRESSES:
        return Refusal.METADATA, address
    if address.is_unspecified or address in _THIS_NETWORK:
        return Refusal.UNSPECIFIED, address
    if address.is_loopback:
        return None if allow_loopback else (Refusal.LOOPBACK, address)
    if address.is_link_local:
        return Refusal.LINK_LOCAL, address
    if address.is_multicast or address == _BROADCAST:
        return Refusal.MULTICAST, address
    if address in _RESERVED_V4:
        return Refusal.RESERVED, address
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        inner = [_address_refusal(item, allow_loopback=allow_loopback) for item in embedded]
        # The gravest reason wins: a metadata target is reported as such.
        refusals = [item for item in inner if item is not None]
        if refusals:
            return min(refusals, key=lambda item: _GRAVITY.index(item[0]))
    return None


def _name_refusal(name: str, *, allow_loopback: bool) -> Refusal | None:
    labels = name.split(".")
    if name in _METADATA_NAMES or (
        labels[0] in _METADATA_FIRST_LABELS and labels[-1] == "internal"
    ):
        return Refusal.METADATA
    if name in _LOOPBACK_NAMES or labels[-1] == "localhost":
        return None if allow_loopback else Refusal.LOOPBACK
    return None


def _host_refusal(raw_host: str, *, allow_loopback: bool) -> tuple[Refusal, str] | None:
    """Why `raw_host` is refused, and the host or address that reason is about."""
    if "%" in raw_host:
        return Refusal.ESCAPED_HOST, raw_host  # also an IPv6 zone, which only link-local has
    if ":" in raw_host:
        try:
            address: Address | None = ipaddress.IPv6Address(raw_host)
        except ValueError:
            return Refusal.BAD_HOST, raw_host
    else:
        host = raw_host.rstrip(".").lower()
        if not host or not _NAME.fullmatch(host) or not is_dns_length(host):
            return Refusal.BAD_HOST, raw_host
        address = _loose_ipv4(host)
        if address is None:
            refusal = _name_refusal(host, allow_loopback=allow_loopback)
            return None if refusal is None else (refusal, host)
    assert address is not None
    found = _address_refusal(address, allow_loopback=allow_loopback)
    return None if found is None else (found[0], str(found[1]))


def refusal_for_host(raw_host: str, *, allow_loopback: bool) -> Refusal | None:
    """Why a host, as yarl's `raw_host` gives it, must not be sent a file (None: it may).

    Trailing dots are dropped first: `localhost.` and `169.254.169.254.` reach the same place
    as the undotted host."""
    found = _host_refusal(raw_host, allow_loopback=allow_loopback)
    return None if found is None else found[0]


def _is_loopback_api(api_base_url: str) -> bool:
    try:
        host = URL(api_base_url).raw_host
    except (ValueError, TypeError):
        return False
    if not host:
        return False
    return refusal_for_host(host, allow_loopback=False) is Refusal.LOOPBACK


def _same_host(written: str, reached: str) -> bool:
    # `written` may carry a port, brackets or a trailing dot; `reached` is the bare host.
    host = written[1:].split("]", 1)[0] if written.startswith("[") else written.rsplit(":", 1)[0]
    return host.rstrip(".").lower() == reached


def _scheme(url: str) -> str:
    try:
        return URL(url).scheme.lower()
    except (ValueError, TypeError):
        return ""


def check_upload_url(url: str, *, api_base_url: str) -> str:
    """Return `url` if the file may be sent there, else raise UnsafeURLError naming the host
    (never the path or query) and the reason.

    Rules: https, unless the API itself is plain http (a local emulator); a host is required,
    a valid one, without percent-escapes; no user:password in the URL; never a cloud-metadata,
    link-local, unspecified, multicast or reserved address; loopback only when the API base
    URL's host is itself loopback. Private addresses stay allowed, so on-premises storage works.
    """
    written = host_for_message(url)
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        # yarl's reasons name the port or the host; one that might quote the query is not shown.
        reason = str(exc) if "?" not in str(exc) else "unparsable"
        raise UnsafeURLError(
            f"refusing to upload to {written}: {Refusal.MALFORMED.value} ({reason})"
        ) from None
    api_scheme = _scheme(api_base_url)
    scheme = parsed.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURLError(
            f"refusing to upload to {written} {f'over {scheme}' if scheme else '(no scheme)'}: "
            f"{Refusal.SCHEME.value}"
        )
    if scheme == "http" and api_scheme != "http":
        raise UnsafeURLError(
            f"refusing to upload to {written} over http: {Refusal.PLAIN_HTTP.value}"
        )
    raw_host = parsed.raw_host
    if not raw_host:
        raise UnsafeURLError(f"refusing to upload to {written}: {Refusal.NO_HOST.value}")
    # Userinfo would go to storage as credentials; an empty one (`https://@host/`, which yarl
    # drops) has no use in a presigned URL either.
    if parsed.raw_user is not None or parsed.raw_password is not None or "@" in _authority(url):
        raise UnsafeURLError(f"refusing to upload to {written}: {Refusal.CREDENTIALS.value}")
    found = _host_refusal(raw_host, allow_loopback=_is_loopback_api(api_base_url))
    if found is not None:
        refusal, reached = found
        shown = written if _same_host(written, reached) else f"{written} ({reached})"
        raise UnsafeURLError(f"refusing to upload to {shown}: {refusal.value}")
    return url
