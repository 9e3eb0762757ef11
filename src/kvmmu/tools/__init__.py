"""Build tools: what turns source into guest images, used while building them and nothing else.
`asm` is the assembler the guest runtime (`guest.runtime.build`) and the tests build guest code with;
it imports nothing of kvmmu but `errors`."""
