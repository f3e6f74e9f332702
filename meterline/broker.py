"""A single-node Apache Kafka broker (KRaft: broker + controller in one JVM) on 127.0.0.1.

Jars come from Maven Central through deploy/kafka/pom.xml (or from $KAFKA_HOME/libs).
Everything the broker writes lives under <data_dir>/kafka. When settings name an
existing cluster (METERLINE_KAFKA_BOOTSTRAP) nothing is started.
"""
from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from confluent_kafka.admin import AdminClient

from .settings import Settings

POM = Path(__file__).resolve().parents[1] / "deploy" / "kafka" / "pom.xml"
HEAP = os.environ.get("METERLINE_KAFKA_HEAP", "-Xms256m -Xmx1g")


class BrokerError(RuntimeError):
    """The broker could not be set up or started; the message says what to do."""


@dataclass
class BrokerStatus:
    managed: bool  # started by meterline (False: an external cluster)
    running: bool
    pid: int | None
    bootstrap: str
    topics: int | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


class LocalBroker:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.home = settings.data_dir / "kafka"
        self.pid_file = self.home / "broker.pid"
        self.log_file = self.home / "logs" / "server.out"

    # ---- public API -------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> BrokerStatus:
        """Start the broker unless it (or an external cluster) already answers. Idempotent."""
        if self.settings.kafka_bootstrap:
            return self._wait_ready(timeout, managed=False)
        if self._pid_alive():
            return self._wait_ready(timeout)
        if self.metadata(timeout=1.0) is not None:
            raise BrokerError(f"something else already answers on {self.settings.bootstrap}; "
                              "set METERLINE_KAFKA_BOOTSTRAP to use it, or METERLINE_KAFKA_PORT to pick a free port")
        java = self._require("java", "install a Java 17+ runtime (Debian: apt-get install openjdk-17-jre-headless)")
        classpath = self._classpath()
        config = self._write_config()
        self._format_storage(java, classpath, config)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                [java, *HEAP.split(), "-XX:+UseG1GC", "-Djava.awt.headless=true",
                 f"-Dlog4j2.configurationFile={self._write_log4j()}", f"-Dkafka.logs.dir={self.home / 'logs'}",
                 "-cp", classpath, "kafka.Kafka", str(config)],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        self.pid_file.write_text(str(proc.pid))
        return self._wait_ready(timeout, proc=proc)

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
        admin = AdminClient(self.settings.kafka_config(**{"socket.connection.setup.timeout.ms": 1000, "log_level": 0}))
        try:
            return len(admin.list_topics(timeout=timeout).topics)
        except Exception:
            return None

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

    def _write_config(self) -> Path:
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
        path = self.home / "server.properties"
        path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        return path

    def _format_storage(self, java: str, classpath: str, config: Path) -> None:
        if (self.home / "data" / "meta.properties").exists():
            return
        cluster_id = "-"
        while cluster_id.startswith("-"):  # like Kafka's own Uuid: a leading "-" reads as an option (1 in 64 runs failed)
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        proc = subprocess.run(
            [java, "-cp", classpath, f"-Dlog4j2.configurationFile={self._write_log4j()}",
             "kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(config), "--ignore-formatted"],
            capture_output=True, text=True,
        )
        if proc.returncode != 0:
            raise BrokerError("formatting Kafka storage failed:\n" + (proc.stdout + proc.stderr)[-2000:])

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

    # ---- process helpers --------------------------------------------------------------------

    def _wait_ready(self, timeout: float, proc: subprocess.Popen | None = None, managed: bool = True) -> BrokerStatus:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            topics = self.metadata(timeout=2.0)
            if topics is not None:
                return BrokerStatus(managed, True, self._pid_alive() if managed else None, self.settings.bootstrap, topics)
            if proc is not None and proc.poll() is not None:
                self.pid_file.unlink(missing_ok=True)
                raise BrokerError(f"the Kafka broker exited with code {proc.returncode}; last lines of {self.log_file}:\n{self._log_tail()}")
            time.sleep(0.3)
        where = f"; see {self.log_file}" if managed else ""
        raise BrokerError(f"no Kafka broker answered on {self.settings.bootstrap} within {timeout:.0f} s{where}")

    def _log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

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
