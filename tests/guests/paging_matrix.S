# Page-permission matrix: a Multiboot guest that switches to long mode and,
# for one test page, tries every case that tests/test_paging_matrix.py lists
# (its group table is appended to this source as `groups`): the P/RW/US/NX
# flags of the PML4E, PDPTE, PDE and PTE, the page size (4 KiB, 2 MiB,
# 1 GiB, PS in the PML4E), reserved bits, CR0.WP, EFER.NXE, CR4.SMEP/SMAP,
# EFLAGS.AC, CPL 0 or 3, and a read, write, fetch or read-modify-write.
#
# A case is a 32-bit word:
#   bits 0-1  access: 0 read, 1 write, 2 fetch, 3 read-modify-write (or $0)
#   bit  2    CPL 3           bit 3 CR0.WP      bit 4 EFER.NXE
#   bit  5    CR4.SMEP        bit 6 CR4.SMAP    bit 7 EFLAGS.AC
#   bits 8-23 flags of PML4E, PDPTE, PDE, PTE, 4 bits each: P, RW, US, NX
#   bits 24-25 leaf: 0 PTE (4 KiB), 1 PDE.PS (2 MiB), 2 PDPTE.PS (1 GiB),
#             3 PS set in the PML4E (reserved)
#   bits 26-27 level of a reserved bit (0 PML4E .. 3 PTE)
#   bits 28-29 which reserved bit: 0 none, 1 bit MAXPHYADDR, 2 bit 51,
#             3 bit 13 of a large-page leaf
#   bit  30   entries start with A set (so a write sets only D)
#   bit  31   implicit supervisor access instead: `mov %ax, %ds` loads a
#             descriptor from an LDT on the test page, whose accessed bit
#             is set (access 0: a read) or clear (access 1: the CPU writes it)
# A group is (base, mask): its cases are base | every combination of the
# mask's bits.  Each case yields a 16-bit record (or "." when skipped):
#   bit 0 #PF, bits 1-5 error code bits P W U RSVD I/D, bit 6 other error
#   bits or more than one #PF, bit 7 CR2 not the address accessed,
#   bits 8-15 A and D of the PML4E, PDPTE, PDE and PTE after the access.
# CR2 counts as the address accessed anywhere in its first 8 bytes (where
# in a descriptor the CPU writes its accessed bit is not architectural).
# Output on COM1: "H ..." (CPU facts), one "R group start records" line per
# 64 cases, "E count", then isa-debug-exit with 0x10 (0x20 on an unexpected
# exception, after "X vector rip").

    .set COM1, 0x3f8
    .set EXIT_PORT, 0xf4
    .set TEST_PA, 0x400000
    .set DATA_OFF, 0x800
    .set EFER, 0xC0000080
    .set KCODE, 0x08
    .set KDATA, 0x10
    .set UDATA, 0x1B
    .set UCODE, 0x23
    .set TSS_SEL, 0x28
    .set LDT_SEL, 0x38

    .section .multiboot, "a"
    .align 4
    .long 0x1BADB002, 0, -0x1BADB002

    .text
    .code32
    .globl _start
_start:
    cli
    movl $stack_top, %esp
    lgdt gdtr
    # Identity map of the first GiB in 2 MiB supervisor pages (PML4[0]) and
    # the same memory again at 1 TiB (0x10000000000) in user pages
    # (PML4[2]), where CPL 3 code runs, so that SMEP/SMAP never trip on
    # the kernel's own pages.  PML4[1] holds the test tables; the test page
    # is linear 0x8000400000, physical 0x400000 in every page size.
    movl $pdpt_id + 3, pml4
    movl $pdpt_u + 7, pml4 + 16
    movl $pd_id + 3, pdpt_id
    movl $pd_u + 7, pdpt_u
    xorl %ecx, %ecx
1:  movl %ecx, %eax
    shll $21, %eax
    orl $0x83, %eax
    movl %eax, pd_id(,%ecx,8)
    orl $0x87, %eax
    movl %eax, pd_u(,%ecx,8)
    incl %ecx
    cmpl $512, %ecx
    jb 1b
    movl %cr4, %eax
    orl $0x20, %eax                 # PAE
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $EFER, %ecx
    rdmsr
    orl $0x100, %eax                # LME
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $KCODE, $long_entry

    .code64
