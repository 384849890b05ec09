"""A small two-level guest that exercises every way user code leaves KVM
under the hybrid engine, and runs the same on bt (so bt is its oracle).

Kernel half (CPL0): IDT with a stub per vector, PIC remapped to 0x20 and
the PIT at 100 Hz, syscall/sysret, and a 4 KiB page table for the user
window at 0x40000000 (initially empty).  Handlers:
  #UD (6)      count it in R8, skip the 2-byte ud2;
  int 0x80     R9 += RAX (a software interrupt with an argument);
  #PF (14)     count it in R10 and map the faulting window page to frame
               FRAME_A (demand paging: a not-present entry becomes present);
  IRQ0 (0x20)  count timer ticks in memory at TICKS (user can read it), EOI;
  syscall 1    remap window page 0 to FRAME_B (a present entry changes:
               KVM's cached translation must be dropped) and invlpg;
  syscall 60   halt with interrupts off.
User half (CPL3): three ud2, int 0x80 with 1..5, a read of the window (page
fault, then FRAME_A's value), syscall 1, a second read (FRAME_B's value),
then spins until the timer has ticked TICKS_WANTED more times and exits.
Results: R8 = 3, R9 = 15, R10 = 1, RBX = value A, R12 = value B, R13 =
ticks seen (>= TICKS_WANTED), R15 = user loop count (> 0)."""

from __future__ import annotations

from .modeguests import IDT_STUBS, USTACK, enter_user
from .rawguest import build_guest
from .userharness import KERNEL_START, LABELS, LOG, one_vector_handler, store_labels

WINDOW = 0x40000000
FRAME_A, FRAME_B = 0x300000, 0x301000
VALUE_A, VALUE_B = 0xA11CE, 0xB0B
PT = 0x310000          # the window's page table
TICKS = 0x320000       # timer tick counter (user-readable)
TICKS_WANTED = 3

# Points PD entry 0 of the 1-2 GiB range (the user window at WINDOW) at the
# page table {pt}, which the guest then fills.
WINDOW_TABLE = """    /* the window's page table: PD entry 0 of the 1-2 GiB range */
    mov rax, cr3
    mov rax, [rax]
    and rax, ~0xfff
    mov rax, [rax+8]
    and rax, ~0xfff
    mov qword ptr [rax], {pt} + 7
"""

SOURCE = KERNEL_START + WINDOW_TABLE + """    mov qword ptr [{frame_a}], {value_a}
    mov qword ptr [{frame_b}], {value_b}
    mov qword ptr [{ticks}], 0
    invlpg [{window}]
    /* PIC: IRQ0 -> 0x20, only IRQ0 unmasked; PIT channel 0 at 100 Hz */
    mov al, 0x11; out 0x20, al; mov al, 0x20; out 0x21, al; mov al, 4; out 0x21, al; mov al, 1; out 0x21, al
    mov al, 0x11; out 0xa0, al; mov al, 0x28; out 0xa1, al; mov al, 2; out 0xa1, al; mov al, 1; out 0xa1, al
    mov al, 0xfe; out 0x21, al; mov al, 0xff; out 0xa1, al
    mov al, 0x34; out 0x43, al; mov al, 0x9c; out 0x40, al; mov al, 0x2e; out 0x40, al
    xor r8, r8; xor r9, r9; xor r10, r10; xor r13, r13; xor r15, r15
""" + enter_user(0x202) + """
sys_entry:
    cmp eax, 60
    je done
    cmp eax, 1
    jne 2f
    mov qword ptr [{pt}], {frame_b} + 7
    invlpg [{window}]
2:  sysretq
done:
    cli
    hlt

common:                       /* [rsp] = vector, then error code or 0, then the frame */
    push rax
    mov rax, [rsp+8]
    cmp rax, 6
    je ud
    cmp rax, 0x80
    je int80
    cmp rax, 14
    je pf
    cmp rax, 0x20
    je tick
    cli
    hlt                       /* anything else: stop with the vector in RAX */
ud: inc r8
    add qword ptr [rsp+24], 2
    jmp out
int80:
    mov rax, [rsp]
    add r9, rax
    jmp out
pf: inc r10
    mov rax, cr2
    sub rax, {window}
    shr rax, 12
    mov qword ptr [{pt} + rax*8], {frame_a} + 7
    jmp out
tick:
    inc qword ptr [{ticks}]
    mov al, 0x20
    out 0x20, al
out:
    pop rax
    add rsp, 16
    iretq

""" + IDT_STUBS + """
user:
    ud2
    ud2
    ud2
    mov ecx, 1
3:  mov eax, ecx
    int 0x80
    inc ecx
    cmp ecx, 6
    jne 3b
    mov rbx, [{window}]
    mov eax, 1
    syscall
    mov r12, [{window}]
    /* count ticks from here: under load all of them could otherwise land
       while the kernel part runs in bt, and no tick would end a KVM run */
    mov r14, [{ticks}]
    add r14, {ticks_wanted}
4:  inc r15
    mov r13, [{ticks}]
    cmp r13, r14
    jb 4b
    mov eax, 60
    syscall
"""


