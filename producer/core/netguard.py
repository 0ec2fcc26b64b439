"""Which network addresses media may come from: the pure checks that workers (`worker/media/https.py`) apply to
every http(s) download and that `vlmq api` applies to a URL before it enqueues a job.

A job names the URL, so without these checks any producer could make a worker read its cloud metadata endpoint
(169.254.169.254), a localhost admin port or an internal service. Only public addresses pass, unless the address
is inside a network the deployment allows (`VLMQ_HTTP_ALLOWED_NETWORKS`).
"""

from __future__ import annotations

from collections.abc import Sequence
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

# DNS64 writes an IPv4-only host's address as 64:ff9b::a.b.c.d; the IPv4 address is the one that counts.
_NAT64 = ip_network("64:ff9b::/96")

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


def effective_address(ip: Address) -> Address:
    """The IPv4 address an IPv6 address only translates (::ffff:a.b.c.d, 64:ff9b::a.b.c.d), else the address."""
    if isinstance(ip, IPv6Address):
        if ip.ipv4_mapped is not None:
            return ip.ipv4_mapped
        if ip in _NAT64:
            return IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip


def is_public(address: str) -> bool:
    """Whether an address is on the public internet: not private, loopback, link-local, multicast, reserved, ..."""
    ip = effective_address(ip_address(address))
    if isinstance(ip, IPv6Address):
        if ip.sixtofour is not None and not is_public(str(ip.sixtofour)):  # 2002:a.b.c.d:: routes to a.b.c.d
            return False
        if ip.is_site_local:
            return False
    blocked = ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved
    return ip.is_global and not (blocked or ip.is_unspecified)


def address_allowed(address: str, networks: Sequence[Network]) -> bool:
    """Whether media may be read from `address`: public, or inside one of `networks`."""
    raw = ip_address(address)
    return any(ip in net for ip in (raw, effective_address(raw)) for net in networks) or is_public(address)


def parse_networks(cidrs: Sequence[str]) -> list[Network]:
    """`VLMQ_HTTP_ALLOWED_NETWORKS` as networks; raises ValueError with a hint on a bad entry."""
    try:
        return [ip_network(net, strict=False) for net in cidrs]
    except ValueError as exc:
        raise ValueError(f"VLMQ_HTTP_ALLOWED_NETWORKS: {exc}. Hint: CIDRs like 10.1.2.0/24 or fd00::/8") from None
