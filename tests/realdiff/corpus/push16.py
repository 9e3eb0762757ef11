"""16-bit pushes and pops (66 prefix) and NASM's defaults for unsized operands.

SDM PUSH/POP: in 64-bit mode the operand size is 64 bits or, with a 66 prefix, 16 bits (no 32-bit
form): ``push word imm`` (66 68 iw / 66 6A ib), ``push r16``, ``push m16`` move RSP by 2 and store 2
bytes; ``pop r16`` / ``pop m16`` load 2 bytes and move RSP by 2, leaving bits 63:16 of the register
alone; ``pushfw`` / ``popfw`` (66 9C / 66 9D) move FLAGS, 2 bytes.  The assembler follows NASM:
``push 0x1234`` is a qword push (68 id), and an unsized ``call [mem]`` / ``jmp [mem]`` is a near
qword (FF /2, FF /4).
"""

from kvmmu.guest.runtime import Map, Program, both_rings

DATA = 0x60_0000

PROGRAMS = both_rings(Program(
    name="push_pop_16",
    doc="push word imm16 / imm8, push r16, push m16, pop r16, pop m16 move RSP by 2; push 0x1234 "
        "by 8; pushfw / popfw move FLAGS (2 bytes); call [mem] / jmp [mem] are near",
    maps=(Map(DATA, 0x1000, flags="rw u"),),
    data={DATA: bytes.fromhex("efbeadde00000000")},
    code=f"""
        mov rbx, rsp
        mov rax, -1
        push word 0x1234
        push word -2
        push ax
        push word [{DATA:#x}]
        mov rcx, rbx
        sub rcx, rsp
        pop word [{DATA + 8:#x}]
        pop dx
        pop ax
        pop si
        push 0x1234
        mov rdi, rbx
        sub rdi, rsp
        pop r8
        stc
        pushfw
        mov r11, rbx
        sub r11, rsp
        clc
        popfw
        setc r12b
        mov rsi, {DATA + 0x100:#x}
        mov qword [rsi], target
        call [rsi]
        mov qword [rsi + 8], done
        jmp [rsi + 8]
        ud2
    target:
        mov r9, [rsp]
        ret
    done:
        mov rsi, {DATA + 0x40:#x}
        mov [rsi], rcx
        mov [rsi + 8], rdx
        mov [rsi + 16], rax
        mov [rsi + 24], rdi
        mov [rsi + 32], r8
        mov r10, rsp
        sub r10, rbx
        mov [rsi + 40], r10
        mov [rsi + 48], r11
        mov [rsi + 56], r12
        hlt
    """))
