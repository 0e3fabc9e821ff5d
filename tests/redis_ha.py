"""Redis Sentinel and Redis Cluster setups for the tests, from the `redis-server` binary on free
loopback ports (and `redis-cli --cluster create`): real servers, started and stopped by fixtures."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import redis

from tests.conftest import free_port, wait_until

MASTER = "mxisd-test"


class RedisNode:
    """One redis-server (or sentinel) process on a free port, its files in a folder of its own."""

    def __init__(self, root: Path, *args: str, sentinel_conf: str | None = None, password: str | None = None) -> None:
        self.port = free_port()
        self.password = password
        self.dir = root / f"node-{self.port}"
        self.dir.mkdir(parents=True)
        self.log = self.dir / "log"
        if sentinel_conf is not None:
            # A sentinel rewrites its config file as it learns: it needs one of its own.
            conf = self.dir / "sentinel.conf"
            conf.write_text(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{sentinel_conf}")
            command = ["redis-server", str(conf), "--sentinel"]
        else:
            command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
                       "--save", "", "--appendonly", "no", *args]
            if password:
                command += ["--requirepass", password, "--masterauth", password]
        self.process = subprocess.Popen([*command, "--logfile", str(self.log)], stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        self.address = f"127.0.0.1:{self.port}"
        wait_until(self.answers, 10, f"redis-server on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, password=self.password, decode_responses=True, socket_timeout=5)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"redis-server on port {self.port} exited:\n{self.log.read_text()}")
        try:
            with self.client() as client:
                return bool(client.ping())
        except redis.exceptions.ConnectionError:
            return False

    def kill(self) -> None:
        """As a crash: SIGKILL."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


class SentinelSetup:
    """One master, one replica and three sentinels (quorum 2) watching them; password: the
    master's and the replica's."""

    def __init__(self, root: Path, password: str | None = None) -> None:
        self.master = RedisNode(root, password=password)
        self.replica = RedisNode(root, "--replicaof", "127.0.0.1", str(self.master.port), password=password)
        watch = (f"sentinel monitor {MASTER} 127.0.0.1 {self.master.port} 2\n"
                 f"sentinel down-after-milliseconds {MASTER} 1000\n"
                 f"sentinel failover-timeout {MASTER} 10000\n"
                 + (f"sentinel auth-pass {MASTER} {password}\n" if password else ""))
        self.sentinels = [RedisNode(root, sentinel_conf=watch) for _ in range(3)]
        self.nodes = [self.master, self.replica, *self.sentinels]
        wait_until(self._watching, 30, "the sentinels to see the replica and each other")

    def _watching(self) -> bool:
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                master = client.sentinel_master(MASTER)
                if int(master["num-slaves"]) < 1 or int(master["num-other-sentinels"]) < 2:
                    return False
        return True

    @property
    def addresses(self) -> list[str]:
        return [s.address for s in self.sentinels]

    def master_port(self) -> int:
        """The port of the master that the first answering sentinel names."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    return int(client.sentinel_get_master_addr_by_name(MASTER)[1])
            except redis.exceptions.ConnectionError:
                continue
        raise AssertionError("no sentinel answers")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


class ClusterSetup:
    """A Redis Cluster of three masters, each with one replica."""

    def __init__(self, root: Path) -> None:
        # The cluster bus port is named: by default it is the port plus 10000, which may be taken.
        self.nodes = [RedisNode(root, "--cluster-enabled", "yes", "--cluster-node-timeout", "1000",
                                "--cluster-config-file", "nodes.conf", "--cluster-port", str(free_port()))
                      for _ in range(6)]
        subprocess.run(["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_until(self._ok, 30, "the cluster to cover every slot")

    def _ok(self) -> bool:
        for node in self.nodes:
            with node.client() as client:
                info = client.execute_command("CLUSTER", "INFO")
                if "cluster_state:ok" not in info:
                    return False
        return True

    @property
    def addresses(self) -> list[str]:
        return [n.address for n in self.nodes]

    def node_of(self, key: str) -> RedisNode:
        """The master now serving key's slot (as the first node that answers sees it)."""
        with next(n for n in self.nodes if n.process.poll() is None).client() as client:
            slot = int(client.execute_command("CLUSTER", "KEYSLOT", key))
            for start, end, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                if start <= slot <= end:
                    return next(n for n in self.nodes if n.port == int(master[1]))
        raise AssertionError(f"no node serves the slot of {key}")

    def replica_of(self, master: RedisNode) -> RedisNode:
        with master.client() as client:
            my_id = client.execute_command("CLUSTER", "MYID")
        for node in self.nodes:
            with node.client() as client:
                role = client.execute_command("ROLE")
            if role[0] == "slave" and int(role[2]) == master.port:
                return node
        raise AssertionError(f"{master.address} ({my_id}) has no replica")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
