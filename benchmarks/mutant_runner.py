"""A fork server for ``make mutants``: torch is imported once, each mutant's pytest runs in a fresh fork.

    python benchmarks/mutant_runner.py serve SOCKET        # in the background, before mutmut starts
    python benchmarks/mutant_runner.py run SOCKET -- ARGS   # mutmut's runner: pytest ARGS, exit code back
    python benchmarks/mutant_runner.py stop SOCKET

Why: mutmut 2.5.1 starts its runner once per mutant, and importing torch costs about 2 s of CPU (10 s
and more on the shared 2-core machine), several times the focused tests themselves; an optimizer's
first step imports torch._dynamo (6 s more). The server imports torch, numpy, scipy and pytest and takes
one Adam step on a tensor of its own, and never imports ``entropy_probe``: each fork imports the package
from disk, so it sees the mutant mutmut has just written (the server refuses to start if
``entropy_probe`` is imported).
The client imports nothing heavy. A fork that runs longer than ``--limit`` seconds is killed and
reported as failed (mutmut's own timeout, set above it in the Makefile, then never fires first).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while chunk := conn.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def serve(path: str, limit: int) -> None:
    import numpy  # noqa: F401  (imported once here, inherited by every fork)
    import pytest
    import scipy.stats  # noqa: F401
    import torch

    torch.set_num_threads(1)  # no worker threads before fork (tests/conftest.py sets 1 as well)
    # An optimizer's first step imports torch._dynamo (about 6 s of CPU): once here, not in every fork.
    weight = torch.nn.Parameter(torch.ones(2))
    (weight * weight).sum().backward()
    torch.optim.Adam([weight]).step()
    if any(name == "entropy_probe" or name.startswith("entropy_probe.") for name in sys.modules):
        sys.exit("mutant_runner: entropy_probe is already imported; the forks would not see the mutants")
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    while True:
        conn, _ = server.accept()
        with conn:
            request = _recv_all(conn)  # the client shuts its write side after the request
            if request == b"stop":
                conn.sendall(b"0")
                break
            args = request.decode().split("\0")
            pid = os.fork()
            if pid == 0:  # the fork: a fresh import of the (mutated) package, then pytest
                server.close()
                conn.close()
                signal.alarm(limit)  # default action: the fork dies, reported below as a failure
                os._exit(int(pytest.main(args)))
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
            if code < 0:
                print(f"mutant_runner: pytest killed by signal {-code} (limit {limit} s)", flush=True)
                code = 1
            conn.sendall(str(code).encode())
    server.close()
    os.unlink(path)


def request(path: str, payload: bytes) -> int:
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(path)
    client.sendall(payload)
    client.shutdown(socket.SHUT_WR)
    return int(_recv_all(client).decode())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["serve", "run", "stop"])
    parser.add_argument("socket")
    parser.add_argument("--limit", type=int, default=300, help="seconds a fork may run (serve)")
    parser.add_argument("pytest_args", nargs="*")
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(args.socket, args.limit)
    elif args.command == "stop":
        request(args.socket, b"stop")
    else:
        sys.exit(request(args.socket, "\0".join(args.pytest_args).encode()))


if __name__ == "__main__":
    main()
