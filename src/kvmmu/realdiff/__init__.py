"""The differential runner: the same guest bytes on the model and on the real /dev/kvm.

    kvmmu real-diff tests/realdiff/corpus            # every program of the corpus
    kvmmu real-diff tests/realdiff/corpus/mmio_widths.py -k dword --verbose

A program (`kvmmu.guest.runtime.Program`) is laid out once (`runtime.build`) and run by both
backends with the same memslots, memory image, registers and MMIO device; after each ``hlt`` the
host applies the program's `between` actions (memslot delete / re-add / move, memory writes).
Per program the report compares:

- ``stops``     how each run ended (hlt, shutdown, internal_error, ...)
- ``mmio``      the KVM_EXIT_MMIO stream: address, length, direction, data
- ``memory``    final guest memory of every live memslot, page-table A/D bits included
- ``faults``    the runtime's fault log (vector, error code, CR2, RIP)
- ``counters``  exits, mmio_exits, pf_taken, pf_fixed, pf_emulate, pf_guest, pf_mmio_spte_created,
                insn_emulation (vCPU) and pages_4k (VM), as deltas over the whole program
- ``regs``      general registers, RIP and RFLAGS at the end

``exits`` on the real host also counts the host's own interrupts (timer ticks while the guest runs);
the real program is run again (up to ``repeats`` runs) while its ``exits`` exceeds the model's, and the
smallest count is kept (noise only adds; a long CPL0 program may still show it).
A program may document an understood difference in ``Program.expect`` ({observable: reason}); the
report still shows it as different, marked "documented".

A corpus is a folder of ``*.py`` files (or single files), each defining ``PROGRAMS`` (a list) or
``PROGRAM``.

The package: `corpus` (loading programs), `observation` (what one backend showed, the MMIO device,
the memory capture), `backends` (the `Backend` protocol, the model and the real backend, and the one
observation loop `observe`), `compare` (the diff per observable, `diff_program`), `format` (text and
JSON reports) and `cli` (``kvmmu real-diff``).
"""

from __future__ import annotations

from .backends import Backend, GuestVM, ModelBackend, RealBackend, Stop, observe, run_model, run_real
from .cli import add_cli
from .compare import ObservableDiff, ProgramReport, compare, diff_program
from .corpus import load_programs
from .format import format_report, report_json
from .observation import (
    COUNTERS,
    EXTRA_COUNTERS,
    OBSERVABLES,
    REG_NAMES,
    VM_COUNTERS,
    Device,
    FaultRecord,
    Mmio,
    MmioRecord,
    Observation,
    final_slots,
)

__all__ = ["COUNTERS", "EXTRA_COUNTERS", "OBSERVABLES", "REG_NAMES", "VM_COUNTERS", "Backend", "Device",
           "FaultRecord", "GuestVM", "Mmio", "MmioRecord", "ModelBackend", "ObservableDiff", "Observation",
           "ProgramReport", "RealBackend", "Stop", "add_cli", "compare", "diff_program", "final_slots",
           "format_report", "load_programs", "observe", "report_json", "run_model", "run_real"]

