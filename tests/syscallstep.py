"""A guest that single-steps user code into `syscall` and back through
`sysretq`, for the rule that both test RFLAGS.TF when they complete
(pyvmm/engines/bt/system.py, _single_step_after).

Kernel half (CPL0): IA32_FMASK = {fmask}; the #DB handler (vector 1) logs
the pushed RIP, CS and DR6 of each #DB at STEP_LOG (24 bytes each, count in
R8), clears DR6 and returns with TF clear.  sys_entry halts on RAX = 60,
else ORs `{r11_or}` into R11 and returns with sysretq.  Any other vector
halts with the vector in RAX.  The kernel writes the addresses of sys_entry
and u_ret (the instruction after the first syscall) at STEP_LABELS.
User half (CPL3): a loop (so that hybrid runs it under KVM), then `{user_tf}`
(popfq setting TF, or nothing), syscall; at u_ret: mov eax, 60; syscall."""

from __future__ import annotations

from .hybridguest import IDT
from .modeguests import IDT_STUBS, SYSCALL_SETUP, USTACK, enter_user, idt_setup
from .rawguest import build_guest

STEP_LOG, STEP_LABELS = 0x330000, 0x331000
SET_TF = "pushfq\n    or qword ptr [rsp], 0x100\n    popfq"

SOURCE = """
.intel_syntax noprefix
""" + SYSCALL_SETUP + """    mov ecx, 0xc0000084; mov eax, {fmask}; xor edx, edx; wrmsr
""" + idt_setup(IDT) + """    mov edi, {labels}
    mov qword ptr [rdi], OFFSET sys_entry
    mov qword ptr [rdi + 8], OFFSET u_ret
    xor r8, r8
    xor eax, eax
    mov dr6, rax
""" + enter_user() + """
sys_entry:
    cmp eax, 60
    je done
    or r11, {r11_or}
    sysretq
done:
    cli
    hlt

common:                       /* [rsp] = vector, then error code or 0, then the frame */
    cmp qword ptr [rsp], 1
    jne other
    push rax
    push rcx
    imul rcx, r8, 24
    mov rax, [rsp + 32]       /* the pushed RIP */
    mov [{log} + rcx], rax
    mov rax, [rsp + 40]       /* CS */
    mov [{log} + rcx + 8], rax
    mov rax, dr6
    mov [{log} + rcx + 16], rax
    xor eax, eax
    mov dr6, rax
    inc r8
    and qword ptr [rsp + 48], ~0x100
    pop rcx
    pop rax
    add rsp, 16
    iretq
other:
    mov rax, [rsp]
    cli
    hlt

""" + IDT_STUBS + """
user:
    mov ecx, 1000
0:  dec ecx
    jnz 0b
    {user_tf}
    syscall
u_ret:
    mov eax, 60
    syscall
"""


def syscall_step_guest(fmask: int, r11_or: int, user_tf: bool) -> bytes:
    """The guest with IA32_FMASK `fmask`, `r11_or` ORed into the RFLAGS
    sysretq loads, and TF set by user code before its syscall if `user_tf`."""
    return build_guest(SOURCE.format(fmask=fmask, r11_or=r11_or, user_tf=SET_TF if user_tf else "",
                                     labels=STEP_LABELS, log=STEP_LOG, ustack=USTACK), "long")
