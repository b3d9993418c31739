"""The worker threads compiled kernels share: one pool per process, written in LLVM IR.

Starting and joining a pthread costs ~50-90 us, more than a whole small GEMM (an LSTM step's
16x256x1024 takes ~110 us on one core), so kernels do not start threads. They hand blocks of
work to this pool instead:

    i32 kiln_pool_submit(ptr fns, ptr args, i64 count)  # fns[i](args[i]) on workers 0..count-1
    void kiln_pool_wait()                                # until every submitted block is done
    void kiln_pool_wake()                                # sleeping workers up to spin (a run starts)

``submit`` returns 1 when the workers took the blocks (the caller runs its own block, then
waits) and 0 when it ran them itself: the pool is busy with another module's run (kiln
releases the GIL during a run, so two Python threads may run models at once), a thread
could not start, or the process is a fork child whose workers were not copied.

Workers start on first use, then spin a little after each block (the next kernel's blocks
usually come within microseconds) and sleep on a futex when idle, so an idle pool costs no CPU.
A sleeping worker takes ~40 us to wake, so each run starts by waking them (``kiln_pool_wake``)
while its first kernels run, and a block no worker has claimed by the time the caller finishes
its own is run by the caller (a block is claimed once, by a compare-and-swap on its slot's
generation), so a late worker costs no more than running the blocks serially.
The module is compiled once per process and its three functions are made known to the JIT
linker (``llvm.add_symbol``), so model code, and the object code in artifacts, call them by name.
"""

from __future__ import annotations

import sys
import threading

import llvmlite.binding as llvm
import llvmlite.ir as ir

MAX_WORKERS = 63
SLOT_BYTES = 64  # one cache line per worker: no false sharing between the flags
SPINS = 4000  # pause-loop iterations a worker waits for new work before it sleeps
SUBMIT, WAIT, WAKE = "kiln_pool_submit", "kiln_pool_wait", "kiln_pool_wake"

I8, I32, I64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()
TASK = ir.FunctionType(PTR, [PTR])  # a block of work: worker(args) (the pthread start signature)

# slot fields (byte offsets): the generation the worker should reach, whether it sleeps, the
# generation it finished, whether its thread runs, the block to run, and the last generation
# whose block someone (the worker or the submitting thread) claimed to run
GEN, SLEEPING, DONE, STARTED, FN, ARG, CLAIMED = 0, 4, 8, 12, 16, 24, 32

FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE, SYS_FUTEX = 128, 129, 202


def _field(b: ir.IRBuilder, slot: ir.Value, offset: int) -> ir.Value:
    return b.gep(slot, [ir.Constant(I64, offset)], source_etype=I8)


def _store_atomic(b: ir.IRBuilder, value: ir.Value, ptr: ir.Value, ordering: str) -> None:
    """An atomic store as an exchange (llvmlite's store_atomic wants typed pointers)."""
    b.atomic_rmw("xchg", ptr, value, ordering)


def _c32(n: int) -> ir.Constant:
    return ir.Constant(I32, n)