long_entry:
    movw $KDATA, %ax
    movw %ax, %ds
    movw %ax, %es
    movw %ax, %ss
    movw %ax, %fs
    movw %ax, %gs
    movq $stack_top, %rsp
    call setup_idt_tss
    call cpu_facts
    call run_groups
    leaq msg_end(%rip), %rsi
    call puts
    movq case_count(%rip), %rax
    movl $8, %ecx
    call puthex
    call newline
    movl $0x10, %eax
exit:
    movw $EXIT_PORT, %dx
    outl %eax, %dx
2:  hlt
    jmp 2b

# ---------------------------------------------------------------- setup
setup_idt_tss:
    xorl %edi, %edi
    leaq vec_stubs(%rip), %rsi
1:  movl $0x8E, %edx
    call set_gate
    addq $16, %rsi
    incl %edi
    cmpl $32, %edi
    jb 1b
    movl $14, %edi
    leaq pf_handler(%rip), %rsi
    movl $0x8E, %edx
    call set_gate
    movl $0x80, %edi
    leaq back_handler(%rip), %rsi
    movl $0xEE, %edx                # DPL 3: CPL 3 code returns with int $0x80
    call set_gate
    lidt idtr(%rip)
    # The TSS: RSP0 for CPL 3 -> 0, no I/O bitmap.
    leaq kstack3_top(%rip), %rax
    movq %rax, tss + 4(%rip)
    movw $0x68, tss + 0x66(%rip)
    leaq tss(%rip), %rax
    movq %rax, %rdx
    andq $0xFFFFFF, %rdx
    shlq $16, %rdx
    orq $0x67, %rdx
    movq $0x89, %rcx
    shlq $40, %rcx
    orq %rcx, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    andq $0xFF, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movq %rdx, gdt + TSS_SEL(%rip)
    shrq $32, %rax
    movq %rax, gdt + TSS_SEL + 8(%rip)
    movw $TSS_SEL, %ax
    ltr %ax
    # The LDT: one descriptor at the data offset of the test page.
    movq $0x8000400000 + DATA_OFF, %rax
    movq %rax, %rdx
    andq $0xFFFFFF, %rdx
    shlq $16, %rdx
    orq $0x0F, %rdx
    movq $0x82, %rcx
    shlq $40, %rcx
    orq %rcx, %rdx
    movq %rax, %rcx
    shrq $24, %rcx
    andq $0xFF, %rcx
    shlq $56, %rcx
    orq %rcx, %rdx
    movq %rdx, gdt + LDT_SEL(%rip)
    shrq $32, %rax
    movq %rax, gdt + LDT_SEL + 8(%rip)
    movw $LDT_SEL, %ax
    lldt %ax
    # The test page: int $0x80 at offset 0 (fetches end there).
    movw $0x80CD, TEST_PA
    ret

# edi = vector, rsi = handler, edx = type/attributes
set_gate:
    movl %edi, %eax
    shll $4, %eax
    leaq idt(%rip), %r8
    addq %rax, %r8
    movq %rsi, %rax
    movw %ax, (%r8)
    movw $KCODE, 2(%r8)
    movb $0, 4(%r8)
    movb %dl, 5(%r8)
    shrq $16, %rax
    movw %ax, 6(%r8)
    shrq $16, %rax
    movl %eax, 8(%r8)
    movl $0, 12(%r8)
    ret

# CPUID facts that decide which cases run, printed so both runs can be compared.
cpu_facts:
    movl $7, %eax
    xorl %ecx, %ecx
    cpuid
    movl %ebx, %eax
    shrl $7, %eax
    andl $1, %eax
    movl %eax, has_smep(%rip)
    shrl $20, %ebx
    andl $1, %ebx
    movl %ebx, has_smap(%rip)
    movl $0x80000001, %eax
    cpuid
    shrl $26, %edx
    andl $1, %edx
    movl %edx, has_1g(%rip)
    movl $0x80000008, %eax
    cpuid
    andl $0xFF, %eax
    movl %eax, maxphy(%rip)
    leaq msg_head(%rip), %rsi
    call puts
    movl maxphy(%rip), %eax
    movl $2, %ecx
    call puthex
    leaq msg_smep(%rip), %rsi
    call puts
    movl has_smep(%rip), %eax
    movl $1, %ecx
    call puthex
    leaq msg_smap(%rip), %rsi
    call puts
    movl has_smap(%rip), %eax
    movl $1, %ecx
    call puthex
    leaq msg_1g(%rip), %rsi
    call puts
    movl has_1g(%rip), %eax
    movl $1, %ecx
    call puthex
    call newline
    ret

