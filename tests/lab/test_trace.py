"""Parsing tracefs lines as ftrace prints them (the samples are lines L1's kernel 6.1 wrote)."""

from kvmmu.lab.trace import PFERR_RSVD, fields, parse_line, parse_trace, rsvd_faults, summarize

MARK = "   python-170     [000] d..1.   412.331052: mark_mmio_spte: sptep:000000008872c9bd gfn d0000 access 7 gen 2"
CHECK = "  python-170  [000] ....1   413.000001: check_mmio_spte: spte 80000d0000017 kvm_gen 4 spte-gen 2 valid 0"
ZAP = " python3.11-171 [000] .....  9.5: kvm_mmu_zap_all_fast: kvm-mmu-valid-gen 0 used_pages 0"


def test_line_fields() -> None:
    t = parse_line(MARK)
    assert t is not None and t.event == "mark_mmio_spte" and t.timestamp == 412.331052
    assert t.text == "sptep:000000008872c9bd gfn d0000 access 7 gen 2"
    f = fields(t.text)
    assert f["gfn"] == "d0000" and f["access"] == "7" and f["gen"] == "2"
    c = parse_line(CHECK)
    assert c is not None and fields(c.text) == {"spte": "80000d0000017", "kvm_gen": "4", "spte-gen": "2", "valid": "0"}
    z = parse_line(ZAP)
    assert z is not None and z.event == "kvm_mmu_zap_all_fast" and fields(z.text)["kvm-mmu-valid-gen"] == "0"


def test_comments_and_noise_are_skipped() -> None:
    text = "# tracer: nop\n#\n\n" + MARK + "\nCPU:0 [LOST 3 EVENTS]\n" + CHECK + "\n"
    assert [t.event for t in parse_trace(text)] == ["mark_mmio_spte", "check_mmio_spte"]


def test_rsvd_faults_counts_only_rsvd_error_codes() -> None:
    lines = parse_trace("\n".join([
        " p-1 [000] ..... 1.0: kvm_page_fault: address d0000000 error_code d",      # P|W? no: 0xd = P|RSVD|U
        " p-1 [000] ..... 1.1: kvm_page_fault: address d0000000 error_code 0x100000004",
        " p-1 [000] ..... 1.2: kvm_page_fault: vcpu 0 rip 0x1000 address 0x00000000d0000000 error_code 0x9",
        " p-1 [000] ..... 1.3: kvm_exit: reason npf rip 0x1000 info 9 d0000000",
    ]))
    assert 0xD & PFERR_RSVD and not 0x100000004 & PFERR_RSVD
    assert rsvd_faults(lines) == 2


def test_summary_counts_and_keeps_the_mmio_events() -> None:
    s = summarize(parse_trace("\n".join([MARK, CHECK, MARK, " p-1 [000] ..... 2.0: kvm_entry: vcpu 0, rip 0x1000"])),
                  max_kept=1)
    assert s["counts"] == {"check_mmio_spte": 1, "kvm_entry": 1, "mark_mmio_spte": 2}
    assert s["lines"] == {"mark_mmio_spte": ["sptep:000000008872c9bd gfn d0000 access 7 gen 2"],
                          "check_mmio_spte": ["spte 80000d0000017 kvm_gen 4 spte-gen 2 valid 0"]}
