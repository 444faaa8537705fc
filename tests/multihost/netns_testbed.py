"""A multi-host test bed on one machine: one Linux network namespace per host, joined by a bridge.

Each host (the coordinator and every silo) is a namespace ``<tag>-<host>`` with loopback and one
interface ``eth0`` holding its address in the test subnet; ``eth0`` is one end of a veth pair whose
other end is a port of the bridge ``br0``, which lives in a namespace of its own (``<tag>-br``).
Nothing is created in, routed to or addressed from the machine's own namespace: the hosts reach each
other and nothing else. :meth:`TestBed.down` deletes every namespace (their interfaces go with them);
it is safe to call twice and after a failed :meth:`TestBed.up`.

Needs root and iproute2 (``ip netns``); :func:`unavailable` says why not, for a skip.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

SUBNET = "10.213.0.0/24"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and out.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {out.stderr.strip()}")
    return out


def unavailable() -> str | None:
    """Why the test bed cannot run here (a skip reason), or None."""
    if os.geteuid() != 0:
        return "network namespaces need root (run the multihost tests as root, as CI does)"
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    probe = f"stprobe-{secrets.token_hex(3)}"
    out = _ip("netns", "add", probe, check=False)
    if out.returncode != 0:
        return f"`ip netns add` fails here: {out.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


def nft_missing() -> str | None:
    """Why :meth:`TestBed.refused` cannot cut a connection here (a skip reason), or None."""
    if shutil.which("nft") is None:
        return "nftables' `nft` is not installed (infra/install.sh installs it as root)"
    return None


def subnet_in_use(subnet: str) -> list[str]:
    """Addresses or routes of the machine's own namespace inside ``subnet`` (the test bed must not clash)."""
    net = ipaddress.ip_network(subnet)
    clashes = []
    for entry in json.loads(_ip("-j", "addr", "show").stdout or "[]"):
        for a in entry.get("addr_info", []):
            if a.get("family") == "inet" and ipaddress.ip_interface(
                f"{a['local']}/{a['prefixlen']}"
            ).network.overlaps(net):
                clashes.append(f"{entry['ifname']} {a['local']}/{a['prefixlen']}")
    for r in json.loads(_ip("-j", "route", "show").stdout or "[]"):
        dst = r.get("dst")
        if dst and dst != "default" and ipaddress.ip_network(dst, strict=False).overlaps(net):
            clashes.append(f"route {dst}")
    return clashes


@dataclass
class TestBed:
    """Hosts in namespaces on one bridge; the first host gets ``.1``, the others ``.11``, ``.12``, ..."""

    hosts: Sequence[str]
    subnet: str = SUBNET
    tag: str = field(default_factory=lambda: f"st{secrets.token_hex(2)}")
    addresses: dict[str, str] = field(init=False, default_factory=dict)
    created: list[str] = field(init=False, default_factory=list)

    __test__ = False  # not a test class

    def __post_init__(self) -> None:
        net = list(ipaddress.ip_network(self.subnet).hosts())
        self.addresses = {h: str(net[0 if i == 0 else 10 + i - 1]) for i, h in enumerate(self.hosts)}
        self.prefixlen = ipaddress.ip_network(self.subnet).prefixlen

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"[:31]

    @property
    def bridge_ns(self) -> str:
        return f"{self.tag}-br"

    def up(self) -> TestBed:
        clashes = subnet_in_use(self.subnet)
        if clashes:
            raise RuntimeError(f"test subnet {self.subnet} is in use on this machine: {', '.join(clashes)}")
        try:
            self._add_ns(self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, host in enumerate(self.hosts):
                ns = self.ns(host)
                self._add_ns(ns)
                port = f"p{i}"
                _ip(
                    "-n",
                    self.bridge_ns,
                    "link",
                    "add",
                    port,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns,
                )
                _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0", "up")
                _ip("-n", ns, "addr", "add", f"{self.addresses[host]}/{self.prefixlen}", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", ns, "link", "set", "lo", "up")
        except BaseException:
            self.down()
            raise
        return self

    def _add_ns(self, ns: str) -> None:
        _ip("netns", "add", ns)
        self.created.append(ns)

    def down(self) -> None:
        """Delete every namespace this bed created (killing what still runs in a host first)."""
        for ns in reversed(self.created):
            for _ in range(5):  # again while a process forked as the others were killed
                out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
                if not out.stdout.split():
                    break
                for pid in out.stdout.split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), 9)
                time.sleep(0.2)
            _ip("netns", "del", ns, check=False)
        self.created.clear()

    def exec(self, host: str, cmd: Iterable[str]) -> list[str]:
        """``cmd`` as run inside ``host``'s namespace."""
        return ["ip", "netns", "exec", self.ns(host), *cmd]

    def run(self, host: str, cmd: Iterable[str], **kw) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.exec(host, cmd), capture_output=True, text=True, **kw)

    def link(self, host: str, up: bool) -> None:
        """Bring ``host``'s only interface up or down (the cable, from inside the host)."""
        _ip("-n", self.ns(host), "link", "set", "eth0", "up" if up else "down")

    @contextlib.contextmanager
    def refused(self, host: str, address: str, port: int) -> Iterator[None]:
        """Inside: ``host``'s own TCP connections to ``address:port`` are cut, and nothing else.

        An nftables rule in ``host``'s namespace answers each packet ``host`` sends there with a TCP
        reset: open connections break at their next packet and new ones are refused at once, as when a
        link or a store's port goes away. (A silent drop of a few seconds is absorbed by TCP
        retransmission and never reaches the application.) Needs ``nft`` (:func:`nft_missing`).
        """
        table = f"{self.tag}_cut"
        nft = ["ip", "netns", "exec", self.ns(host), "nft"]
        hook = "{ type filter hook output priority 0 ; policy accept ; }"
        match = f"ip daddr {address} tcp dport {port} reject with tcp reset"
        rules = (
            ["add", "table", "inet", table],
            ["add", "chain", "inet", table, "out", hook],
            ["add", "rule", "inet", table, "out", *match.split()],
        )
        try:
            for rule in rules:
                out = subprocess.run([*nft, *rule], capture_output=True, text=True, timeout=30)
                if out.returncode != 0:
                    raise RuntimeError(f"nft {' '.join(rule)}: {out.stderr.strip()}")
            yield
        finally:
            subprocess.run([*nft, "delete", "table", "inet", table], capture_output=True, timeout=30)

    def counters(self, host: str) -> dict[str, int]:
        """Bytes and packets through ``host``'s interface so far."""
        info = json.loads(_ip("-n", self.ns(host), "-s", "-j", "link", "show", "eth0").stdout)[0]["stats64"]
        return {
            "rx_bytes": info["rx"]["bytes"],
            "tx_bytes": info["tx"]["bytes"],
            "rx_packets": info["rx"]["packets"],
            "tx_packets": info["tx"]["packets"],
        }

    def pids(self, host: str) -> list[int]:
        out = subprocess.run(["ip", "netns", "pids", self.ns(host)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]
