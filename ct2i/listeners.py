"""Which sockets a local Ray's processes listen on, and which of them reach beyond loopback.

Used by the cluster demo (`python -m ct2i.listeners --cmdline-contains RAY_TMP` fails the demo when Ray is
exposed) and by the tests of `ct2i serve` and `make demo`, which read the sockets of the processes they started.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import sys

import psutil

SERVE_REPLICA = re.compile(r"^ray::ServeReplica:")
"""Ray 2.60 binds each Serve replica's inter-deployment gRPC server to `[::]:0`, hard-coded
(ray/serve/_private/replica.py, `add_port_to_grpc_server(self._server, "[::]:0")`), with no setting to change it.
That server is built with Ray's token-auth interceptors (`create_grpc_server_with_interceptors`), so with auth on
it refuses callers without the token. It is the one exception, stated in docs/operators.md; `exposed` keeps it to
exactly those processes, so any other wildcard listener still counts."""


def descendants(root_pid: int) -> set[int]:
    root = psutil.Process(root_pid)
    return {root_pid} | {child.pid for child in root.children(recursive=True)}


def processes_whose_cmdline_contains(text: str) -> set[int]:
    """`ray start` daemonizes its GCS and raylet (they outlive it), so they are found by their temp dir."""
    found = set()
    for process in psutil.process_iter(["pid", "cmdline"]):
        if any(text in part for part in process.info["cmdline"] or ()):
            found.add(process.info["pid"])
    return found


def listening_sockets(pids: set[int]) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket and bound UDP socket of `pids`."""
    found = []
    for conn in psutil.net_connections(kind="inet"):
        listening = conn.status == psutil.CONN_LISTEN or (conn.type == 2 and not conn.raddr)
        if conn.pid in pids and listening and conn.laddr:
            try:
                name = psutil.Process(conn.pid).name()
            except psutil.NoSuchProcess:
                continue
            found.append((name, conn.laddr.ip, conn.laddr.port))
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%")[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def exposed(sockets: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    return [s for s in sockets if not is_loopback(s[1]) and not SERVE_REPLICA.match(s[0])]


def has_routable_interface() -> bool:
    """Whether this machine has an address beyond loopback: without one, Ray cannot bind anything else, and a
    check that finds only loopback proves nothing."""
    return any(not is_loopback(a.address) for addrs in psutil.net_if_addrs().values() for a in addrs
               if a.family.name in ("AF_INET", "AF_INET6"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ct2i.listeners",
                                     description="Fail when a local Ray listens beyond loopback.")
    parser.add_argument("--cmdline-contains", required=True, metavar="TEXT",
                        help="the Ray's processes are those whose command line contains TEXT (its --temp-dir)")
    args = parser.parse_args(argv)
    sockets = listening_sockets(processes_whose_cmdline_contains(args.cmdline_contains))
    names = {name for name, _, _ in sockets}
    if not {"gcs_server", "raylet"} <= names:
        print(f"no GCS or raylet found among processes matching {args.cmdline_contains!r}: {sorted(names)}",
              file=sys.stderr)
        return 2
    if bad := exposed(sockets):
        print("listening beyond loopback: " + ", ".join(f"{n} {a}:{p}" for n, a, p in bad), file=sys.stderr)
        return 1
    print(f"{len(sockets)} sockets of {len(names)} Ray processes, all on loopback"
          + ("" if has_routable_interface() else " (this machine has no other address)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
