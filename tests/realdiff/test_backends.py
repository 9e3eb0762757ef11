"""One backend contract for the differential runner: `kvmmu.VM` and `kvmmu.real.RealVM` both have the
VM API the observation loop uses (`GuestVM`), the model and the real backend both satisfy `Backend`,
and both take the same MMIO handler (one exit record in, the read's answer out).

The expected observations of the tiny program below come from its own text (what an MMIO write of
0x11223344 and a read answered by its device must show), not from either backend's output.
"""

from __future__ import annotations

import inspect

import pytest

import kvmmu
from kvmmu.guest.runtime import Map, Program, build
from kvmmu.real import RealVM, available, unavailable_reason
from kvmmu.realdiff import Backend, GuestVM, Mmio, ModelBackend, RealBackend, observe

MMIO = 0xD000_0000
DATA = 0x60_0000
ANSWER = 0x0123_4567_89AB_CDEF
PROGRAM = Program(
    name="backend_contract",
    maps=(Map(DATA, 0x1000, flags="rw u"), Map(MMIO, 0x1000, flags="rw u")),
    data={DATA: bytes(8)},
    mmio_read=lambda addr, length, seq: ANSWER if (addr, length, seq) == (MMIO + 8, 8, 1) else 0,
    code=f"""
        mov rdi, {MMIO:#x}
        mov dword [rdi], 0x11223344
        mov rax, qword [rdi + 8]
        mov rsi, {DATA:#x}
        mov [rsi], rax
        hlt
    """)
EXPECTED_MMIO = [Mmio(MMIO, 4, True, (0x11223344).to_bytes(4, "little")),
                 Mmio(MMIO + 8, 8, False, ANSWER.to_bytes(8, "little"))]


def _params(fn: object) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]   # type: ignore[arg-type]


@pytest.mark.parametrize("vm_class", [kvmmu.VM, RealVM], ids=["VM", "RealVM"])
def test_both_vms_have_the_vm_api_the_loop_uses(vm_class: type) -> None:
    """Every GuestVM method exists on both VM classes and takes the protocol's parameters first."""
    for name in ("set_user_memory_region", "write_phys", "read_phys"):
        want = _params(getattr(GuestVM, name))
        assert _params(getattr(vm_class, name))[:len(want)] == want, (vm_class.__name__, name)
    if vm_class is RealVM:          # the model's VM sets `stats` per instance (checked below)
        assert isinstance(RealVM.stats, property)


def test_a_model_vm_is_a_guest_vm() -> None:
    vm = kvmmu.VM()
    assert isinstance(vm, GuestVM) and isinstance(vm.stats, dict)


@pytest.mark.parametrize("backend_class", [ModelBackend, RealBackend], ids=["model", "real"])
def test_both_backends_implement_every_backend_method(backend_class: type) -> None:
    for name in ("start", "run", "vcpu_stats", "mmio_log", "regs", "finish", "close"):
        assert _params(getattr(backend_class, name)) == _params(getattr(Backend, name)), (backend_class, name)
    assert isinstance(backend_class.binary_stats, bool)


def test_the_model_backend_satisfies_the_protocol_and_the_program_text() -> None:
    backend = ModelBackend(PROGRAM, "kvm-pvm")
    assert isinstance(backend, Backend) and isinstance(backend.vm, GuestVM)
    obs = observe(PROGRAM, backend, build(PROGRAM))
    assert obs.stops == ["hlt"] and obs.error is None
    assert obs.mmio == EXPECTED_MMIO
    assert obs.regs["rax"] == ANSWER
    assert obs.memory[DATA][:8] == ANSWER.to_bytes(8, "little")
    assert obs.counters["mmio_exits"] == 2


@pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}")
def test_the_real_backend_satisfies_the_protocol_and_the_program_text() -> None:
    backend = RealBackend(PROGRAM)
    assert isinstance(backend, Backend) and isinstance(backend.vm, GuestVM)
    obs = observe(PROGRAM, backend, build(PROGRAM))
    assert obs.stops == ["hlt"]
    assert obs.mmio == EXPECTED_MMIO
    assert obs.regs["rax"] == ANSWER
    assert obs.memory[DATA][:8] == ANSWER.to_bytes(8, "little")
    assert obs.counters["mmio_exits"] == 2
    assert backend.vm.closed                       # observe closes the backend


def test_a_read_answered_with_none_floats_to_all_ones_on_the_model() -> None:
    """The one handler contract: None answers a read with all ones (no device there), as on RealVcpu.run."""
    vm = kvmmu.VM()
    vm.mmio_handler = lambda exit_: None
    vm.set_user_memory_region(0, 0, 1 << 20)
    vcpu = vm.create_vcpu()
    r = vcpu.access(0xD000_0000, 4, "read")
    assert r.value == 0xFFFF_FFFF


@pytest.mark.skipif(not available(), reason=f"needs a usable /dev/kvm: {unavailable_reason()}")
def test_a_read_answered_with_none_floats_to_all_ones_on_real_kvm() -> None:
    program = Program(name="none_reply", maps=(Map(MMIO, 0x1000, flags="rw u"),),
                      code=f"mov rdi, {MMIO:#x}\nmov eax, dword [rdi]\nhlt")
    img = build(program)
    backend = RealBackend(program)
    try:
        for s in program.slots:
            backend.vm.set_user_memory_region(s.slot, s.gpa, s.size, s.flags)
        for gpa, data in img.writes():
            backend.vm.write_phys(gpa, data)
        backend.start(img, lambda access: None)    # type: ignore[arg-type]
        assert backend.run(program).reason == "hlt"
        assert backend.regs()["rax"] & 0xFFFF_FFFF == 0xFFFF_FFFF
    finally:
        backend.close()