# ---------------------------------------------------------------- the loop
run_groups:
    leaq groups(%rip), %r14
1:  leaq groups_end(%rip), %rax
    cmpq %rax, %r14
    jae 9f
    movl (%r14), %eax
    movl %eax, g_base(%rip)
    movl 4(%r14), %eax
    movl %eax, g_mask(%rip)
    # count = 1 << popcount(mask)
    xorl %ecx, %ecx
2:  testl %eax, %eax
    jz 3f
    leal -1(%rax), %edx
    andl %edx, %eax
    incl %ecx
    jmp 2b
3:  movl $1, %eax
    shlq %cl, %rax
    movq %rax, g_count(%rip)
    xorl %r15d, %r15d               # n
4:  cmpq g_count(%rip), %r15
    jae 8f
    testl $63, %r15d
    jnz 5f
    call line_start
5:  # word = base | pdep(n, mask)
    movl g_base(%rip), %r12d
    movl g_mask(%rip), %edx
    movl $1, %r8d
6:  testl %edx, %edx
    jz 7f
    movl %edx, %r9d
    negl %r9d
    andl %edx, %r9d                 # lowest bit of the mask
    xorl %r9d, %edx
    testl %r8d, %r15d
    jz 61f
    orl %r9d, %r12d
61: shll $1, %r8d
    jmp 6b
7:  call one_case
    incq %r15
    testl $63, %r15d
    jnz 4b
    call line_end
    jmp 4b
8:  testl $63, %r15d
    jz 81f
    call line_end
81: addq $8, %r14
    incl g_index(%rip)
    jmp 1b
9:  ret

line_start:
    leaq linebuf(%rip), %rdi
    movb $'R', (%rdi)
    movb $' ', 1(%rdi)
    addq $2, %rdi
    movl g_index(%rip), %eax
    movl $2, %ecx
    call hexto
    movb $' ', (%rdi)
    incq %rdi
    movq %r15, %rax
    movl $5, %ecx
    call hexto
    movb $' ', (%rdi)
    incq %rdi
    movq %rdi, linepos(%rip)
    ret

line_end:
    movq linepos(%rip), %rdi
    movb $'\n', (%rdi)
    incq %rdi
    leaq linebuf(%rip), %rsi
    movq %rdi, %rcx
    subq %rsi, %rcx
    movw $COM1, %dx
    rep outsb
    ret

# ------------------------------------------------------------- one case
# Field extractors: r12d = case word.
.macro FLAGS level, dst
    movl %r12d, \dst
    shrl $(8 + 4 * \level), \dst
    andl $15, \dst
.endm

one_case:
    incq case_count(%rip)
    # --- skips
    testl $0x20, %r12d
    jz 1f
    cmpl $0, has_smep(%rip)
    je skip
1:  testl $0xC0, %r12d
    jz 2f
    cmpl $0, has_smap(%rip)
    je skip
2:  testl $0x80000000, %r12d
    jz 21f
    testl $2, %r12d
    jnz skip
21: movl %r12d, %eax
    shrl $24, %eax
    andl $3, %eax
    movl $4, %ebx
    subl %eax, %ebx                 # ebx = levels used
    movl %ebx, used(%rip)
    movl %ebx, %ecx                 # unused levels keep flags 7
3:  cmpl $4, %ecx
    jae 4f
    movl %r12d, %eax
    leal 8(,%rcx,4), %edx
    xchgl %ecx, %edx
    shrl %cl, %eax
    xchgl %ecx, %edx
    andl $15, %eax
    cmpl $7, %eax
    jne skip
    incl %ecx
    jmp 3b
