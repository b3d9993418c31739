"""The CPU kiln compiles for: llvmlite's view of the host, its TargetMachine, and the -O2
pipeline (vectorizers on)."""

from __future__ import annotations

import ctypes.util
from dataclasses import dataclass
from functools import lru_cache

import llvmlite.binding as llvm

from kiln.errors import KilnError


@lru_cache(maxsize=None)
def _initialized() -> bool:
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    # the functions kernels call come from libm and libpthread: make their symbols known before
    # the first compile checks them, not only once a JIT engine has loaded the process
    for name in ("m", "pthread"):  # libm: expf/tanhf...; pthread_create/join for threaded GEMMs
        path = ctypes.util.find_library(name)
        if path:
            llvm.load_library_permanently(path)
    return True


@dataclass(frozen=True)
class CPU:
    """A compilation target: triple, CPU name and the feature string (``+avx2,+fma,...``)."""

    triple: str
    name: str
    features: str

    @property
    def feature_set(self) -> frozenset[str]:
        return frozenset(f[1:] for f in self.features.split(",") if f.startswith("+"))

    def describe(self) -> str:
        shown = sorted(f for f in self.feature_set if f.startswith(("avx", "fma", "sse4")))
        return f"{self.name} ({', '.join(shown) or 'baseline'})"


def host_cpu() -> CPU:
    """The machine this process runs on."""
    _initialized()
    return CPU(llvm.get_process_triple(), llvm.get_host_cpu_name(), llvm.get_host_cpu_features().flatten())


def check_runs_here(built_for: CPU) -> None:
    """Refuse code built for features this CPU lacks (it would die on an illegal instruction)."""
    here = host_cpu()
    missing = sorted(built_for.feature_set - here.feature_set)
    if built_for.triple != here.triple or missing:
        raise KilnError(
            f"this code was compiled for {built_for.describe()} on {built_for.triple}; this machine "
            f"({here.describe()}) lacks {', '.join(missing) or built_for.triple}: recompile it here"
        )


def target_machine(cpu: CPU) -> llvm.TargetMachine:
    _initialized()
    target = llvm.Target.from_triple(cpu.triple)
    # LLVM's tuning for AVX-512 CPUs vectorizes loops 256 bits wide; the full width measured
    # faster here: a 96x128x128 Softmax 0.97 -> 0.66 ms, the LSTM's gate kernels ~4%
    features = cpu.features + (",-prefer-256-bit" if "avx512f" in cpu.feature_set else "")
    # static relocations: MCJIT links a build's parts (``split``) by absolute addresses
    return target.create_target_machine(cpu=cpu.name, features=features, opt=3, codemodel="jitdefault", reloc="static")


def optimize(module: llvm.ModuleRef, machine: llvm.TargetMachine) -> None:
    """The -O2 module pipeline with loop and SLP vectorization and unrolling. -O3's extra
    passes bought no run time on the benchmark models (measured side by side, -O2 was as
    fast or up to 9% faster; the one loop -O3 did better, a ConvTranspose's scalar tap sums,
    0.45 against 0.60 ms in LeNet-5's step, is now explicit vectors at 0.28) and cost compile
    time: a U-Net training step 14.6 -> 9.6 s at -O2, ResNet-18's 9.5 -> 7.2, DeepLabv3
    4.5 -> 2.9."""
    tuning = llvm.create_pipeline_tuning_options(speed_level=2)
    tuning.loop_vectorization = True
    tuning.slp_vectorization = True
    tuning.loop_unrolling = True
    builder = llvm.create_pass_builder(machine, tuning)
    builder.getModulePassManager().run(module, builder)
