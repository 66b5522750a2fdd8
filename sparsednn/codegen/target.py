"""The CPU we generate code for: its name, LLVM feature string, vector ISA and vector width.

The host CPU is read once per process. Under virtualisation ``llvm.get_host_cpu_name()`` can
name a CPU other than the one we run on, so the feature string (``get_host_cpu_features()``) is
the truth and is always passed explicitly to the target machine. What LLVM said is kept in the
kernel cache under a digest of /proc/cpuinfo, so that a process whose kernels all come from the
cache does not load LLVM to learn it again.

``SPARSEDNN_ISA=avx2|generic`` (or ``host_target("avx2")``) forces a lower ISA than the host's,
by switching off the features above it, so that every code path can be tested on one machine.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from dataclasses import dataclass

from sparsednn.codegen.jit import llvm

ISAS = ("avx512", "avx2", "generic")
VECTOR_WIDTH = {"avx512": 16, "avx2": 8, "generic": 4}
ISA_ENV_VAR = "SPARSEDNN_ISA"

# Features switched off to force a lower ISA. LLVM also clears whatever a switched-off feature
# implies, but a later "+feature" in the string could switch a cleared one back on, so every
# feature that implies AVX-512 (resp. AVX) is named here explicitly.
_ABOVE_AVX2_PREFIXES = ("avx512", "avx10", "amx", "evex512")
_ABOVE_AVX2_NAMES = frozenset()
_ABOVE_GENERIC_PREFIXES = ("avx", "amx", "evex512")
_ABOVE_GENERIC_NAMES = frozenset(
    {"fma", "fma4", "xop", "f16c", "vaes", "vpclmulqdq", "sha512", "sm3", "sm4", "gfni"}
)


@dataclass(frozen=True)
class Target:
    """What the code generator specialises on; hashable, so usable as a cache key."""

    cpu_name: str
    features: str  # LLVM feature string, e.g. "+avx2,+fma,-avx512f,..."
    isa: str  # "avx512", "avx2" or "generic"
    vector_width: int  # float32 lanes per vector register: 16, 8 or 4
    triple: str = ""

    def __repr__(self) -> str:
        enabled = sum(1 for f in self.features.split(",") if f.startswith("+"))
        return (f"Target(cpu_name={self.cpu_name!r}, isa={self.isa!r}, "
                f"vector_width={self.vector_width}, features=<{enabled} enabled>)")  # fmt: skip

    @property
    def has_fma(self) -> bool:
        return self.isa in ("avx512", "avx2")

    def create_target_machine(self, opt: int = 3) -> llvm.TargetMachine:
        """A fresh llvmlite TargetMachine for JIT use (see jit.target_machine for a cached one)."""
        from sparsednn.codegen import jit

        jit.ensure_llvm_initialized()
        triple = self.triple or llvm.get_process_triple()
        return llvm.Target.from_triple(triple).create_target_machine(
            cpu=self.cpu_name,
            features=self.features,
            opt=opt,
            reloc="default",
            codemodel="jitdefault",
            jit=True,
        )


# The lines of /proc/cpuinfo that name the CPU and its features (not "cpu MHz", which moves).
_CPUINFO_KEYS = ("vendor_id", "cpu family", "model", "model name", "stepping", "microcode",
                 "flags", "cpu cores", "siblings")  # fmt: skip


def _cpuinfo_digest(text: str | None = None) -> str | None:
    """A digest of what the kernel reports of the CPU (vendor, model, stepping, flags of the
    first processor; text: /proc/cpuinfo's) and of the llvmlite that would read it, or None
    where there is none."""
    if text is None:
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                text = f.read()
        except OSError:
            return None
    first = text.split("\n\n")[0]
    fields = {}
    for line in first.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in _CPUINFO_KEYS:
            fields[key.strip()] = value.strip()
    if "flags" not in fields:
        return None
    import llvmlite

    from sparsednn.codegen import cache

    return cache.digest("host", sorted(fields.items()), platform.machine(), sys.platform,
                        llvmlite.__version__)  # fmt: skip


@functools.lru_cache(maxsize=1)
def _host_cpu() -> tuple[str, dict[str, bool], str]:
    """(cpu name, {feature: enabled}, triple) of the host, read once (from the kernel cache
    when it holds LLVM's answer for this CPU)."""
    from sparsednn.codegen import cache, jit

    key = _cpuinfo_digest()
    known = cache.load_host(key) if key else None
    if known is not None:
        return known
    jit.ensure_llvm_initialized()
    host = llvm.get_host_cpu_name(), dict(llvm.get_host_cpu_features()), llvm.get_process_triple()
    if key:
        cache.store_host(key, *host)
    return host


def _isa_of(features: dict[str, bool]) -> str:
    if features.get("avx512f") and features.get("avx512vl"):
        return "avx512"
    if features.get("avx2") and features.get("fma"):
        return "avx2"
    return "generic"


def _flatten(features: dict[str, bool]) -> str:
    return ",".join(("+" if on else "-") + name for name, on in sorted(features.items()))


def _strip(features: dict[str, bool], prefixes: tuple[str, ...], names: frozenset) -> dict:
    out = dict(features)
    for name in out:
        if name.startswith(prefixes) or name in names:
            out[name] = False
    return out


def host_isa() -> str:
    """The best ISA the host supports."""
    return _isa_of(_host_cpu()[1])


@functools.cache
def _target_for(isa: str) -> Target:
    cpu, features, triple = _host_cpu()
    best = _isa_of(features)
    if ISAS.index(isa) < ISAS.index(best):
        raise ValueError(f"ISA {isa!r} is not supported by this CPU (best: {best!r})")
    if isa == "avx2" and best != "avx2":
        features = _strip(features, _ABOVE_AVX2_PREFIXES, _ABOVE_AVX2_NAMES)
    elif isa == "generic" and best != "generic":
        features = _strip(features, _ABOVE_GENERIC_PREFIXES, _ABOVE_GENERIC_NAMES)
    return Target(
        cpu_name=cpu,
        features=_flatten(features),
        isa=isa,
        vector_width=VECTOR_WIDTH[isa],
        triple=triple,
    )


def host_target(isa: str | None = None) -> Target:
    """The host's target, or a lower ISA if asked (argument, else $SPARSEDNN_ISA)."""
    if isa is None:
        isa = os.environ.get(ISA_ENV_VAR, "").strip().lower() or None
    if isa is None:
        isa = host_isa()
    if isa not in ISAS:
        raise ValueError(f"unknown ISA {isa!r}; expected one of {', '.join(ISAS)}")
    return _target_for(isa)


def available_isas() -> list[str]:
    """ISAs this host can run, best first (for tests and benchmarks)."""
    best = host_isa()
    return list(ISAS[ISAS.index(best) :])


# (unknown: assume a server's L3, so that outputs are streamed only when they are large)
_FALLBACK_LAST_LEVEL_CACHE = 32 << 20


@functools.cache
def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """Size of the host's largest cache as the OS reports it for CPU 0 (sysfs on Linux: the
    VM's own view, where getconf can report the host's), 32 MB if unknown."""
    try:
        entries = [e for e in os.listdir(root) if e.startswith("index")]
    except OSError:
        entries = []
    sizes = []
    for entry in entries:  # (an entry that cannot be read or parsed is skipped)
        try:
            with open(os.path.join(root, entry, "size")) as f:
                text = f.read().strip().upper()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
        except (OSError, ValueError):
            continue
    return max(sizes, default=_FALLBACK_LAST_LEVEL_CACHE)