4:  movl %r12d, %eax
    shrl $28, %eax
    andl $3, %eax                   # reserved kind
    jz 5f
    movl %r12d, %edx
    shrl $26, %edx
    andl $3, %edx                   # reserved level
    cmpl used(%rip), %edx
    jae skip
    cmpl $3, %eax
    jne 5f
    # bit 13: only in a large-page leaf (elsewhere it is an address bit)
    movl %r12d, %eax
    shrl $24, %eax
    andl $3, %eax
    cmpl $1, %eax
    jne 41f
    cmpl $2, %edx
    je 5f
    jmp skip
41: cmpl $2, %eax
    jne skip
    cmpl $1, %edx
    jne skip
5:  # --- build the entries: r8..r11 = PML4E, PDPTE, PDE, PTE
    FLAGS 0, %edi
    call eflags
    leaq pdpt_t(%rip), %r8
    orq %rax, %r8
    FLAGS 1, %edi
    call eflags
    leaq pd_t(%rip), %r9
    orq %rax, %r9
    FLAGS 2, %edi
    call eflags
    leaq pt_t(%rip), %r10
    orq %rax, %r10
    FLAGS 3, %edi
    call eflags
    movq $TEST_PA, %r11
    orq %rax, %r11
    movl %r12d, %eax
    shrl $24, %eax
    andl $3, %eax
    cmpl $1, %eax
    jne 51f
    movq $TEST_PA | 0x80, %r10      # 2 MiB page at TEST_PA
    FLAGS 2, %edi
    call eflags
    orq %rax, %r10
    jmp 53f
51: cmpl $2, %eax
    jne 52f
    movq $0x80, %r9                 # 1 GiB page at 0
    FLAGS 1, %edi
    call eflags
    orq %rax, %r9
    jmp 53f
52: cmpl $3, %eax
    jne 53f
    orq $0x80, %r8
53: # reserved bit
    movl %r12d, %eax
    shrl $28, %eax
    andl $3, %eax
    jz 56f
    movl maxphy(%rip), %ecx
    cmpl $2, %eax
    jne 54f
    movl $51, %ecx
54: cmpl $3, %eax
    jne 55f
    movl $13, %ecx
55: movl $1, %eax
    shlq %cl, %rax
    movl %r12d, %edx
    shrl $26, %edx
    andl $3, %edx
    cmpl $0, %edx
    jne 551f
    orq %rax, %r8
551: cmpl $1, %edx
    jne 552f
    orq %rax, %r9
552: cmpl $2, %edx
    jne 553f
    orq %rax, %r10
553: cmpl $3, %edx
    jne 56f
    orq %rax, %r11
56: testl $0x40000000, %r12d
    jz 57f
    orq $0x20, %r8
    orq $0x20, %r9
    orq $0x20, %r10
    orq $0x20, %r11
57: movq %r8, pml4 + 8(%rip)
    movq %r9, pdpt_t(%rip)
    movq %r10, pd_t + 16(%rip)
    movq %r11, pt_t(%rip)
    # --- control registers
    # (each written only when it changes: the writes are slow under bt)
    movq %cr0, %rax
    movq %rax, %rdx
    andl $~0x10000, %eax
    testl $8, %r12d
    jz 1f
    orl $0x10000, %eax
1:  cmpq %rax, %rdx
    je 11f
    movq %rax, %cr0
11: movl $EFER, %ecx
    rdmsr
    movl %eax, %esi
    andl $~0x800, %eax
    testl $16, %r12d
    jz 2f
    orl $0x800, %eax
2:  cmpl %eax, %esi
    je 21f
    wrmsr
21: movq %cr4, %rax
    movq %rax, %rdx
    andl $~0x300000, %eax
    testl $0x20, %r12d
    jz 3f
    orl $0x100000, %eax
3:  testl $0x40, %r12d
    jz 4f
    orl $0x200000, %eax
4:  cmpq %rax, %rdx
    je 41f
    movq %rax, %cr4
41:
    movq %cr3, %rax
    movq %rax, %cr3                 # the TLB forgets the last case
    # --- the access
    movl $0, pf_count(%rip)
    movq $-1, pf_err(%rip)
    movq $0, pf_cr2(%rip)
    movq $0x8000400000, %rbx
    movl %r12d, %edi
    andl $3, %edi
    cmpl $2, %edi
    je 5f
    addq $DATA_OFF, %rbx
