"""A real one-node Slurm cluster (slurmctld + slurmd, Debian's slurm-wlm 22.05) for tests.

- `ensure_packages()`: None when the Slurm and munge binaries are on PATH (installing them
  with apt-get when running as root), else a one-line reason for `pytest.skip`.
- `SlurmCluster(directory)`: writes `slurm.conf` into `directory` (every state, spool, log
  and pid path lives there; free ports; a random FirstJobId), starts a private munged (its
  own key and socket in `directory`; auth/none when munged cannot start), then
  `slurmctld -i` and `slurmd -N localhost`, and returns once `sinfo` shows the node idle.
  `env` is the environment every Slurm command of this cluster needs (SLURM_CONF); `run`,
  `sbatch`, `job_info`, `job_state`, `wait` and `release` use it.
- `close()` (also `__exit__`, and an atexit safety net): cancel every job, stop the
  daemons (SIGTERM, SIGKILL after a grace period, each waited for), then SIGKILL any process
  left that carries this cluster's marker in its environment (slurmstepd, job tasks).
- `cluster_or_skip(directory)`: a started cluster, or `pytest.skip` when Slurm is missing.

The daemons run in the foreground as children of the test process (so they are reaped and
cannot outlive it: PR_SET_PDEATHSIG), in their own session. No systemd, no global state:
two clusters in two directories run side by side. Job ids start at a random FirstJobId, so
a MASTER_PORT derived from SLURM_JOB_ID rarely collides across clusters. Unix socket paths
must stay under 108 bytes: a long `directory` is reached through a short /tmp symlink. A
new cluster first SIGKILLs job processes left by a cluster whose test process was killed.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "munged")
PACKAGES = ["slurm-wlm", "slurmctld", "slurmd", "slurm-client", "munge"]
DONE = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")
MARKER = "DLM_SLURM_CLUSTER"


def ensure_packages(timeout: float = 300) -> str | None:
    missing = [b for b in BINARIES if not _which(b)]
    if not missing:
        return None
    if os.geteuid() != 0:
        return f"Slurm binaries missing ({', '.join(missing)}) and not root, so cannot apt-get install"
    if not shutil.which("apt-get"):
        return f"Slurm binaries missing ({', '.join(missing)}) and no apt-get"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES],
    ):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return f"'{' '.join(cmd)}' took more than {timeout:.0f} s"
        if proc.returncode != 0:
            last = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            return f"'{' '.join(cmd)}' failed ({proc.returncode}): {last[0]}"
    missing = [b for b in BINARIES if not _which(b)]
    return f"still missing after apt-get install: {', '.join(missing)}" if missing else None


def _which(name: str) -> str | None:
    # The daemons live in /usr/sbin, which is not on every PATH.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """preexec_fn: the daemon gets SIGKILL when the test process dies (even by SIGKILL)."""
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"--- {path.name}: (none)"
    return f"--- {path.name}:\n" + "\n".join(text)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _marked() -> dict[int, str]:
    """Live processes carrying MARKER in their environment: pid -> the cluster directory."""
    prefix = f"{MARKER}=".encode()
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for var in environ:
            if var.startswith(prefix) and alive(int(entry.name)):
                found[int(entry.name)] = var[len(prefix) :].decode(errors="replace")
    return found


def marked_pids(directory: str) -> list[int]:
    """Pids of live processes started by the cluster in `directory` (daemons, slurmstepd, tasks)."""
    return sorted(pid for pid, d in _marked().items() if d == directory)


def reap_stale() -> list[int]:
    """SIGKILL what a cluster left when its test process was killed (its slurmd gone, jobs not).

    The daemons die with the test process (PR_SET_PDEATHSIG), but slurmstepd and the job
    tasks are not their children. A cluster still starting up has no slurmd.pid: left alone.
    """
    killed = []
    for pid, directory in _marked().items():
        pidfile = Path(directory) / "slurmd.pid"
        if Path(directory).exists():
            try:
                if alive(int(pidfile.read_text())):
                    continue
            except (OSError, ValueError):
                continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
    return killed


QUERY_RETRIES = 5
TRANSIENT = re.compile(
    r"Socket timed out|Unable to contact slurm controller|Connection refused|Resource temporarily"
)


def _is_query(argv: list[str]) -> bool:
    """A read-only command, safe to repeat (never sbatch/scancel/scontrol update)."""
    return argv[0] in ("squeue", "sinfo", "sacct") or argv[:2] == ["scontrol", "show"]


def _transient(proc: subprocess.CompletedProcess) -> bool:
    """Failed in talking to slurmctld, not in the answer: killed by a signal (measured in CI:
    `scontrol show job` died with SIGPIPE while slurmctld was busy) or a timeout/refusal."""
    return proc.returncode < 0 or (proc.returncode != 0 and bool(TRANSIENT.search(proc.stderr)))


class CommandError(subprocess.CalledProcessError):
    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stdout}{self.stderr}".rstrip()


CRED_EXPIRE = 5  # seconds before a requeued job starts again (Slurm's default: 120)


class SlurmCluster:
    """One slurmctld + one slurmd (node `localhost`, CPUs=8, partition `debug`) in `directory`."""

    def __init__(
        self,
        directory: Path | str,
        *,
        auth: str = "auto",
        extra_conf: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> None:
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        # Unix socket paths (slurmstepd's spool/localhost_<job>.<step>, munged's) must be
        # < 108 bytes; a pytest tmp_path is often longer: reach the directory by a short link.
        self.sockets = self.dir
        if len(str(self.dir)) > 60:
            self.sockets = Path(f"/tmp/slurm-{os.getpid()}-{random.randrange(16**8):08x}")
            self.sockets.symlink_to(self.dir, target_is_directory=True)
        self.conf = self.dir / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self._closed = False
        base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        path = base.get("PATH", "/usr/bin:/bin")
        self.env = {**base, "PATH": f"{path}:/usr/sbin:/sbin", "SLURM_CONF": str(self.conf)}
        self.env[MARKER] = str(self.dir)
        reap_stale()
        atexit.register(self.close)
        try:
            self.auth = self._start_munge() if auth in ("auto", "munge") else "none"
            if auth == "munge" and self.auth != "munge":
                raise RuntimeError("munged did not start\n" + _tail(self.dir / "munged.out"))
            self.conf.write_text(self._conf_text(extra_conf or {}))
            self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
            self._start("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(self.conf)])
            self._wait_idle(timeout)
        except BaseException:
            self.close()
            raise

    # ---- start-up ------------------------------------------------------------------------

    def _conf_text(self, extra: dict[str, str]) -> str:
        d = self.dir
        for sub in ("state", "spool"):
            (d / sub).mkdir(exist_ok=True)
        keys = {
            "ClusterName": "dlmtest",
            "SlurmctldHost": "localhost",
            "SlurmctldPort": str(free_port()),
            "SlurmdPort": str(free_port()),
            "SlurmUser": "root",
            "SlurmdUser": "root",
            "AuthType": "auth/munge" if self.auth == "munge" else "auth/none",
            "CredType": "cred/munge" if self.auth == "munge" else "cred/none",
            "StateSaveLocation": str(d / "state"),
            "SlurmdSpoolDir": str(self.sockets / "spool"),
            "SlurmctldPidFile": str(d / "slurmctld.pid"),
            "SlurmdPidFile": str(d / "slurmd.pid"),
            "SlurmctldLogFile": str(d / "slurmctld.log"),
            "SlurmdLogFile": str(d / "slurmd.log"),
            "SlurmctldDebug": "info",
            "SlurmdDebug": "info",
            "SlurmdParameters": "config_overrides",
            "ProctrackType": "proctrack/linuxproc",
            "TaskPlugin": "task/none",
            "SelectType": "select/cons_tres",
            "SelectTypeParameters": "CR_Core",
            "SwitchType": "switch/none",
            "MpiDefault": "none",
            "AccountingStorageType": "accounting_storage/none",
            "JobAcctGatherType": "jobacct_gather/none",
            "JobCompType": "jobcomp/none",
            "ReturnToService": "2",
            "MinJobAge": "3600",
            "KillWait": "5",
            "MailProg": "/bin/true",
            "FirstJobId": str(random.randint(1000, 999_000)),
        }
        # cred_expire: how long a node refuses a requeued job's new start ("Job credential
        # revoked": the job then fails) and how long Slurm holds it back; 120 s by default
        auth_info = [f"cred_expire={CRED_EXPIRE}"]
        if self.auth == "munge":
            auth_info.insert(0, f"socket={self.sockets / 'munge.socket'}")
        keys["AuthInfo"] = ",".join(auth_info)
        keys.update(extra)
        lines = [f"{k}={v}" for k, v in keys.items()]
        lines.append("NodeName=localhost NodeAddr=127.0.0.1 CPUs=8 RealMemory=16000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP")
        return "\n".join(lines) + "\n"

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        with open(self.dir / f"{name}.out", "ab") as log:
            proc = subprocess.Popen(
                [_which(cmd[0]) or cmd[0], *cmd[1:]],
                cwd=self.dir,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self.procs[name] = proc
        return proc

    def _start_munge(self) -> str:
        munged = _which("munged")
        if not munged:
            return "none"
        key = self.dir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        d = self.dir
        # --force: munged refuses a socket whose directory is not executable by all (a
        # pytest tmp dir is 0700); every job here runs as root, so that does not matter.
        cmd = [
            munged, "--foreground", "--force", f"--socket={self.sockets / 'munge.socket'}",
            f"--key-file={key}", f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}",
        ]  # fmt: skip
        proc = self._start("munged", cmd)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if (d / "munge.socket").exists():
                return "munge"
            if proc.poll() is not None:
                break
            time.sleep(0.05)
        self._stop("munged")
        del self.procs["munged"]  # fall back to auth/none; munged.out says why
        return "none"

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
            proc = self.run("sinfo", "-h", "-N", "-o", "%N %T", timeout=15, check=False)
            out = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0 and out.split() == ["localhost", "idle"]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"node not idle after {timeout:.0f} s (sinfo: {out!r})\n{self.logs()}")

    def logs(self) -> str:
        names = ["slurmctld.log", "slurmctld.out", "slurmd.log", "slurmd.out", "munged.out"]
        return "\n".join(_tail(self.dir / n) for n in names)

    # ---- commands ------------------------------------------------------------------------

    def run(self, *args: str, check: bool = True, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
        """A Slurm command (`run("srun", "-n2", "hostname")`) with this cluster's env, text output."""
        kw.setdefault("cwd", self.dir)
        kw.setdefault("env", self.env)
        argv = [str(a) for a in args]
        for attempt in range(QUERY_RETRIES + 1):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kw)
            if not (_is_query(argv) and _transient(proc)) or attempt == QUERY_RETRIES:
                break
            time.sleep(0.5 * (attempt + 1))  # slurmctld busy (a CI machine under load): ask again
        if check and proc.returncode != 0:
            raise CommandError(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def sbatch(self, script: Path | str, *args: str, env: dict | None = None) -> int:
        """Submit `script` (a Path, or the text of a script when a str starting with '#!')."""
        if isinstance(script, str) and script.startswith("#!"):
            path = self.dir / f"job-{time.monotonic_ns()}.sh"
            path.write_text(script)
            script = path
        proc = self.run("sbatch", "--parsable", *args, str(script), env={**self.env, **(env or {})})
        return int(proc.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        """The fields of `scontrol show job -o`: JobState, Reason, ExitCode ("0:0"), Restarts
        (the requeue count; squeue/sacct call it RestartCnt), NodeList, StdOut, ..."""
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        info: dict[str, str] = {}
        key = None
        for token in out.split():
            name, eq, value = token.partition("=")
            if eq and re.fullmatch(r"[A-Za-z][\w/:]*", name):
                key = name
                info[key] = value
            elif key is not None:  # a value with spaces (Command, WorkDir, Comment)
                info[key] += " " + token
        return info

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, states: tuple[str, ...] = DONE, timeout: float = 300) -> str:
        """Poll until the job is in one of `states`; return that state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                info = self.job_info(job_id)
                queue = self.run("squeue", "-a", check=False).stdout
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout:.0f} s (waiting for {states})\n"
                    f"{info}\n{queue}\n{self.logs()}"
                )
            time.sleep(0.2)

    def release(self, job_id: int) -> None:
        """Let a (requeued) pending job start now instead of after its ~2 min BeginTime."""
        self.run("scontrol", "update", f"jobid={job_id}", "StartTime=now")

    def job_ids(self) -> list[int]:
        out = self.run("squeue", "-h", "-a", "-o", "%A", check=False, timeout=30).stdout
        return [int(x) for x in out.split() if x.isdigit()]

    # ---- teardown ------------------------------------------------------------------------

    def pids(self) -> dict[str, int]:
        """Pids of the daemons this cluster started (munged only when it started its own)."""
        return {name: proc.pid for name, proc in self.procs.items()}

    def leftovers(self) -> list[int]:
        """Live processes started by this cluster: daemons, slurmstepd, job tasks."""
        pids = set(marked_pids(str(self.dir)))
        pids.update(p.pid for p in self.procs.values() if p.poll() is None)
        return sorted(pids)

    def _stop(self, name: str, grace: float = 10) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        ctld = self.procs.get("slurmctld")
        try:
            if ctld is not None and ctld.poll() is None:
                ids = self.job_ids()
                if ids:
                    self.run("scancel", "--full", *map(str, ids), check=False, timeout=30)
                    deadline = time.monotonic() + 30
                    while time.monotonic() < deadline:
                        out = self.run("squeue", "-h", "-a", "-t", "R,CG,S,SO", check=False, timeout=30)
                        if not out.stdout.strip():
                            break
                        time.sleep(0.2)
        except (OSError, subprocess.SubprocessError):
            pass  # teardown goes on: the daemons are stopped below regardless
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                self._stop(name)
            # slurmstepd and job tasks are not our children: end them by the marker.
            for _ in range(50):
                pids = marked_pids(str(self.dir))
                if not pids:
                    break
                for pid in pids:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.1)
            if self.sockets != self.dir:
                self.sockets.unlink(missing_ok=True)

    def __enter__(self) -> SlurmCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cluster_or_skip(directory: Path, **kw) -> SlurmCluster:
    """A started cluster in `directory`, or `pytest.skip` when Slurm cannot be installed."""
    import pytest

    reason = ensure_packages()
    if reason is not None:
        pytest.skip(reason)
    return SlurmCluster(directory, **kw)
