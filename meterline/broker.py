"""A single-node Apache Kafka broker (KRaft: broker + controller in one JVM) on 127.0.0.1.

Jars come from Maven Central through deploy/kafka/pom.xml (or from $KAFKA_HOME/libs).
Everything the broker writes lives under <data_dir>/kafka. When settings name an
existing cluster (METERLINE_KAFKA_BOOTSTRAP, other than this broker's own address) nothing is started.

Secure mode (settings.kafka_secure, `kafka start --secure`): clients authenticate with SASL/SCRAM-SHA-512
and ACLs are enforced (StandardAuthorizer, nothing allowed without an ACL); the principals, their
passwords (<data_dir>/kafka/credentials.json, mode 0600) and ACLs come from meterline/kafka_acl.py.
The controller listener takes SASL/PLAIN with the admin's password only, so nothing on the machine can
talk to the controller as an anonymous super user.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient

from . import kafka_acl
from .errors import KAFKA_PROBE_S, UserError
from .files import write_private
from .settings import Settings

POM = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"
HEAP = os.environ.get("METERLINE_KAFKA_HEAP", "-Xms256m -Xmx1g")


class BrokerError(RuntimeError):
    """The broker could not be set up or started; the message says what to do."""


class SilentBootstrap(BrokerError, UserError):
    """METERLINE_KAFKA_BOOTSTRAP names another cluster, which does not answer (a setting to change: exit 2)."""


@dataclass
class BrokerStatus:
    managed: bool  # started by meterline (False: an external cluster)
    running: bool
    pid: int | None
    bootstrap: str
    topics: int | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


_AUTH_FAILED = (KafkaError._AUTHENTICATION, KafkaError.SASL_AUTHENTICATION_FAILED)


def probe(conf: dict, timeout: float) -> tuple[int | None, str | None]:
    """Ask a cluster for its topics: (how many, None) when it answers; (None, librdkafka's reason in one
    line) as soon as it refuses the credentials; (None, None) when nothing answered within `timeout`.
    Quiet: nothing goes to stderr (librdkafka would repeat the failure every few hundred ms)."""
    refused: list[str] = []

    def on_error(err: KafkaError) -> None:
        if err.code() in _AUTH_FAILED:  # "…/bootstrap: SASL authentication error: … (after 316ms in state AUTH_REQ)"
            refused.append(re.sub(r"^\S+://\S+?: | \(after \d+ms in state \w+\)$", "", err.str()))

    admin = AdminClient({**conf, "socket.connection.setup.timeout.ms": 1000, "log_level": 0, "error_cb": on_error})
    deadline = time.monotonic() + timeout
    while True:
        try:
            return len(admin.list_topics(timeout=max(0.05, min(0.5, deadline - time.monotonic()))).topics), None
        except Exception:  # noqa: BLE001 - not (yet) answering, for whatever reason
            admin.poll(0)  # serves error_cb
        if refused or time.monotonic() >= deadline:
            return None, (refused[0] if refused else None)


class LocalBroker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.data_dir / "kafka"
        self.pid_file = self.home / "broker.pid"
        self.log_file = self.home / "logs" / "server.out"
        self.server_log = self.home / "logs" / "server.log"  # log4j: where the broker says why it stopped
        self.credentials_file = self.home / "credentials.json"
        self.config_file = self.home / "server.properties"

    # ---- public API -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> BrokerStatus:
        """Start the broker unless it (or an external cluster) already answers. Idempotent."""
        if self.settings.kafka_bootstrap and not self._bootstrap_is_own():
            return self._external()
        secure = self.settings.kafka_secure
        if self._pid_alive():
            if self.running_secure() != secure:
                raise BrokerError(f"the broker of {self.home} runs {'with' if self.running_secure() else 'without'} SASL and ACLs "
                                  f"(--secure); `meterline kafka stop` it to start it {'with' if secure else 'without'} them")
            return self._grant(self._wait_ready(timeout))
        if self.metadata(timeout=1.0) is not None:
            raise BrokerError(f"something else already answers on {self.settings.bootstrap}; "
                              "set METERLINE_KAFKA_BOOTSTRAP to use it, or METERLINE_KAFKA_PORT to pick a free port")
        java = self._require("java", "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)")
        classpath = self._classpath()
        admin_password = None
        if secure:
            creds = self.credentials()
            if self._formatted() and not creds.get("admin_ready"):  # formatted without --secure: no admin user yet
                self._add_admin_over_plaintext(java, classpath, creds["users"][kafka_acl.ADMIN], timeout)
            admin_password = creds["users"][kafka_acl.ADMIN]
        config = self._write_config(secure)
        self._format_storage(java, classpath, config, admin_password)
        proc = self._launch(java, classpath, config)
        return self._grant(self._wait_ready(timeout, proc=proc))

    def credentials(self) -> dict:
        """{"mechanism", "users": {user: password}, "admin_ready"} from credentials.json (mode 0600); passwords
        are made once, for users that have none, and kept across restarts."""
        try:
            creds = json.loads(self.credentials_file.read_text())
        except FileNotFoundError:
            creds = {}
        except (OSError, ValueError) as err:
            raise BrokerError(f"{self.credentials_file} is unreadable ({err}); delete it and the broker's data to start over")
        users = kafka_acl.new_passwords(creds.get("users"))
        if users != creds.get("users"):
            creds = {"mechanism": kafka_acl.MECHANISM, "users": users, "admin_ready": bool(creds.get("admin_ready"))}
            write_private(self.credentials_file, json.dumps(creds, indent=2) + "\n")
        return creds

    def admin_config(self, **extra) -> dict:
        """librdkafka config of the admin principal on this (secured, managed) broker."""
        return {"bootstrap.servers": self.settings.bootstrap,
                **self._sasl(kafka_acl.ADMIN, self.credentials()["users"][kafka_acl.ADMIN]), **extra}

    def running_secure(self) -> bool:
        """Whether the broker's current server.properties (the running one's, if it runs) asks for SASL."""
        try:
            return "sasl.enabled.mechanisms=" in self.config_file.read_text()
        except OSError:
            return False

    def stop(self, timeout: float = 60.0) -> bool:
        """Stop the managed broker cleanly (SIGTERM, then SIGKILL after `timeout`). True if one was running."""
        pid = self._pid_alive()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return False
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._alive(pid):
            time.sleep(0.2)
        if self._alive(pid):
            os.kill(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)
        return True

    def status(self) -> BrokerStatus:
        topics = self.metadata(timeout=3.0)
        managed = not self.settings.kafka_bootstrap
        pid = self._pid_alive() if managed else None
        return BrokerStatus(managed, topics is not None, pid, self.settings.bootstrap, topics)

    def metadata(self, timeout: float) -> int | None:
        """Number of topics the broker reports, or None when it does not answer."""
        return self._probe(timeout)[0]

    def _probe(self, timeout: float) -> tuple[int | None, str | None]:
        """probe() of this broker. Our own broker is asked as its admin (or without security when it has
        none), whatever client credentials the settings hold; an external cluster with the settings' security."""
        if self.settings.kafka_bootstrap:
            conf = self.settings.kafka_config()
        elif self.running_secure() and self.credentials_file.exists():
            conf = self.admin_config()
        else:
            conf = {"bootstrap.servers": self.settings.bootstrap}
        return probe(conf, timeout)

    # ---- set-up -----------------------------------------------------------------------------

    def _classpath(self) -> str:
        if self.settings.kafka_home:
            libs = self.settings.kafka_home / "libs"
            if not any(libs.glob("kafka_2.13-*.jar")):
                raise BrokerError(f"KAFKA_HOME={self.settings.kafka_home} is not an Apache Kafka distribution (no libs/kafka_2.13-*.jar)")
            return f"{libs}/*"
        libs = self.home / "libs"
        if not any(libs.glob("kafka_2.13-*.jar")):
            mvn = self._require("mvn", "install Maven (Debian: apt-get install maven) or point KAFKA_HOME at a Kafka distribution")
            if not POM.exists():
                raise BrokerError(f"{POM} is missing; run meterline from its source checkout or set KAFKA_HOME")
            proc = subprocess.run(
                [mvn, "-q", "-B", "-f", str(POM), "dependency:copy-dependencies", f"-DoutputDirectory={libs}", "-DincludeScope=runtime"],
                capture_output=True, text=True,
            )
            if proc.returncode != 0:
                raise BrokerError("Maven could not fetch Kafka's jars:\n" + (proc.stdout + proc.stderr)[-2000:])
        return f"{libs}/*"

    def _write_config(self, secure: bool = False) -> Path:
        s = self.settings
        (self.home / "data").mkdir(parents=True, exist_ok=True)
        props = {
            "process.roles": "broker,controller",
            "node.id": "1",
            "controller.quorum.voters": f"1@127.0.0.1:{s.kafka_controller_port}",
            "listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{s.kafka_port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.home / "data"),
            "num.partitions": "3",
            "auto.create.topics.enable": "true",
            "offsets.topic.replication.factor": "1",
            "transaction.state.log.replication.factor": "1",
            "transaction.state.log.min.isr": "1",
            "share.coordinator.state.topic.replication.factor": "1",
            "share.coordinator.state.topic.min.isr": "1",
            "group.initial.rebalance.delay.ms": "0",
            "log.cleaner.backoff.ms": "1000",
        }
        if secure:
            password = self.credentials()["users"][kafka_acl.ADMIN]
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule"
            plain = "org.apache.kafka.common.security.plain.PlainLoginModule"
            props.update({
                "listeners": f"SASL_PLAINTEXT://127.0.0.1:{s.kafka_port},CONTROLLER://127.0.0.1:{s.kafka_controller_port}",
                "advertised.listeners": f"SASL_PLAINTEXT://127.0.0.1:{s.kafka_port}",
                "inter.broker.listener.name": "SASL_PLAINTEXT",
                "listener.security.protocol.map": "CONTROLLER:SASL_PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT",
                "sasl.enabled.mechanisms": kafka_acl.MECHANISM,
                "sasl.mechanism.inter.broker.protocol": kafka_acl.MECHANISM,
                "listener.name.sasl_plaintext.scram-sha-512.sasl.jaas.config":
                    f'{scram} required username="{kafka_acl.ADMIN}" password="{password}";',
                # SCRAM users live in the metadata log, which the controller cannot read before it runs: PLAIN here
                "sasl.mechanism.controller.protocol": "PLAIN",
                "listener.name.controller.sasl.enabled.mechanisms": "PLAIN",
                "listener.name.controller.plain.sasl.jaas.config":
                    f'{plain} required username="{kafka_acl.ADMIN}" password="{password}" user_{kafka_acl.ADMIN}="{password}";',
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                "allow.everyone.if.no.acl.found": "false",
                "super.users": f"User:{kafka_acl.ADMIN}",
            })
        write_private(self.config_file, "".join(f"{k}={v}\n" for k, v in props.items()))  # holds a password
        return self.config_file

    def _formatted(self) -> bool:
        return (self.home / "data" / "meta.properties").exists()

    def _format_storage(self, java: str, classpath: str, config: Path, admin_password: str | None = None) -> None:
        if self._formatted():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # like Kafka's own Uuid: a leading "-" reads as an option (1 in 64 runs failed)
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        proc = subprocess.run(
            [java, "-cp", classpath, f"-Dlog4j2.configurationFile={self._write_log4j()}",
             "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), "--ignore-formatted",
             *(["--add-scram", f"{kafka_acl.MECHANISM}=[name={kafka_acl.ADMIN},password={admin_password}]"] if admin_password else [])],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise BrokerError("formatting Kafka storage failed:\n" + (proc.stdout + proc.stderr)[-2000:])
        if admin_password:
            self._mark_admin_ready()

    def _add_admin_over_plaintext(self, java: str, classpath: str, password: str, timeout: float) -> None:
        """Storage formatted without --secure has no SCRAM user: start it once without security, add the
        admin (the same call as later users), stop it; then it can start secured."""
        from confluent_kafka.admin import ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion

        proc = self._launch(java, classpath, self._write_config(secure=False))
        try:
            self._wait_ready(timeout, proc=proc)
            admin = AdminClient({"bootstrap.servers": self.settings.bootstrap})
            upsert = UserScramCredentialUpsertion(kafka_acl.ADMIN, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096),
                                                  password.encode())
            for future in admin.alter_user_scram_credentials([upsert], request_timeout=timeout).values():
                future.result(timeout)
            del admin  # gone before the broker stops: no "connection refused" from it on stderr
        finally:
            self.stop()
        self._mark_admin_ready()

    def _mark_admin_ready(self) -> None:
        creds = self.credentials()
        if not creds.get("admin_ready"):
            write_private(self.credentials_file, json.dumps({**creds, "admin_ready": True}, indent=2) + "\n")

    def _grant(self, status: BrokerStatus) -> BrokerStatus:
        """On a secured broker: every role's user and ACLs, for the settings' topic prefix (idempotent)."""
        if self.settings.kafka_secure:
            try:
                kafka_acl.apply(self.admin_config(), self.settings, self.credentials()["users"])
            except Exception as err:  # noqa: BLE001 - a client error becomes one line
                raise BrokerError(f"the broker is up but its users and ACLs could not be set: {err}") from err
        return status

    @staticmethod
    def _sasl(user: str, password: str) -> dict:
        return {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": kafka_acl.MECHANISM,
                "sasl.username": user, "sasl.password": password}

    def _launch(self, java: str, classpath: str, config: Path) -> subprocess.Popen:
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = {log: log.stat().st_size if log.exists() else 0  # a failed start's reason is after this
                           for log in (self.server_log, self.log_file)}
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                [java, *HEAP.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={self._write_log4j()}", f"-Dkafka.logs.dir={self.home / 'logs'}",
                 "-cp", classpath, "kafka.Kafka", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return proc

    def _write_log4j(self) -> Path:
        path = self.home / "log4j2.properties"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(
                "status = warn\n"
                "appender.file.type = File\n"
                "appender.file.name = file\n"
                f"appender.file.fileName = {self.home / 'logs' / 'server.log'}\n"
                "appender.file.layout.type = PatternLayout\n"
                "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
                "rootLogger.level = INFO\n"
                "rootLogger.appenderRef.file.ref = file\n"
                "logger.kafka.name = kafka\nlogger.kafka.level = WARN\n"
                "logger.apache.name = org.apache.kafka\nlogger.apache.level = WARN\n"
                "logger.state.name = state.change.logger\nlogger.state.level = WARN\n"
            )
        return path

    def _bootstrap_is_own(self) -> bool:
        """METERLINE_KAFKA_BOOTSTRAP names this broker's own address (127.0.0.1 or localhost, its port): start it."""
        return self.settings.kafka_bootstrap in (f"127.0.0.1:{self.settings.kafka_port}", f"localhost:{self.settings.kafka_port}")

    def _external(self) -> BrokerStatus:
        """An existing cluster starts nothing here: it answers now, or the user learns at once what to change."""
        try:
            return self._wait_ready(KAFKA_PROBE_S, managed=False)
        except BrokerError as err:
            if "refused" in str(err):
                raise
        raise SilentBootstrap(f"METERLINE_KAFKA_BOOTSTRAP={self.settings.kafka_bootstrap} names an existing cluster, so "
                              "`kafka start` starts nothing, and it does not answer: start that cluster, or unset "
                              "METERLINE_KAFKA_BOOTSTRAP (or set it to 127.0.0.1:<METERLINE_KAFKA_PORT>) to start the local broker")

    # ---- process helpers --------------------------------------------------------------------

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None, managed: bool = True) -> BrokerStatus:
        deadline = time.monotonic() + timeout
        refusals = 0
        while time.monotonic() < deadline:
            topics, refused = self._probe(timeout=2.0)
            if topics is not None:
                return BrokerStatus(managed, True, self._pid_alive() if managed else None, self.settings.bootstrap, topics)
            refusals = refusals + 1 if refused else 0
            if refusals >= 3:  # it answers, and keeps saying no: waiting longer changes nothing
                who = f"the admin of {self.credentials_file}" if managed else "the credentials of METERLINE_KAFKA_SASL_*"
                raise BrokerError(f"the Kafka broker on {self.settings.bootstrap} refused {who}: {refused}")
            if proc is not None and proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(f"the Kafka broker exited with code {proc.returncode}: {self._reason() or 'no reason logged'} "
                                  f"(see {self.server_log} and {self.log_file})")
            time.sleep(0.3)
        reason = self._reason() if managed else None
        where = f"; see {self.server_log}" + (f" ({reason})" if reason else "") if managed else ""
        raise BrokerError(f"no Kafka broker answered on {self.settings.bootstrap} within {timeout:.0f} s{where}")

    _EXCEPTION = re.compile(r"^(?:Caused by: )?([\w$.]+(?:Exception|Error))(?:: (.*))?$")

    def _reason(self) -> str | None:
        """The broker's own reason for failing this start, in one line: its root cause as worded by the
        exception that wraps it with most context (`KafkaException: Socket server failed to bind to
        127.0.0.1:9092: Address already in use`), else its last ERROR line."""
        lines: list[str] = []
        for log in (self.server_log, self.log_file):  # server.out: what a JVM says before log4j runs
            try:
                with open(log, "rb") as text:
                    text.seek(getattr(self, "_log_start", {}).get(log, 0))
                    lines += text.read().decode(errors="replace").splitlines()
            except OSError:
                pass
        found = [m for m in map(self._EXCEPTION.match, (line.strip() for line in lines)) if m]
        if found:
            root = ([m for m in found if m.group(0).startswith("Caused by")] or found)[-1]
            if root.group(2):  # the exception that wraps the root cause with the most context ("…bind to 127.0.0.1:9092: …")
                root = max((m for m in found if m.group(2) and root.group(2) in m.group(2)), key=lambda m: len(m.group(2)))
            name, text = root.group(1).rsplit(".", 1)[-1], (root.group(2) or "").strip()
            if "Address already in use" in text:
                text = text.rstrip(".") + "; another program holds that port: pick free ones with METERLINE_KAFKA_PORT / METERLINE_KAFKA_CONTROLLER_PORT"
            return f"{name}: {text}" if text else name
        errors = [line for line in lines if re.match(r"^\[[^]]*\] (ERROR|FATAL) ", line)]
        return re.sub(r"^\[[^]]*\] ", "", errors[-1]) if errors else None

    def _pid_alive(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._alive(pid) else None

    @staticmethod
    def _alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        try:  # a zombie child of ours counts as gone
            return os.waitpid(pid, os.WNOHANG) == (0, 0)
        except ChildProcessError:
            return True

    @staticmethod
    def _require(tool: str, hint: str) -> str:
        path = shutil.which(tool)
        if not path:
            raise BrokerError(f"`{tool}` was not found on PATH: {hint}")
        return path