5:  movq %rbx, expect_cr2(%rip)
    testl $0x80000000, %r12d
    jz 51f
    orl $4, %edi                    # implicit
    movabsq $0x00CFF3000000FFFF, %rax
    testl $1, %r12d
    jz 50f
    btrq $40, %rax                  # accessed bit clear: the load writes it
50: movq %rax, TEST_PA + DATA_OFF
51: call enter_case
    movw $KDATA, %ax
    movw %ax, %ds
    # --- back at CPL 0: restore a plain state
    pushfq
    andl $~0x40000, (%rsp)
    popfq
    movq %cr4, %rax
    testl $0x300000, %eax
    jz 8f
    andl $~0x300000, %eax
    movq %rax, %cr4
8:  # --- the record
    xorl %r13d, %r13d
    movl pf_count(%rip), %eax
    testl %eax, %eax
    jz 7f
    orl $1, %r13d
    cmpl $1, %eax
    je 6f
    orl $0x40, %r13d
6:  movq pf_err(%rip), %rax
    movl %eax, %edx
    andl $0x1F, %edx
    shll $1, %edx
    orl %edx, %r13d
    testq $~0x1F, %rax
    jz 61f
    orl $0x40, %r13d
61: movq pf_cr2(%rip), %rax
    subq expect_cr2(%rip), %rax
    cmpq $8, %rax
    jb 7f
    orl $0x80, %r13d
7:  movq pml4 + 8(%rip), %rax
    shrl $5, %eax
    andl $3, %eax
    shll $8, %eax
    orl %eax, %r13d
    movq pdpt_t(%rip), %rax
    shrl $5, %eax
    andl $3, %eax
    shll $10, %eax
    orl %eax, %r13d
    movq pd_t + 16(%rip), %rax
    shrl $5, %eax
    andl $3, %eax
    shll $12, %eax
    orl %eax, %r13d
    movq pt_t(%rip), %rax
    shrl $5, %eax
    andl $3, %eax
    shll $14, %eax
    orl %eax, %r13d
    movq linepos(%rip), %rdi
    movl %r13d, %eax
    movl $4, %ecx
    call hexto
    movq %rdi, linepos(%rip)
    ret
skip:
    movq linepos(%rip), %rdi
    movb $'.', (%rdi)
    incq %rdi
    movq %rdi, linepos(%rip)
    ret

# edi = 4 flag bits (P RW US NX) -> rax = entry bits
eflags:
    movl %edi, %eax
    andl $7, %eax
    testl $8, %edi
    jz 1f
    btsq $63, %rax
1:  ret

# rbx = address, edi = access; returns through back_handler.
enter_case:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, saved_ksp(%rip)
    testl $4, %r12d
    jnz 2f
    leaq stub_done(%rip), %rax
    movq %rax, resume_rip(%rip)
    testl $0x80, %r12d
    jz 1f
    pushfq
    orl $0x40000, (%rsp)            # EFLAGS.AC
    popfq
1:  jmp stub
2:  movabsq $0x10000000000, %rcx    # the user alias of this memory
    leaq stub_done(%rip), %rax
    addq %rcx, %rax
    movq %rax, resume_rip(%rip)
    pushq $UDATA
    leaq ustack_top(%rip), %rax
    addq %rcx, %rax
    pushq %rax
    movl $2, %eax
    testl $0x80, %r12d
    jz 3f
    orl $0x40000, %eax
3:  pushq %rax
    pushq $UCODE
    leaq stub(%rip), %rax
    addq %rcx, %rax
    pushq %rax
    iretq

# The access, position independent: run at CPL 0 where linked, at CPL 3
# through the user alias.
stub:
    cmpl $4, %edi
    jae 4f
    cmpl $1, %edi
    je 1f
    cmpl $2, %edi
    je 2f
    cmpl $3, %edi
    je 3f
    movb (%rbx), %al
    jmp stub_done
1:  movb %al, (%rbx)
    jmp stub_done
2:  jmp *%rbx
3:  orb $0, (%rbx)
    jmp stub_done
4:  movl $7, %eax                   # LDT entry 0, RPL 3
    movw %ax, %ds
stub_done:
    int $0x80

back_handler:
    movq saved_ksp(%rip), %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret

