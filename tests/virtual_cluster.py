"""Several hosts on one machine, and a real Slurm cluster on them, for launch tests.

Each host is a network namespace (reached over a veth pair on one bridge) with its own UTS
namespace, so its own hostname, and its own /etc/hosts (``ip netns exec`` bind-mounts
/etc/netns/<namespace>/hosts): torch's rendezvous, gloo and Slurm see separate machines that reach
each other only over the network. Needs root and iproute2; the Slurm cluster also needs Debian's
slurm-wlm and munge (tests/run.sh installs them).
"""

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from distributed_harness import find_free_port


def missing(*programs) -> str:
    """Why these tests cannot run here ("" when they can)."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    absent = [p for p in ("ip", "unshare", *programs) if shutil.which(p) is None]
    return f"needs {', '.join(absent)} (tests/run.sh installs them)" if absent else ""


def _ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


class VirtualHosts:
    """``count`` hosts named gqchost0.. at <subnet>.11.. on a bridge whose own address is <subnet>.1.

    Names and the subnet derive from this process's pid, so concurrent test runs do not collide.
    """

    def __init__(self, count: int = 2):
        pid = os.getpid()
        tag = str(pid % 100000)
        subnet = f"10.{200 + pid % 50}.{(pid // 50) % 250}"
        self.bridge = f"gqcb{tag}"
        self.namespaces = [f"gqc{tag}n{i}" for i in range(count)]
        self.hostnames = [f"gqchost{i}" for i in range(count)]
        self.addresses = [f"{subnet}.{11 + i}" for i in range(count)]
        self.gateway = f"{subnet}.1"
        self._created = []

    def start(self) -> "VirtualHosts":
        _ip("link", "add", self.bridge, "type", "bridge")
        self._created.append(("link", self.bridge))
        _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        hosts_file = "127.0.0.1 localhost\n" + "".join(
            f"{addr} {name}\n" for addr, name in zip(self.addresses, self.hostnames))
        for i, ns in enumerate(self.namespaces):
            _ip("netns", "add", ns)
            self._created.append(("netns", ns))
            Path("/etc/netns", ns).mkdir(parents=True, exist_ok=True)
            Path("/etc/netns", ns, "hosts").write_text(hosts_file)
            outside = f"{self.bridge}v{i}"
            _ip("link", "add", outside, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._created.append(("link", outside))  # removed itself, not left to the namespace's async teardown
            _ip("link", "set", outside, "master", self.bridge)
            _ip("link", "set", outside, "up")
            _ip("-n", ns, "addr", "add", f"{self.addresses[i]}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        return self

    def shape(self, mbit: float) -> None:
        """Limit every host's link to ``mbit`` Mbit/s each way: a ``tbf`` qdisc on both ends of
        its veth pair (this kernel has no ``netem``, so bandwidth is shaped, not delay). Measured
        on these machines: 100 Mbit/s on both ends carries 96 Mbit/s."""
        burst = max(32_000, int(mbit * 1e6 / 8 / 250))  # bytes: a 4 ms bucket, at least 32 kB
        for i, ns in enumerate(self.namespaces):
            for prefix, dev in ((), f"{self.bridge}v{i}"), (("-n", ns), "eth0"):
                subprocess.run(["tc", *prefix, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", f"{mbit}mbit",
                                "burst", str(burst), "latency", "200ms"], check=True, capture_output=True, text=True)

    def command(self, host: int, argv) -> list:
        """``argv`` run on host ``host`` (its network, hostname and /etc/hosts)."""
        return ["ip", "netns", "exec", self.namespaces[host], "unshare", "--uts", "sh", "-c",
                'hostname "$0" && exec "$@"', self.hostnames[host], *map(str, argv)]

    def stop(self) -> None:
        """Kill every process left on the hosts, then remove the namespaces and the bridge."""
        for kind, name in reversed(self._created):
            if kind == "netns":
                pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
                for pid in map(int, pids.split()):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                subprocess.run(["ip", "netns", "del", name], capture_output=True)
                shutil.rmtree(Path("/etc/netns", name), ignore_errors=True)
            else:
                subprocess.run(["ip", "link", "del", name], capture_output=True)
        self._created.clear()


class SlurmCluster:
    """slurmctld on the bridge address and one slurmd per virtual host, authenticated by a munged
    of its own (own key and socket); every file lives in a fresh directory under /tmp (short
    paths: munge's socket path must fit in sockaddr_un)."""

    def __init__(self, hosts: VirtualHosts, cpus_per_node: int = 2):
        self.hosts = hosts
        self.cpus_per_node = cpus_per_node
        self.dir = Path(tempfile.mkdtemp(prefix="gqcslurm"))
        self.env = {"SLURM_CONF": str(self.dir / "slurm.conf")}  # what a Slurm client needs
        self._daemons = []

    def _client(self, argv) -> subprocess.CompletedProcess:
        """A Slurm client command (sinfo, scontrol, scancel) against this cluster."""
        return subprocess.run(argv, env={**os.environ, **self.env}, capture_output=True, text=True)

    def _daemon(self, argv, log):
        with open(self.dir / log, "w") as output:
            self._daemons.append(subprocess.Popen(argv, env={**os.environ, **self.env}, stdout=output, stderr=subprocess.STDOUT))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        d = self.dir
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._daemon(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={d}/munge.sock",
                      f"--pid-file={d}/munged.pid", f"--seed-file={d}/munge.seed", f"--log-file={d}/munged.log"],
                     "munged.out")
        nodes = "".join(f"NodeName={name} NodeAddr={addr} CPUs={self.cpus_per_node} State=UNKNOWN\n"
                        for name, addr in zip(self.hosts.hostnames, self.hosts.addresses))
        (d / "slurm.conf").write_text(f"""\
ClusterName=gqctest
SlurmctldHost={os.uname().nodename.split('.')[0]}({self.hosts.gateway})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge.sock
CredType=cred/munge
SlurmctldPort={find_free_port("0.0.0.0")}
SlurmdPort={find_free_port("0.0.0.0")}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool.%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
MpiDefault=none
ReturnToService=2
{nodes}PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        # Debian's slurmd initialises a cgroup plugin even with proctrack/linuxproc; v1 loads here.
        (d / "cgroup.conf").write_text("CgroupPlugin=cgroup/v1\n")
        for folder in ["state", *(f"spool.{name}" for name in self.hosts.hostnames)]:
            (d / folder).mkdir()
        self._wait(lambda: (d / "munge.sock").exists(), timeout, "munged did not start")
        self._daemon(["slurmctld", "-D", "-c"], "slurmctld.out")
        for i in range(len(self.hosts.hostnames)):
            self._daemon(self.hosts.command(i, ["slurmd", "-D"]), f"slurmd{i}.out")
        self._wait(self._all_idle, timeout, "the Slurm nodes did not come up idle")
        return self

    def _all_idle(self) -> bool:
        states = self._client(["sinfo", "-h", "-N", "-o", "%t"]).stdout.split()
        return len(states) == len(self.hosts.hostnames) and set(states) == {"idle"}

    def _wait(self, ready, timeout, message):
        deadline = time.monotonic() + timeout
        while not ready():
            for process in self._daemons:
                if process.poll() is not None:
                    raise RuntimeError(f"{process.args[0]} exited with {process.returncode}\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{message} in {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def run_batch(self, argv, env, cwd, timeout: float = 300):
        """``sbatch argv`` and wait for the job; returns (job state, exit code of the batch script).

        Polls every half second: ``sbatch --wait`` backs off to tens of seconds between polls."""
        submitted = subprocess.run(["sbatch", "--parsable", *map(str, argv)], env={**env, **self.env}, cwd=cwd,
                                   capture_output=True, text=True, check=True)
        job = submitted.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while True:
            shown = self._client(["scontrol", "show", "job", "-o", job]).stdout
            fields = dict(item.split("=", 1) for item in shown.split() if "=" in item)
            if fields.get("JobState") not in (None, "PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
                return fields["JobState"], int(fields["ExitCode"].split(":")[0])
            if time.monotonic() > deadline:
                self._client(["scancel", job])
                raise TimeoutError(f"Slurm job {job} did not finish in {timeout} s\n{self.logs()}")
            time.sleep(0.5)

    def logs(self, tail: int = 2000) -> str:
        """The tail of every daemon's log, for assertion messages."""
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-tail:]}"
                         for p in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")))

    def stop(self) -> None:
        """Cancel every job, stop the daemons, remove the directory."""
        self._client(["scancel", "--user=root"])
        for process in reversed(self._daemons):
            process.terminate()
        for process in self._daemons:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._daemons.clear()
        shutil.rmtree(self.dir, ignore_errors=True)
