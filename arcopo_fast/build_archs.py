"""Which CUDA architectures the extension (csrc/cuda) is compiled for. CMakeLists.txt runs this file as a
script before it configures CUDA; `python -m arcopo_fast.doctor` reads the list the module was built with.

Order of precedence (TORCH_CUDA_ARCH_LIST syntax: "8.0;9.0+PTX"):
  1. ARCOPO_CUDA_ARCH_LIST, then TORCH_CUDA_ARCH_LIST, when set (a CMake -D value wins over both)
  2. the capability of every visible GPU (torch.cuda.get_device_capability), e.g. "9.0" on an H100
  3. no visible GPU: a portable list, machine code for the common data-centre and desktop cards plus PTX
     of the newest one, which the driver JIT-compiles for any later card (Blackwell included)

Importing this module imports nothing heavy; torch is imported only by `visible_capabilities`.
"""

from __future__ import annotations

import os
import re
import sys

# sm_80 A100/A30, sm_86 RTX 30xx/A6000/A40, sm_89 RTX 40xx/L4/L40, sm_90 H100/H200 (+PTX: later cards).
PORTABLE = ("8.0", "8.6", "8.9", "9.0")
# Blackwell machine code (sm_100 B200, sm_120 RTX 50xx) needs nvcc >= 12.8.
BLACKWELL = ("10.0", "12.0")

_ENTRY = re.compile(r"^\d+\.\d+[a-z]?(\+PTX)?$")


def normalize(arch_list: str) -> str:
    """'9.0 8.0+PTX' / '8.0,9.0' / '8.0;9.0' -> '8.0+PTX;9.0' style (';'-separated, de-duplicated, checked)."""
    items = [a for a in re.split(r"[;\s,]+", arch_list.strip()) if a]
    out: list[str] = []
    for a in items:
        if not _ENTRY.match(a):
            raise ValueError(
                f"CUDA arch list entry {a!r} is not of the form MAJOR.MINOR[+PTX] (e.g. '8.0;9.0+PTX'), "
                f"in {arch_list!r}"
            )
        if a not in out:
            out.append(a)
    if not out:
        raise ValueError(f"empty CUDA arch list {arch_list!r}")
    return ";".join(out)


def portable(nvcc_version: tuple[int, int] | None) -> str:
    archs = list(PORTABLE)
    if nvcc_version is not None and nvcc_version >= (12, 8):
        archs += BLACKWELL
    archs[-1] += "+PTX"
    return ";".join(archs)


def visible_capabilities() -> list[str]:
    """'MAJOR.MINOR' of every GPU torch sees (empty without CUDA, or when the query fails)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return []
        caps = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    except Exception:  # noqa: BLE001 - a broken driver means "no visible GPU" for the build
        return []
    return [f"{major}.{minor}" for major, minor in sorted(caps)]


def nvcc_version(nvcc: str | None) -> tuple[int, int] | None:
    if not nvcc:
        return None
    import subprocess

    try:
        text = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+)\.(\d+)", text)
    return (int(m.group(1)), int(m.group(2))) if m else None


def choose(
    env: dict[str, str] | os._Environ, capabilities: list[str], nvcc: tuple[int, int] | None
) -> tuple[str, str]:
    """(arch list, why): the rule of the module docstring."""
    for name in ("ARCOPO_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if env.get(name, "").strip():
            return normalize(env[name]), f"${name}"
    if capabilities:
        return normalize(";".join(capabilities)), "the visible GPU" + ("s" if len(capabilities) > 1 else "")
    return portable(nvcc), "no visible GPU: portable list"


def main(argv: list[str]) -> int:
    """`python build_archs.py [NVCC]`: print 'ARCH_LIST|WHY' for CMake."""
    nvcc = argv[1] if len(argv) > 1 else None
    forced = any(os.environ.get(n, "").strip() for n in ("ARCOPO_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"))
    try:  # the GPU query (importing torch) and nvcc only when the environment does not decide
        archs, why = choose(os.environ, [] if forced else visible_capabilities(), None if forced else nvcc_version(nvcc))
    except ValueError as e:
        print(f"arcopo_fast: {e}", file=sys.stderr)
        return 2
    print(f"{archs}|{why}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
