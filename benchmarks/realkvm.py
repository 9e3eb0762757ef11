"""The MMIO loop on the real /dev/kvm (kvmmu.real), answered by a Python run loop.

The guest is the hand-assembled CPL0 program of tests/real: `mov rdi, MMIO; mov ecx, N;
loop: mov [rdi], ecx; dec ecx; jnz loop; hlt`.  Every store is one KVM_EXIT_MMIO that
RealVcpu.run answers in Python, so the rate is KVM_RUN + exit decoding + the handler, per store;
the model runs the same N stores in micro.mmio_rate.
"""

from __future__ import annotations

from .harness import best_rate, clock

MMIO = 0xD000_0000
CODE = 0x40000
STACK_TOP = 0x9000


def _program(n: int) -> bytes:
    return (b"\x48\xbf" + MMIO.to_bytes(8, "little")      # mov rdi, MMIO
            + b"\xb9" + n.to_bytes(4, "little")           # mov ecx, N
            + b"\x89\x0f"                                 # loop: mov [rdi], ecx
            + b"\xff\xc9"                                 #       dec ecx
            + b"\x75\xfa"                                 #       jnz loop
            + b"\xf4")                                    # hlt


def real_mmio_rate(n: int = 40_000, repeats: int = 2) -> tuple[float | None, str]:
    """(exits per second, note); (None, why) when /dev/kvm cannot be used here."""
    from kvmmu.real import FlatLongMode, RealVM, available, unavailable_reason
    if not available():
        return None, f"no usable /dev/kvm: {unavailable_reason()}"

    def run() -> tuple[int, float]:
        with RealVM() as vm:
            vm.set_user_memory_region(0, 0, 2 << 20)
            vcpu = vm.create_vcpu()
            FlatLongMode().install(vm, vcpu, cpl=0)
            vm.write_phys(CODE, _program(n))
            vcpu.set_regs(rip=CODE, rsp=STACK_TOP, rflags=0x2)
            seen = [0]

            def handler(access: object) -> None:
                seen[0] += 1

            t0 = clock()
            ex = vcpu.run(mmio_handler=handler, max_exits=n + 1)
            dt = clock() - t0
            if ex.reason != "hlt" or seen[0] != n:
                raise AssertionError(f"the real guest stopped with {ex} after {seen[0]} of {n} MMIO exits")
            return n, dt

    rate, _, _ = best_rate(run, repeats)
    return rate, "CPL0 loop, RealVcpu.run"