class _Builder:
    def __init__(self, triple: str):
        self.module = ir.Module(name="kiln_pool")
        self.module.triple = triple
        self.x86 = triple.startswith(("x86_64", "i386", "i686"))
        self.linux = sys.platform.startswith("linux") and triple.startswith("x86_64")
        m = self.module
        slots_ty = ir.ArrayType(I8, SLOT_BYTES * MAX_WORKERS)
        self.slots = ir.GlobalVariable(m, slots_ty, "kiln_pool_slots")
        self.slots.initializer = ir.Constant(slots_ty, None)
        self.slots.align = SLOT_BYTES
        self.slots.linkage = "internal"
        self.state = {}
        for name in ("lock", "pid", "count"):  # held by a submitter / the pid workers belong to / blocks out
            g = ir.GlobalVariable(m, I32, f"kiln_pool_{name}")
            g.initializer = _c32(0)
            g.linkage = "internal"
            self.state[name] = g
        self.create = ir.Function(m, ir.FunctionType(I32, [PTR, PTR, PTR, PTR]), "pthread_create")
        self.detach = ir.Function(m, ir.FunctionType(I32, [I64]), "pthread_detach")
        self.getpid = ir.Function(m, ir.FunctionType(I32, []), "getpid")
        self.sched_yield = ir.Function(m, ir.FunctionType(I32, []), "sched_yield")
        if self.linux:
            self.syscall = ir.Function(m, ir.FunctionType(I64, [I64], var_arg=True), "syscall")
        self.worker = self._worker()
        self._submit()
        self._wait()
        self._wake_all()

    def slot(self, b: ir.IRBuilder, index: ir.Value) -> ir.Value:
        base = b.inttoptr(b.ptrtoint(self.slots, I64), PTR)  # an untyped pointer to the bytes
        return b.gep(base, [b.mul(index, ir.Constant(I64, SLOT_BYTES))], source_etype=I8)

    def pause(self, b: ir.IRBuilder) -> None:
        if self.x86:
            b.call(self.module.declare_intrinsic("llvm.x86.sse2.pause", (), ir.FunctionType(VOID, [])), [])

    def sleep_until_changed(self, b: ir.IRBuilder, word: ir.Value, seen: ir.Value) -> None:
        """Block while ``*word == seen`` (the futex re-checks it, so a wake cannot be lost)."""
        if self.linux:
            null = ir.Constant(PTR, None)
            b.call(self.syscall, [ir.Constant(I64, SYS_FUTEX), word, ir.Constant(I64, FUTEX_WAIT_PRIVATE), b.zext(seen, I64), null, null, ir.Constant(I64, 0)])
        else:
            b.call(self.sched_yield, [])

    def wake(self, b: ir.IRBuilder, word: ir.Value) -> None:
        if self.linux:
            null = ir.Constant(PTR, None)
            b.call(self.syscall, [ir.Constant(I64, SYS_FUTEX), word, ir.Constant(I64, FUTEX_WAKE_PRIVATE), ir.Constant(I64, 1), null, null, ir.Constant(I64, 0)])

    def claim(self, b: ir.IRBuilder, slot: ir.Value, gen: ir.Value) -> ir.Value:
        """Whether this thread takes generation ``gen``'s block: the first to move CLAIMED from
        gen - 1 to gen (a worker that saw a stale generation fails, as does the second claimer)."""
        pair = b.cmpxchg(_field(b, slot, CLAIMED), b.sub(gen, _c32(1)), gen, "acq_rel", "monotonic")
        return b.extract_value(pair, 1)

    def run_block(self, b: ir.IRBuilder, slot: ir.Value, gen: ir.Value) -> None:
        task = b.load(_field(b, slot, FN), typ=TASK.as_pointer())
        b.call(task, [b.load(_field(b, slot, ARG), typ=PTR)])
        _store_atomic(b, gen, _field(b, slot, DONE), "release")

    def _worker(self) -> ir.Function:
        """``worker(slot)``: wait for the slot's generation to move, run its block, mark it done."""
        fn = ir.Function(self.module, TASK, "kiln_pool_worker")
        fn.linkage = "internal"
        slot = fn.args[0]
        entry, spin, nap, run = (fn.append_basic_block(n) for n in ("entry", "spin", "nap", "run"))
        b = ir.IRBuilder(entry)
        gen_ptr, sleeping = _field(b, slot, GEN), _field(b, slot, SLEEPING)
        seen_slot, spins = b.alloca(I32), b.alloca(I32)
        # the last generation finished, not the current one: a block submitted just before this
        # thread got going is still to run
        b.store(b.load_atomic(_field(b, slot, DONE), "acquire", 4, typ=I32), seen_slot)
        b.store(_c32(0), spins)
        b.branch(spin)

        b.position_at_end(spin)
        seen = b.load(seen_slot, typ=I32)
        now = b.load_atomic(gen_ptr, "acquire", 4, typ=I32)
        count = b.load(spins, typ=I32)
        b.store(b.add(count, _c32(1)), spins)
        with b.if_then(b.icmp_unsigned("!=", now, seen)):
            b.branch(run)
        self.pause(b)
        b.cbranch(b.icmp_unsigned("<", count, _c32(SPINS)), spin, nap)

        b.position_at_end(nap)
        _store_atomic(b, _c32(1), sleeping, "seq_cst")
        self.sleep_until_changed(b, gen_ptr, b.load(seen_slot, typ=I32))
        _store_atomic(b, _c32(0), sleeping, "seq_cst")
        b.store(_c32(0), spins)
        b.branch(spin)

        b.position_at_end(run)
        now = b.load_atomic(gen_ptr, "acquire", 4, typ=I32)
        with b.if_then(self.claim(b, slot, now)):  # else the submitting thread ran it already
            self.run_block(b, slot, now)
        b.store(now, seen_slot)
        b.store(_c32(0), spins)
        b.branch(spin)
        return fn

    def _submit(self) -> None:
        fn = ir.Function(self.module, ir.FunctionType(I32, [PTR, PTR, I64]), SUBMIT)
        fns, args, count = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        tid = b.alloca(I64)
        lock, pid_global, out = self.state["lock"], self.state["pid"], self.state["count"]
        took = b.extract_value(b.cmpxchg(lock, _c32(0), _c32(1), "acquire", "monotonic"), 1)
        too_many = b.icmp_unsigned(">", count, ir.Constant(I64, MAX_WORKERS))
        inline = b.or_(b.not_(took), too_many)
        with b.if_then(inline):
            with b.if_then(took):
                _store_atomic(b, _c32(0), lock, "release")
            self._run_here(b, fns, args, count)
            b.ret(_c32(0))
        pid = b.call(self.getpid, [])
        with b.if_then(b.icmp_unsigned("!=", b.load(pid_global, typ=I32), pid)):
            # a new process (or a fork child, which has none of the parent's threads)
            with _counted(b, ir.Constant(I64, MAX_WORKERS)) as i:
                slot = self.slot(b, i)
                b.store(_c32(0), _field(b, slot, STARTED))
                b.store(b.load(_field(b, slot, GEN), typ=I32), _field(b, slot, DONE))
                b.store(b.load(_field(b, slot, GEN), typ=I32), _field(b, slot, CLAIMED))
            b.store(pid, pid_global)
        with _counted(b, count) as i:
            slot = self.slot(b, i)
            b.store(b.load(b.gep(fns, [i], source_etype=PTR), typ=PTR), _field(b, slot, FN))
            b.store(b.load(b.gep(args, [i], source_etype=PTR), typ=PTR), _field(b, slot, ARG))
            started = _field(b, slot, STARTED)
            with b.if_then(b.icmp_unsigned("==", b.load(started, typ=I32), _c32(0))):
                ok = b.icmp_signed("==", b.call(self.create, [tid, ir.Constant(PTR, None), self.worker, slot]), _c32(0))
                with b.if_then(ok):
                    b.call(self.detach, [b.load(tid, typ=I64)])
                    b.store(_c32(1), started)
            gen_ptr = _field(b, slot, GEN)
            with b.if_else(b.icmp_unsigned("==", b.load(started, typ=I32), _c32(1))) as (threaded, alone):
                with threaded:
                    b.atomic_rmw("add", gen_ptr, _c32(1), "seq_cst")
                    with b.if_then(b.icmp_unsigned("!=", b.load_atomic(_field(b, slot, SLEEPING), "seq_cst", 4, typ=I32), _c32(0))):
                        self.wake(b, gen_ptr)
                with alone:  # no thread: run the block here, and count it done
                    task = b.load(_field(b, slot, FN), typ=TASK.as_pointer())
                    b.call(task, [b.load(_field(b, slot, ARG), typ=PTR)])
                    gen = b.add(b.load(gen_ptr, typ=I32), _c32(1))
                    b.store(gen, gen_ptr)
                    b.store(gen, _field(b, slot, DONE))
                    b.store(gen, _field(b, slot, CLAIMED))
        b.store(b.trunc(count, I32), out)
        b.ret(_c32(1))

    def _run_here(self, b: ir.IRBuilder, fns: ir.Value, args: ir.Value, count: ir.Value) -> None:
        with _counted(b, count) as i:
            task = b.load(b.gep(fns, [i], source_etype=PTR), typ=TASK.as_pointer())
            b.call(task, [b.load(b.gep(args, [i], source_etype=PTR), typ=PTR)])

    def _wait(self) -> None:
        fn = ir.Function(self.module, ir.FunctionType(VOID, []), WAIT)
        entry, check, spin, done = (fn.append_basic_block(n) for n in ("entry", "check", "spin", "done"))
        b = ir.IRBuilder(entry)
        count = b.zext(b.load(self.state["count"], typ=I32), I64)
        index = b.alloca(I64)
        b.store(ir.Constant(I64, 0), index)
        b.branch(check)
        b.position_at_end(check)
        i = b.load(index, typ=I64)
        b.cbranch(b.icmp_unsigned("<", i, count), spin, done)
        b.position_at_end(spin)
        slot = self.slot(b, i)
        gen = b.load(_field(b, slot, GEN), typ=I32)
        finished = b.icmp_unsigned("==", b.load_atomic(_field(b, slot, DONE), "acquire", 4, typ=I32), gen)
        with b.if_then(finished):
            b.store(b.add(i, ir.Constant(I64, 1)), index)
        with b.if_then(b.not_(finished)):
            # no worker has taken it yet (asleep, or not scheduled): run it here
            unclaimed = b.icmp_unsigned("==", b.load_atomic(_field(b, slot, CLAIMED), "monotonic", 4, typ=I32), b.sub(gen, _c32(1)))
            with b.if_else(unclaimed) as (free, taken):
                with free:
                    with b.if_then(self.claim(b, slot, gen)):
                        self.run_block(b, slot, gen)
                with taken:
                    self.pause(b)
        b.branch(check)
        b.position_at_end(done)
        _store_atomic(b, _c32(0), self.state["lock"], "release")
        b.ret_void()

    def _wake_all(self) -> None:
        """``kiln_pool_wake()``: every sleeping worker of this process wakes and spins for new
        blocks; a run calls it first, so its first parallel kernel finds them awake."""
        fn = ir.Function(self.module, ir.FunctionType(VOID, []), WAKE)
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        ours = b.icmp_unsigned("==", b.load(self.state["pid"], typ=I32), b.call(self.getpid, []))
        with b.if_then(ours):
            with _counted(b, ir.Constant(I64, MAX_WORKERS)) as i:
                slot = self.slot(b, i)
                started = b.icmp_unsigned("==", b.load(_field(b, slot, STARTED), typ=I32), _c32(1))
                asleep = b.icmp_unsigned("!=", b.load_atomic(_field(b, slot, SLEEPING), "monotonic", 4, typ=I32), _c32(0))
                with b.if_then(b.and_(started, asleep)):
                    self.wake(b, _field(b, slot, GEN))
        b.ret_void()


