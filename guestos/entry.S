/* guestos trap entry/exit and context switch (64-bit).
 * Every vector pushes an error code (0 where the CPU gives none) and its
 * number, then the general registers; trap(tf) sees struct trapframe
 * (kernel.h).  trapret is also where a new process starts. */
    .altmacro
    .text
    .code64

    .macro VEC n
vec\n:
    .if (\n == 8 || (\n >= 10 && \n <= 14) || \n == 17 || \n == 21 || \n == 29 || \n == 30)
    .else
    pushq $0
    .endif
    pushq $\n
    jmp alltraps
    .endm

    .set i, 0
    .rept 256
    VEC %i
    .set i, i + 1
    .endr

alltraps:
    pushq %rax
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rbp
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, %rdi
    cld
    call trap
    .globl trapret
trapret:
    movq %rsp, %rdi
    call trap_leave
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rbp
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rax
    addq $16, %rsp
    iretq

/* swtch(uint64_t *save_rsp, uint64_t new_rsp): callee-saved registers on
 * the old stack, then the new stack's. */
    .globl swtch
swtch:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

    .section .rodata
    .align 8
    .globl vectors
vectors:
    .set i, 0
    .macro VADDR n
    .quad vec\n
    .endm
    .rept 256
    VADDR %i
    .set i, i + 1
    .endr
    .section .note.GNU-stack, "", @progbits
