"""IpBlocklist: the blocked addresses and CIDRs, matched without scanning every network.

The data plane asks about every connection's peer address, so the common case
(no CIDR entries, an IPv4 peer) is one set lookup. Networks are grouped by
prefix length: a match costs one shift and one set lookup per distinct prefix
length (at most 33 for IPv4, 129 for IPv6), however many networks are blocked.
"""

from __future__ import annotations

from collections.abc import Iterable
from ipaddress import (
    IPv4Address,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)

_MAPPED = IPv6Network("::ffff:0:0/96")  # IPv4-mapped IPv6 addresses (RFC 4291 §2.5.5.2)


def canonical(entry: str) -> str:
    """The one spelling an address or CIDR is kept under; raises ValueError if it is neither.

    A host bits set CIDR ("10.1.2.3/8") names its network ("10.0.0.0/8"), a
    full-length prefix ("10.0.0.1/32") names the address itself, and IPv4-mapped
    IPv6 ("::ffff:10.0.0.1") names the IPv4 form the peer is matched under.
    """
    net: IPv4Network | IPv6Network = ip_network(entry.strip(), strict=False)
    if isinstance(net, IPv6Network) and net.prefixlen >= 96 and net.subnet_of(_MAPPED):
        net = IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    if net.prefixlen == net.max_prefixlen:
        return str(net.network_address)
    return str(net)


class IpBlocklist:
    """Blocked addresses and networks; `ip in blocklist` is what the data plane calls."""

    def __init__(self, entries: Iterable[str] = ()) -> None:
        self._exact: set[str] = set()
        # version -> prefix length -> network numbers shifted right by the host bits
        self._nets: dict[int, dict[int, set[int]]] = {}
        # canonical entry -> spellings seen for it (so removing one removes all from the store)
        self._spellings: dict[str, set[str]] = {}
        for entry in entries:
            self.add(entry)

    def __len__(self) -> int:
        """How many distinct entries are blocked."""
        return len(self._spellings)

    @property
    def entries(self) -> set[str]:
        """Every entry in canonical spelling; for the admin API's listing."""
        return set(self._spellings)

    def add(self, entry: str) -> str:
        """Block an address or CIDR and return its canonical spelling; raises ValueError."""
        key = canonical(entry)
        self._spellings.setdefault(key, set()).add(entry)
        net = ip_network(key, strict=False)
        if net.prefixlen == net.max_prefixlen:
            self._exact.add(key)
        else:
            shift = net.max_prefixlen - net.prefixlen
            by_len = self._nets.setdefault(net.version, {})
            by_len.setdefault(net.prefixlen, set()).add(
                int(net.network_address) >> shift
            )
        return key

    def discard(self, entry: str) -> set[str]:
        """Unblock an address or CIDR; returns every spelling that was stored for it."""
        key = canonical(entry)
        spellings = self._spellings.pop(key, set())
        spellings.add(key)
        net = ip_network(key, strict=False)
        if net.prefixlen == net.max_prefixlen:
            self._exact.discard(key)
            return spellings
        by_len = self._nets.get(net.version, {})
        numbers = by_len.get(net.prefixlen)
        if numbers is not None:
            numbers.discard(
                int(net.network_address) >> (net.max_prefixlen - net.prefixlen)
            )
            if not numbers:
                del by_len[net.prefixlen]
            if not by_len:
                self._nets.pop(net.version, None)
        return spellings

    def __contains__(self, ip: object) -> bool:
        """Whether a peer address (as the transport reports it) is blocked; False if unparsable."""
        if not isinstance(ip, str):
            return False
        if ip in self._exact:
            return True
        if not self._nets and ":" not in ip:
            # Fast path: a dotted IPv4 peer is already canonical, and no CIDR can match.
            return False
        try:
            addr: IPv4Address | IPv6Address = ip_address(ip)
        except ValueError:
            return False
        if isinstance(addr, IPv6Address):
            if addr.ipv4_mapped is not None:
                # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d.
                addr = addr.ipv4_mapped
            elif addr.scope_id is not None:
                addr = IPv6Address(int(addr))
        spelled = str(addr)
        if spelled != ip and spelled in self._exact:
            return True
        by_len = self._nets.get(addr.version)
        if not by_len:
            return False
        number, width = int(addr), addr.max_prefixlen
        return any((number >> (width - plen)) in nets for plen, nets in by_len.items())