class _counted:
    """``with _counted(b, n) as i:`` a loop over i in [0, n) (i64)."""

    def __init__(self, b: ir.IRBuilder, count: ir.Value):
        self.b, self.count = b, count

    def __enter__(self) -> ir.Value:
        b = self.b
        self.index = b.alloca(I64)
        b.store(ir.Constant(I64, 0), self.index)
        self.check = b.append_basic_block("loop.check")
        self.body = b.append_basic_block("loop.body")
        self.end = b.append_basic_block("loop.end")
        b.branch(self.check)
        b.position_at_end(self.check)
        i = b.load(self.index, typ=I64)
        b.cbranch(b.icmp_unsigned("<", i, self.count), self.body, self.end)
        b.position_at_end(self.body)
        return i

    def __exit__(self, *exc) -> None:
        b = self.b
        b.store(b.add(b.load(self.index, typ=I64), ir.Constant(I64, 1)), self.index)
        b.branch(self.check)
        b.position_at_end(self.end)


_lock = threading.Lock()
_engine: list = []  # the pool's JIT engine, kept for the life of the process


def install() -> None:
    """Compile the pool once in this process and make its functions linkable by name."""
    with _lock:
        if _engine:
            return
        from kiln.backends.llvm.target import host_cpu, optimize, target_machine

        cpu = host_cpu()
        machine = target_machine(cpu)
        built = _Builder(cpu.triple)
        built.module.data_layout = str(machine.target_data)
        parsed = llvm.parse_assembly(str(built.module))
        parsed.verify()
        optimize(parsed, machine)
        engine = llvm.create_mcjit_compiler(parsed, machine)
        engine.finalize_object()
        for name in (SUBMIT, WAIT, WAKE):
            llvm.add_symbol(name, engine.get_function_address(name))
        _engine.append(engine)
