"""A large generated module compiled in parts, the parts but the first in worker processes.

LLVM's optimizer and code generation take most of a large build (a U-Net training step: 19.5 of 25
s), and each kernel is a function of its own, so the module splits cleanly. Threads would not
help: llvmlite serializes every call into LLVM with one lock. So ``parts`` gives each part's IR
text: ``kiln_main`` in the first, the kernels it calls shared out by size, each defined in one
part (external, so ``kiln_main`` reaches it across objects) and declared where it is called,
the internal functions a kernel reaches (its pool workers) and the internal constant tables it
reads copied into its part, other globals defined in the first part and declared elsewhere.
``compile_parts`` compiles the first part here while child processes compile the others; the
executable links the objects in one MCJIT engine (static relocations: under PIC, RuntimeDyld
resolves every object's GOT-relative offsets against the first object's table). Modules below
``SPLIT_CHARS`` of IR stay whole: a child costs about half a second to start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading

import llvmlite.ir as ir

from kiln.errors import KilnError

REFERENCE = re.compile(r'@"([^"]+)"')
SPLIT_CHARS = 1 << 21  # IR text (2 MB: about 4 s of LLVM) from which a module is split


def parts(module: ir.Module, entry: str, count: int) -> list[str]:
    """The IR text of each part: one where the module is small or has one kernel."""
    defined = {f.name: f for f in module.functions if not f.is_declaration}
    texts = {name: str(f) for name, f in defined.items()}
    kernels = [n for n in dict.fromkeys(REFERENCE.findall(texts[entry])) if n in defined and n != entry]
    if count < 2 or len(kernels) < 2 or sum(len(t) for t in texts.values()) < SPLIT_CHARS:
        return [str(module)]
    reach = {name: set(REFERENCE.findall(text)) - {name} for name, text in texts.items()}

    def closure(root: str) -> set[str]:
        """``root`` and the internal functions it reaches (defined along with it)."""
        seen, todo = {root}, [root]
        while todo:
            for name in reach[todo.pop()]:
                if name in defined and name not in seen and name not in kernels and name != entry:
                    if defined[name].linkage != "internal":
                        raise KilnError(f"internal error: {name!r} is reached from several kernels but not internal")
                    seen.add(name)
                    todo.append(name)
        return seen

    groups = {k: closure(k) for k in kernels}
    members = [closure(entry)] + [set() for _ in range(count - 1)]
    loads = [sum(len(texts[n]) for n in members[0])] + [0] * (count - 1)
    for kernel in sorted(kernels, key=lambda k: -sum(len(texts[n]) for n in groups[k])):  # largest first, to the lightest part
        part = min(range(count), key=loads.__getitem__)
        members[part] |= groups[kernel]
        loads[part] += sum(len(texts[n]) for n in groups[kernel])
    return _render(module, defined, kernels, reach, [m for m in members if m])


def _render(module: ir.Module, defined: dict, kernels: list[str], reach: dict, members: list[set[str]]) -> list[str]:
    """Each part's text: the module printed with the other parts' functions as declarations and
    the globals it does not own as external declarations (restored afterwards)."""
    globals_ = {g.name: g for g in module.global_values if isinstance(g, ir.GlobalVariable)}
    saved = {name: (f.linkage, f.blocks) for name, f in defined.items()}
    saved_globals = {name: (g.linkage, g.initializer) for name, g in globals_.items()}
    out = []
    try:
        for index, names in enumerate(members):
            used = set().union(*(reach[n] for n in names))
            for name, f in defined.items():
                linkage, blocks = saved[name]
                f.blocks = blocks if name in names else []
                f.linkage = linkage if name in names and name not in kernels else ""
            for name, g in globals_.items():
                linkage, initializer = saved_globals[name]
                table = g.global_constant and linkage == "internal"  # copied into each part that reads it
                if table:
                    g.linkage, g.initializer = (linkage, initializer) if name in used else ("", None)
                else:  # one definition, in the first part
                    g.linkage, g.initializer = ("", initializer) if index == 0 else ("", None)
            _forget_text(defined.values(), globals_.values())
            out.append(str(module))
    finally:
        for name, f in defined.items():
            f.linkage, f.blocks = saved[name]
        for name, g in globals_.items():
            g.linkage, g.initializer = saved_globals[name]
        _forget_text(defined.values(), globals_.values())
    return out


def _forget_text(*groups) -> None:
    """llvmlite caches a global's printed text: drop it, so the next print shows the change."""
    for values in groups:
        for value in values:
            if hasattr(value, "_clear_string_cache"):
                value._clear_string_cache()


def compile_part(text: str, cpu: dict) -> tuple[bytes, list[str]]:
    """One part's object code and the functions it still declares after -O2 (the caller checks
    this process has them)."""
    import llvmlite.binding as llvm

    from kiln.backends.llvm.target import CPU, optimize, target_machine

    machine = target_machine(CPU(**cpu))
    try:
        parsed = llvm.parse_assembly(text)
        parsed.verify()
    except RuntimeError as err:
        raise KilnError(f"internal error: generated LLVM IR does not verify: {err}") from None
    optimize(parsed, machine)
    declared = [f.name for f in parsed.functions if f.is_declaration]
    return machine.emit_object(parsed), declared


def compile_parts(texts: list[str], cpu: dict) -> tuple[list[bytes], set[str]]:
    """Each part's object code (the first compiled here while child processes compile the
    others) and every function some part declares. A child is a fresh interpreter reading its
    part on stdin (``python -m kiln.backends.llvm.split``), so nothing of the caller's script
    runs again there."""
    if len(texts) == 1:
        obj, declared = compile_part(texts[0], cpu)
        return [obj], set(declared)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile()) for _ in texts[1:]]
        children = [subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env) for log in logs]
        writers = [threading.Thread(target=_send, args=(child, json.dumps(cpu) + "\n" + text)) for child, text in zip(children, texts[1:])]
        for writer in writers:
            writer.start()
        results = [compile_part(texts[0], cpu)]
        for writer, child, log in zip(writers, children, logs):
            out = child.stdout.read()
            child.wait()
            writer.join()
            if child.returncode != 0:
                log.seek(0)
                last = log.read().decode(errors="replace").strip().splitlines()[-1:]
                raise KilnError(f"internal error: compiling a part of the module failed: {' '.join(last)}")
            header, _, obj = out.partition(b"\n")
            results.append((obj, json.loads(header)))
    return [obj for obj, _ in results], set().union(*(declared for _, declared in results))


def _send(child: subprocess.Popen, data: str) -> None:
    child.stdin.write(data.encode())
    child.stdin.close()


def _child() -> None:
    """A child's side: the CPU (a JSON line) and the part's IR on stdin; the functions it
    declares (a JSON line) and its object code on stdout."""
    cpu, _, text = sys.stdin.buffer.read().decode().partition("\n")
    obj, declared = compile_part(text, json.loads(cpu))
    sys.stdout.buffer.write(json.dumps(declared).encode() + b"\n" + obj)


if __name__ == "__main__":
    _child()