pf_handler:
    pushq %rax
    movq 8(%rsp), %rax
    movq %rax, pf_err(%rip)
    movq %cr2, %rax
    movq %rax, pf_cr2(%rip)
    incl pf_count(%rip)
    cmpl $4, pf_count(%rip)
    jae pf_storm
    movq resume_rip(%rip), %rax
    movq %rax, 16(%rsp)
    popq %rax
    addq $8, %rsp
    iretq
pf_storm:
    pushq $14
    jmp exc_other

    .align 16
vec_stubs:
    .set vec, 0
    .rept 32
    .align 16
    pushq $vec
    jmp exc_other
    .set vec, vec + 1
    .endr

exc_other:
    popq %rbx                       # the vector, then (error code,) RIP, CS
    movq %rsp, %rbp
    movq $stack_top, %rsp
    leaq msg_exc(%rip), %rsi
    call puts
    movq %rbx, %rax
    movl $2, %ecx
    call puthex
    xorl %r12d, %r12d
1:  call space
    movq (%rbp,%r12,8), %rax
    movl $16, %ecx
    call puthex
    incl %r12d
    cmpl $3, %r12d
    jb 1b
    call space
    movq case_count(%rip), %rax
    movl $8, %ecx
    call puthex
    call newline
    movl $0x20, %eax
    jmp exit

# ------------------------------------------------------------------ output
# hexto: eax/rax -> ecx hex digits at rdi (advanced)
hexto:
    movl %ecx, %edx
1:  decl %edx
    js 2f
    movq %rax, %r8
    pushq %rcx
    leal (,%rdx,4), %ecx
    shrq %cl, %r8
    popq %rcx
    andl $15, %r8d
    leaq hexdigits(%rip), %r9
    movb (%r9,%r8), %r8b
    movb %r8b, (%rdi)
    incq %rdi
    jmp 1b
2:  ret

puthex:
    leaq numbuf(%rip), %rdi
    call hexto
    leaq numbuf(%rip), %rsi
    movq %rdi, %rcx
    subq %rsi, %rcx
    movw $COM1, %dx
    rep outsb
    ret

puts:
    movw $COM1, %dx
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp 1b
2:  ret

space:
    movw $COM1, %dx
    movb $' ', %al
    outb %al, %dx
    ret

newline:
    movw $COM1, %dx
    movb $'\n', %al
    outb %al, %dx
    ret

    .section .rodata
hexdigits: .ascii "0123456789abcdef"
msg_head: .asciz "H maxphyaddr="
msg_smep: .asciz " smep="
msg_smap: .asciz " smap="
msg_1g:   .asciz " pdpe1gb="
msg_end:  .asciz "E "
msg_exc:  .asciz "X "

    # Data apart from code, and descriptors with their accessed bit set, so
    # that no segment load writes near translated code.
    .data
    .align 4096
gdt:
    .quad 0
    .quad 0x00AF9B000000FFFF        # 0x08 kernel code, 64-bit
    .quad 0x00CF93000000FFFF        # 0x10 kernel data
    .quad 0x00CFF3000000FFFF        # 0x18 user data
    .quad 0x00AFFB000000FFFF        # 0x20 user code, 64-bit
    .quad 0, 0                      # 0x28 TSS
    .quad 0, 0                      # 0x38 LDT
gdt_end:
gdtr:
    .word gdt_end - gdt - 1
    .quad gdt
idtr:
    .word 256 * 16 - 1
    .quad idt
g_index: .long 0
g_base: .long 0
g_mask: .long 0
used: .long 0
has_smep: .long 0
has_smap: .long 0
has_1g: .long 0
maxphy: .long 0
pf_count: .long 0
    .align 8
g_count: .quad 0
case_count: .quad 0
pf_err: .quad 0
pf_cr2: .quad 0
expect_cr2: .quad 0
resume_rip: .quad 0
saved_ksp: .quad 0
linepos: .quad 0
numbuf: .space 32
linebuf: .space 512

    .bss
    .align 4096
pml4: .space 4096
pdpt_id: .space 4096
pd_id: .space 4096
pdpt_u: .space 4096
pd_u: .space 4096
pdpt_t: .space 4096
pd_t: .space 4096
pt_t: .space 4096
idt: .space 4096
tss: .space 4096
    .space 16384
stack_top:
    .space 8192
kstack3_top:
    .space 4096
ustack_top:
    .space 64
