"""What this process holds (resident set size) and what the machine can still give it: host memory
(MemAvailable, capped by a cgroup limit) and an accelerator's own memory; and how it asks the kernel
for huge pages."""

from __future__ import annotations

import os
import resource
import sys
from typing import TYPE_CHECKING

MIB, GIB = 2 ** 20, 2 ** 30
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"

if TYPE_CHECKING:
  import jax


def peak_rss_bytes() -> int:
  """Peak resident set size of this process so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)


def process_rss_bytes() -> int:
  """Resident set size of this process now (Linux /proc/self/statm); elsewhere its peak so far, an
  upper bound (macOS has no cheap current RSS without psutil)."""
  try:
    with open("/proc/self/statm") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return peak_rss_bytes()


def _read_int(path: str) -> int | None:
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError:
    return None
  return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_headroom() -> int | None:
  """Bytes left under this process's cgroup memory limit (v2, then v1), None when unlimited or unknown."""
  for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                 ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                  "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
    limit, usage = _read_int(limit_file), _read_int(usage_file)
    # v1 writes a huge page-aligned number for "no limit"; above 2^60 is no limit in practice
    if limit is not None and usage is not None and limit < 2 ** 60:
      return max(limit - usage, 0)
  return None


def available_memory_bytes() -> int:
  """Bytes other allocations of this machine can still take: MemAvailable from /proc/meminfo, or the
  cgroup's headroom when that is lower (a container's limit is what the OOM killer enforces). Off
  Linux: psutil's `available` when installed, else free physical pages, else total physical memory."""
  avail = None
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          avail = int(line.split()[1]) * 1024
          break
  except OSError:
    pass
  if avail is None:
    try:
      import psutil  # optional; macOS has no /proc
      avail = int(psutil.virtual_memory().available)
    except ImportError:
      for pages in ("SC_AVPHYS_PAGES", "SC_PHYS_PAGES"):
        try:
          avail = os.sysconf(pages) * os.sysconf("SC_PAGE_SIZE")
          break
        except (ValueError, OSError):
          continue
  headroom = _cgroup_headroom()
  if avail is None:
    return headroom if headroom is not None else 0
  return avail if headroom is None else min(avail, headroom)


def device_limit_bytes(device: jax.Device) -> int | None:
  """Bytes `device` can allocate in all; None on CPU, where device memory is host memory, or when the
  runtime does not say."""
  if device.platform == "cpu":
    return None
  return (device.memory_stats() or {}).get("bytes_limit")


def device_free_bytes(device: jax.Device) -> int | None:
  """Bytes `device` can still allocate (its limit less what is in use); None as `device_limit_bytes`."""
  if device.platform == "cpu":
    return None
  stats = device.memory_stats() or {}
  return None if "bytes_limit" not in stats else int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))


def wants_huge_pages(environ=os.environ, thp_mode_file: str = THP_MODE_FILE) -> bool:
  """Whether this process should be restarted with glibc's malloc asking for transparent huge pages: Linux
  with glibc >= 2.35, THP available ("always" or "madvise"), the tunable not set yet, and no opt-out
  (`FELLREC_HUGE_PAGES=0`)."""
  import platform
  if sys.platform != "linux" or environ.get("FELLREC_HUGE_PAGES") == "0":
    return False
  if "glibc.malloc.hugetlb" in environ.get("GLIBC_TUNABLES", ""):
    return False
  libc, version = platform.libc_ver()
  try:
    major, minor = (int(v) for v in version.split(".")[:2])
  except ValueError:
    return False
  try:
    with open(thp_mode_file) as f:
      mode = f.read()
  except OSError:
    return False
  return libc == "glibc" and (major, minor) >= (2, 35) and "[never]" not in mode


def restart_with_huge_pages() -> None:
  """Re-executes this command once with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` when `wants_huge_pages()`.

  Why: XLA on CPU allocates a program's scratch (GBs for a SmolLM2 round) with malloc each call; glibc maps
  such blocks fresh and unmaps them on free, so every call faults in and zeroes every 4 KiB page again
  (1.5 M faults, a third of a SmolLM2 round's CPU time in the kernel, measured with perf). With the
  tunable, malloc marks those mappings for 2 MiB pages: ~500x fewer faults. glibc reads tunables only at
  start-up, hence the restart. Call it first thing in a `__main__` block, never in a library.
  """
  if not wants_huge_pages():
    return
  env = dict(os.environ)
  env["GLIBC_TUNABLES"] = ":".join(filter(None, [env.get("GLIBC_TUNABLES"), HUGE_PAGES_TUNABLE]))
  print(f"restarting with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} (transparent huge pages for XLA's scratch; "
        "FELLREC_HUGE_PAGES=0 opts out)", file=sys.stderr, flush=True)
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
