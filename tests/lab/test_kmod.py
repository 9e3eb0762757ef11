"""Module dependencies from .modinfo (what depmod reads) and from modules.dep."""

import struct
from pathlib import Path

import pytest

from kvmmu.errors import ScenarioError
from kvmmu.lab.kmod import ModuleTree, canonical, elf_section, modinfo, parse_modules_dep


def _elf(sections: dict[str, bytes]) -> bytes:
    """A minimal ELF64 LE relocatable with the given sections plus .shstrtab."""
    names = b"\0" + b"".join(n.encode() + b"\0" for n in [*sections, ".shstrtab"])
    body = b""
    headers = [struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)]
    offset = 64
    name_off = 1
    for n, data in [*sections.items(), (".shstrtab", names)]:
        headers.append(struct.pack("<IIQQQQIIQQ", name_off, 1, 0, 0, offset + len(body), len(data), 0, 0, 1, 0))
        name_off += len(n) + 1
        body += data
    shoff = 64 + len(body)
    ident = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    header = ident + struct.pack("<HHIQQQIHHHHHH", 1, 62, 1, 0, 0, shoff, 0, 64, 0, 0, 64, len(headers),
                                 len(headers) - 1)
    return header + body + b"".join(headers)


def _module(tmp: Path, name: str, depends: str) -> None:
    info = b"license=GPL\0" + f"depends={depends}\0".encode() + b"vermagic=6.1.0 SMP\0"
    (tmp / f"{name}.ko").write_bytes(_elf({".text": b"\x90" * 5, ".modinfo": info}))


def test_elf_section_and_modinfo(tmp_path: Path) -> None:
    _module(tmp_path, "kvm-amd", "kvm,ccp")
    data = (tmp_path / "kvm-amd.ko").read_bytes()
    assert elf_section(data, ".text") == b"\x90" * 5
    assert elf_section(data, ".nothere") is None
    assert modinfo(tmp_path / "kvm-amd.ko")["depends"] == "kvm,ccp"


def test_load_order_puts_dependencies_first(tmp_path: Path) -> None:
    for name, deps in {"kvm-amd": "kvm,ccp", "kvm": "irqbypass", "ccp": "", "irqbypass": "",
                       "9p": "9pnet,netfs,fscache", "fscache": "netfs", "netfs": "", "9pnet": ""}.items():
        _module(tmp_path, name, deps)
    order = ModuleTree(tmp_path).load_order(["kvm_amd", "9p"])
    assert sorted(order) == sorted(["kvm_amd", "kvm", "ccp", "irqbypass", "9p", "9pnet", "netfs", "fscache"])
    for mod, deps in {"kvm_amd": ["kvm", "ccp"], "kvm": ["irqbypass"], "9p": ["9pnet", "netfs", "fscache"],
                      "fscache": ["netfs"]}.items():
        assert all(order.index(d) < order.index(mod) for d in deps)


def test_builtin_and_missing(tmp_path: Path) -> None:
    _module(tmp_path, "9p", "9pnet")
    (tmp_path / "modules.builtin").write_text("kernel/net/9p/9pnet.ko\n")
    assert ModuleTree(tmp_path).load_order(["9p"]) == ["9p"]
    with pytest.raises(ScenarioError, match="nothere"):
        ModuleTree(tmp_path).load_order(["nothere"])


def test_modules_dep_wins_when_present(tmp_path: Path) -> None:
    _module(tmp_path, "a", "")
    _module(tmp_path, "b", "")
    (tmp_path / "modules.dep").write_text("kernel/a.ko: kernel/b.ko\nkernel/b.ko:\n")
    assert ModuleTree(tmp_path).load_order(["a"]) == ["b", "a"]
    assert parse_modules_dep("x/kvm-amd.ko: x/kvm.ko x/ccp.ko.xz\n") == {"kvm_amd": ["kvm", "ccp"]}
    assert canonical("arch/x86/kvm/kvm-amd.ko") == "kvm_amd"