def hybrid_guest() -> bytes:
    return build_guest(SOURCE.format(pt=PT, frame_a=FRAME_A, frame_b=FRAME_B, value_a=VALUE_A,
                                     value_b=VALUE_B, ticks=TICKS, window=WINDOW, ustack=USTACK,
                                     ticks_wanted=TICKS_WANTED), "long")


# The TSC the guest kernel writes: one the host's own TSC cannot be near
# (1 << 60 cycles is ~15 years at 2.5 GHz; 1 << 44, used before, is the
# host's TSC about 2 hours after it boots, and a CI run met it there).
GUEST_TSC = 1 << 60

RDTSC_SOURCE = """
.intel_syntax noprefix
    mov ecx, 0xc0000080; rdmsr; or eax, 1; wrmsr
    mov ecx, 0xc0000081; xor eax, eax; mov edx, 0x00100008; wrmsr
    mov ecx, 0xc0000082; mov eax, OFFSET sys_entry; xor edx, edx; wrmsr
    mov ecx, 0xc0000084; mov eax, 0x200; xor edx, edx; wrmsr
    mov ecx, 0x10; xor eax, eax; mov edx, {tsc_high:#x}; wrmsr      /* TSC := GUEST_TSC */
""" + enter_user() + """sys_entry:
    cli
    hlt
user:
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r12, rax
    mov ecx, 100000
1:  dec ecx
    jnz 1b
    rdtsc
    shl rdx, 32
    or rax, rdx
    mov r13, rax
    syscall
"""


def rdtsc_guest() -> bytes:
    """User code reads the TSC twice around a loop, after the kernel set it
    to GUEST_TSC (R12, R13): the values must be the guest's TSC, not the host's."""
    return build_guest(RDTSC_SOURCE.format(ustack=USTACK, tsc_high=GUEST_TSC >> 32), "long")



# The single-step guest: user code sets RFLAGS.TF with popfq, then runs
# `first` and a row of labelled instructions; the kernel's #DB handler
# (vector 1) logs each step's pushed RIP and DR6 at STEP_LOG (16 bytes a
# step), clears DR6 and, after STEPS steps, clears TF in the frame.  #UD
# (vector 6) is counted in R9 and its 2-byte ud2 skipped.  The kernel writes
# the labels' addresses s0..s8 (each the RIP after the instruction before
# it) at STEP_LABELS, so a test can say which RIPs the SDM wants.
STEP_LOG, STEP_LABELS, STEPS = LOG, LABELS, 6
STEP_SOURCE = KERNEL_START + store_labels(*(f"s{i}" for i in range(9))) + """    xor r8, r8
    xor r9, r9
    xor rbx, rbx
    xor eax, eax
    mov dr6, rax
    {arm}
""" + enter_user() + """
sys_entry:
    cli
    hlt
""" + one_vector_handler(1, f"""    mov rax, dr6
    mov [{LOG + 8:#x} + rcx], rax
    xor eax, eax
    mov dr6, rax
""", dispatch="    cmp qword ptr [rsp], 6\n    je ud\n", after_count="""    cmp r8, {steps}
    jb 1f
    and qword ptr [rsp + 48], ~0x100     /* enough steps: TF off */
1:
""", more="""ud: inc r9
    add qword ptr [rsp + 16], 2
    add rsp, 16
    iretq
""") + """
user:
    lea rbp, [rsp - 0x40]
    mov ecx, 1000
0:  dec ecx                   /* a loop first, so that user code runs in KVM */
    jnz 0b
    pushfq
    or qword ptr [rsp], 0x100
    popfq
    {first}
s0: inc rbx
s1: inc rbx
s2: mov ax, ss
s3: mov ss, ax
s4: inc rbx
s5: nop
s6: inc rbx
s7: inc rbx
s8: inc rbx
    mov eax, 60
    syscall
"""


# DR0 = an execute breakpoint at an address the guest never runs, enabled in DR7.
ARM_UNUSED_BREAKPOINT = "mov eax, 0x10; mov dr0, rax; mov eax, 1; mov dr7, rax"


def single_step_guest(first: str, arm: str = "") -> bytes:
    """The single-step guest with `first` as the first instruction TF covers;
    `arm` runs in the kernel before user mode (ARM_UNUSED_BREAKPOINT)."""
    return build_guest(STEP_SOURCE.format(steps=STEPS, ustack=USTACK, first=first, arm=arm), "long")
