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

from .modeguests import USTACK, enter_user
from .rawguest import build_guest
from .userharness import KERNEL_START, LABELS, LOG, one_vector_handler, store_labels

STEP_LOG, STEP_LABELS = LOG, LABELS
SET_TF = "pushfq\n    or qword ptr [rsp], 0x100\n    popfq"

SOURCE = KERNEL_START + """    mov ecx, 0xc0000084; mov eax, {fmask}; xor edx, edx; wrmsr
""" + store_labels("sys_entry", "u_ret") + """    xor r8, r8
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
""" + one_vector_handler(1, f"""    mov rax, [rsp + 40]       /* CS */
    mov [{LOG + 8:#x} + rcx], rax
    mov rax, dr6
    mov [{LOG + 16:#x} + rcx], rax
    xor eax, eax
    mov dr6, rax
""", stride=24, after_count="    and qword ptr [rsp + 48], ~0x100\n") + """
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
                                     ustack=USTACK), "long")
