"""Facts about the machine (read once) and system metrics (sampled per batch)."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class MachineFacts:
    worker_host: str
    worker_pid: int
    cpu_model: str
    # Comma-joined ISA flags (avx2,avx512f,...): INT8/bf16 speed and results' last bits depend on them.
    cpu_flags: str
    physical_cores: int | None
    logical_cores: int | None
    memory_total_bytes: int
    os: str
    python_version: str
    in_container: bool
    environment: str

    def as_row(self) -> dict:
        return asdict(self)


def machine_facts() -> MachineFacts:
    return MachineFacts(
        worker_host=socket.gethostname(),
        worker_pid=os.getpid(),
        cpu_model=_cpu_model(),
        cpu_flags=",".join(cpu_isa_flags()),
        physical_cores=psutil.cpu_count(logical=False),
        logical_cores=psutil.cpu_count(logical=True),
        memory_total_bytes=psutil.virtual_memory().total,
        os=f"{platform.system()} {platform.release()}",
        python_version=platform.python_version(),
        in_container=_in_container(),
        environment="gce" if _on_gce() else "local",
    )


class SystemSampler:
    """cpu_percent needs a previous call to compare with: keep one sampler per process."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        psutil.cpu_percent(interval=None)

    def sample(self) -> dict:
        memory = psutil.virtual_memory()
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "process_rss_bytes": self._process.memory_info().rss,
            "memory_available_bytes": memory.available,
            "load_avg_1m": os.getloadavg()[0],
        }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _in_container() -> bool:
    if Path("/.dockerenv").exists() or Path("/run/.containerenv").exists():
        return True
    try:
        return any(tag in Path("/proc/1/cgroup").read_text() for tag in ("docker", "containerd", "kubepods"))
    except OSError:
        return False


def _on_gce() -> bool:
    try:
        return "Google" in Path("/sys/class/dmi/id/product_name").read_text()
    except OSError:
        return False


def cpu_isa_flags() -> list[str]:
    """The CPU's instruction-set flags that change kernels and hence the last bits of results."""
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "fma")
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return []
    return [flag for flag in wanted if flag in flags]
