"""A real single-node SLURM for tests: munged + slurmctld + slurmd from Debian's slurm-wlm, configured for
localhost in a temp folder (no systemd, no cgroups, no accounting). SLURM's ports are fixed, so one at a time.

    cluster = SlurmCluster(tmp_dir); cluster.start(); job = cluster.sbatch([...]); cluster.wait(job); cluster.stop()
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from typing import Dict, List, Optional

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")


def missing_tools() -> List[str]:
    return [t for t in DAEMONS if not shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]


class SlurmCluster:
    def __init__(self, root: str):
        self.root = root
        self.conf = os.path.join(root, "slurm.conf")
        self.socket = os.path.join(root, "munge.socket")
        self.procs: Dict[str, subprocess.Popen] = {}

    def _path(self, *p) -> str:
        return os.path.join(self.root, *p)

    @property
    def env(self) -> Dict[str, str]:
        return dict(os.environ, SLURM_CONF=self.conf, PATH=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")

    def _daemon(self, name: str, cmd: List[str]) -> None:
        with open(self._path(f"{name}.stdout"), "w") as log:  # -F/-D: in the foreground, so the pid is ours
            self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                                env=self.env)

    def start(self, timeout: float = 60) -> None:
        for d in ("state", "spool", "munge"):
            os.makedirs(self._path(d), exist_ok=True)
        key = self._path("munge", "munge.key")
        subprocess.run(["mungekey", "-c", "-f", "-k", key], check=True, env=self.env, capture_output=True)
        os.chmod(key, 0o600)
        self._daemon("munged", ["munged", "-F", "--force", "-S", self.socket, f"--key-file={key}",
                                f"--pid-file={self._path('munge', 'munged.pid')}",
                                f"--log-file={self._path('munged.log')}",
                                f"--seed-file={self._path('munge', 'seed')}"])
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True,
                              env=self.env).stdout.splitlines()[0]
        host = socket.gethostname().split(".")[0]
        node = re.sub(r"^NodeName=\S+", f"NodeName={host}", node) + " NodeAddr=127.0.0.1 State=UNKNOWN"
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=p2ttest
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket},cred_expire=5
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=sched_interval=2,bf_interval=1
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
MinJobAge=600
KillWait=10
StateSaveLocation={self._path('state')}
SlurmdSpoolDir={self._path('spool')}
SlurmctldPidFile={self._path('slurmctld.pid')}
SlurmdPidFile={self._path('slurmd.pid')}
SlurmctldLogFile={self._path('slurmctld.log')}
SlurmdLogFile={self._path('slurmd.log')}
{node}
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self._wait_for(lambda: os.path.exists(self.socket), timeout, "munged did not start")
        self._daemon("slurmctld", ["slurmctld", "-D", "-i", "-f", self.conf])
        self._daemon("slurmd", ["slurmd", "-D", "-f", self.conf])
        self._wait_for(lambda: self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle",
                       timeout, "the node never became idle")

    def _wait_for(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if ok():
                return
            time.sleep(0.3)
        raise RuntimeError(f"{what} within {timeout:.0f} s; logs in {self.root}:\n" + self.logs())

    def logs(self) -> str:
        out = []
        for n in ("slurmctld.log", "slurmd.log", "munged.log", "slurmctld.stdout", "slurmd.stdout"):
            p = self._path(n)
            if os.path.exists(p):
                out.append(f"--- {n}\n" + open(p, errors="replace").read()[-2000:])
        return "\n".join(out)

    def run(self, cmd: List[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(cmd, capture_output=True, text=True, env=kw.pop("env", self.env), **kw)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}\n{r.stderr}")
        return r

    def sbatch(self, args: List[str], env: Optional[Dict[str, str]] = None, cwd: Optional[str] = None) -> str:
        return self.run(["sbatch", "--parsable", *args], env=dict(env or os.environ, SLURM_CONF=self.conf),
                        cwd=cwd).stdout.strip().split(";")[0]

    def job(self, job_id: str) -> Dict[str, str]:
        out = self.run(["scontrol", "show", "job", "-o", job_id], check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: str, timeout: float = 600, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                             "NODE_FAIL", "OUT_OF_MEMORY")) -> Dict[str, str]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout:.0f} s")

    def stop(self) -> None:
        self.run(["scancel", "--full", "-u", "root"], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
