"""An interrupt whose pushes land on a page of translated code, as in a
real-mode boot sector whose stack sits just below it (SP 0x7C00, code at
0x7C00: one page).  The delivery drops the page's translations and goes on;
it is not an instruction to restart (bt raised SmcRestart out of the
delivery and crashed the guest, found booting SYSLINUX through SeaBIOS)."""

from __future__ import annotations

from tests.rawguest import build_guest, run_raw

SOFTWARE = """
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7C00, %sp              # the stack grows down into this code's page
    movw $handler, 0x80 * 4       # IVT entry 0x80
    movw $0, 0x80 * 4 + 2
    mov $3, %cx
1:  int $0x80                     # pushes FLAGS, CS, IP at 0x7BFA..0x7BFF
    loop 1b
    mov %bx, %ax
    out %al, $0xF4
    hlt
handler:
    inc %bx
    iret
"""


# The timer's IRQ 0 through the 8259 (vector 8) while the guest waits in
# HLT: the delivery comes from outside any translated block.
HARDWARE = """
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7C00, %sp
    xor %bx, %bx
    movw $handler, 8 * 4
    movw $0, 8 * 4 + 2
    mov $0x11, %al                # 8259 ICW1..ICW4: vectors 8-15, 8086 mode
    out %al, $0x20
    mov $0x08, %al
    out %al, $0x21
    mov $0x04, %al
    out %al, $0x21
    mov $0x01, %al
    out %al, $0x21
    mov $0xFE, %al                # only IRQ 0
    out %al, $0x21
    mov $0x34, %al                # PIT channel 0, mode 2, a 10 ms period
    out %al, $0x43
    mov $0x9C, %al
    out %al, $0x40
    mov $0x2E, %al
    out %al, $0x40
    sti
1:  hlt
    cmp $3, %bx
    jb 1b
    cli
    mov $0x42, %al                # only reached once the handler counted 3 ticks
    out %al, $0xF4
    hlt
handler:
    inc %bx
    push %ax
    mov $0x20, %al                # EOI
    out %al, $0x20
    pop %ax
    iret
"""


def _run(source: str):
    return run_raw(build_guest(source, "real"), "real", engine="bt", debug_exit=(0xF4, 1), timeout=20)


def test_int_n_pushes_onto_a_code_page():
    run = _run(SOFTWARE)
    assert run.status.reason.value == "debug-exit", run.status
    assert run.status.value == 3        # the handler ran once per int, and the loop went on


def test_hardware_interrupt_pushes_onto_a_code_page():
    run = _run(HARDWARE)
    assert run.status.reason.value == "debug-exit", run.status
    # The loop leaves only once the handler counted three ticks.  (It used to
    # report BX's low byte with an upper bound, which a loaded host broke: a
    # handler slower than the tick period is re-entered at each iret.)
    assert run.status.value == 0x42, run.status
