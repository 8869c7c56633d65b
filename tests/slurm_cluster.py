"""A real single-node SLURM for tests: Debian's slurm-wlm and munge, installed with apt when missing and started
by hand (no systemd here), then stopped again. Settings follow ../shared/docs/feasibility.md, section 4.

``start()`` returns None when the cluster is up, or the reason it cannot start (then the test is skipped with it).
A SLURM that was already running is used as it is and left running.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

CONF = """\
ClusterName=tiptest
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 \
RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
"""

_started: list[str] = []  # pid files of the daemons this module started


def _running(name: str) -> bool:
    return subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0


def _up() -> bool:
    proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return proc.returncode == 0 and any(s in proc.stdout for s in ("idle", "mix", "alloc"))


def start() -> str | None:
    if shutil.which("sinfo") and _running("slurmctld") and _up():
        return None  # a SLURM is already here: use it
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd here needs root (the daemons run as SlurmUser=root)"
    if not shutil.which("slurmctld"):
        if not shutil.which("apt-get"):
            return "slurm-wlm is not installed and there is no apt-get to install it"
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
            if proc.returncode:
                return f"could not install slurm-wlm and munge ({' '.join(cmd)}): {proc.stderr.strip()[-300:]}"
    Path("/run/munge").mkdir(parents=True, exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    if not _running("munged"):
        subprocess.run(["runuser", "-u", "munge", "--", "/usr/sbin/munged"], check=True)
        _started.append("munged")
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/etc/slurm"):
        Path(d).mkdir(parents=True, exist_ok=True)
    mem_mb = int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * 0.8)
    Path("/etc/slurm/slurm.conf").write_text(CONF.format(cpus=os.cpu_count(), mem_mb=mem_mb))
    if not _running("slurmctld"):
        subprocess.run(["/usr/sbin/slurmctld"], check=True)
        _started.append("/run/slurmctld.pid")
    if not _running("slurmd"):
        subprocess.run(["/usr/sbin/slurmd", "-N", "localhost"], check=True)  # the hostname is not "localhost"
        _started.append("/run/slurmd.pid")
    for _ in range(30):
        if _up():
            return None
        time.sleep(1)
    log = Path("/var/log/slurm/slurmctld.log")
    return "SLURM did not report an idle node within 30 s: " + (log.read_text()[-300:] if log.exists() else "")


def stop() -> None:
    if not _started:
        return
    for _ in range(30):  # let finished jobs wind down (their step daemons outlive slurmd otherwise)
        proc = subprocess.run(["squeue", "-h"], capture_output=True, text=True)
        if proc.returncode or not proc.stdout.strip():
            break
        time.sleep(1)
    subprocess.run(["scancel", "--full", "--user", "root"], capture_output=True)
    for what in reversed(_started):
        if what == "munged":
            subprocess.run(["pkill", "-x", "munged"])
        elif Path(what).exists():
            try:
                os.kill(int(Path(what).read_text().split()[0]), signal.SIGTERM)
            except (ProcessLookupError, ValueError):
                pass
    if "/run/slurmd.pid" in _started:
        subprocess.run(["pkill", "-9", "-f", "^slurmstepd"])  # they ignore SIGTERM once slurmd is gone
    _started.clear()
