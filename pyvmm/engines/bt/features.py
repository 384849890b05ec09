"""Which instructions each instruction-set CPUID feature promises, so that
what the bt CPUID table advertises can be derived from what the translator
implements (its emitter table) and checked against it.

Features are named as in /proc/cpuinfo (and cpuid.FEATURES).  A feature
counts as implemented when every mnemonic listed for it has an emitter; a
few mnemonics per feature stand for the rest (the differential tests check
the whole family against the CPU).  Features that name no instruction (tsc
deadline, pae, nx, ...) are not listed."""

from __future__ import annotations

import iced_x86 as X

M = X.Mnemonic

_X87 = {M.FLD, M.FSTP, M.FADD, M.FMUL, M.FDIV, M.FSQRT, M.FXCH, M.FILD, M.FISTP, M.FCOMI, M.FLDCW,
        M.FNSTCW, M.FNSTSW, M.FNINIT, M.FRNDINT, M.FSIN, M.FCOS, M.FSINCOS, M.FPTAN, M.FPATAN, M.F2XM1,
        M.FYL2X, M.FYL2XP1, M.FPREM, M.FPREM1, M.FSCALE, M.FXTRACT, M.FNSAVE, M.FRSTOR, M.FLDENV,
        M.FNSTENV}

INSTRUCTIONS: dict[str, frozenset] = {name: frozenset(ms) for name, ms in {
    # leaf 1 EDX
    "fpu": _X87,
    "tsc": {M.RDTSC},
    "msr": {M.RDMSR, M.WRMSR},
    "cx8": {M.CMPXCHG8B},
    "sep": {M.SYSENTER, M.SYSEXIT},
    "cmov": {M.CMOVA, M.CMOVE, M.FCMOVB, M.FCMOVE},
    "clflush": {M.CLFLUSH},
    "mmx": {M.EMMS, M.MOVQ2DQ, M.MOVDQ2Q},
    "fxsr": {M.FXSAVE, M.FXRSTOR, M.FXSAVE64, M.FXRSTOR64},
    "sse": {M.ADDPS, M.MULSS, M.SQRTPS, M.CMPPS, M.SHUFPS, M.MOVAPS, M.UCOMISS, M.LDMXCSR, M.STMXCSR},
    "sse2": {M.ADDPD, M.MULSD, M.PADDQ, M.PMULUDQ, M.PSHUFD, M.MOVDQA, M.CVTTSD2SI, M.PSADBW},
    # leaf 1 ECX
    "pni": {M.ADDSUBPS, M.ADDSUBPD, M.HADDPS, M.HADDPD, M.HSUBPS, M.HSUBPD, M.MOVDDUP, M.MOVSHDUP,
            M.MOVSLDUP, M.LDDQU},
    "ssse3": {M.PSHUFB, M.PALIGNR, M.PHADDW, M.PHADDD, M.PHADDSW, M.PHSUBW, M.PHSUBD, M.PHSUBSW,
              M.PMADDUBSW, M.PMULHRSW, M.PSIGNB, M.PSIGNW, M.PSIGND, M.PABSB, M.PABSW, M.PABSD},
    "sse4_1": {M.PTEST, M.ROUNDPS, M.ROUNDPD, M.ROUNDSS, M.ROUNDSD, M.BLENDPS, M.BLENDPD, M.BLENDVPS,
               M.BLENDVPD, M.PBLENDVB, M.PBLENDW, M.PMULLD, M.PMULDQ, M.PMINUW, M.PMINUD, M.PMAXUW,
               M.PMAXUD, M.PMINSB, M.PMINSD, M.PMAXSB, M.PMAXSD, M.PINSRB, M.PINSRD, M.PINSRQ, M.PEXTRB,
               M.PEXTRD, M.PEXTRQ, M.INSERTPS, M.EXTRACTPS, M.PMOVZXBW, M.PMOVSXBW, M.PMOVZXDQ,
               M.PMOVSXDQ, M.PACKUSDW, M.PCMPEQQ, M.DPPS, M.DPPD, M.MPSADBW, M.PHMINPOSUW, M.MOVNTDQA},
    "sse4_2": {M.CRC32, M.PCMPGTQ, M.PCMPESTRI, M.PCMPESTRM, M.PCMPISTRI, M.PCMPISTRM},
    "cx16": {M.CMPXCHG16B},
    "movbe": {M.MOVBE},
    "popcnt": {M.POPCNT},
    "rdrand": {M.RDRAND},
    "pclmulqdq": {M.PCLMULQDQ},
    "aes": {M.AESENC, M.AESDEC},
    "xsave": {M.XSAVE, M.XRSTOR, M.XGETBV, M.XSETBV},
    "avx": {M.VADDPS, M.VMULPD, M.VMOVAPS, M.VMOVUPD, M.VPXOR, M.VPSHUFB, M.VCMPPS, M.VCVTPS2PD, M.VBLENDVPS,
            M.VBROADCASTSS, M.VBROADCASTF128, M.VINSERTF128, M.VEXTRACTF128, M.VPERM2F128, M.VPERMILPS,
            M.VPERMILPD, M.VMASKMOVPS, M.VTESTPS, M.VZEROUPPER, M.VZEROALL, M.VLDMXCSR, M.VPCMPISTRI},
    "fma": {M.VFMADD132PS, M.VFMADD213PD, M.VFMADD231SD, M.VFMSUB132SS, M.VFNMADD213PS, M.VFNMSUB231PD,
            M.VFMADDSUB132PS, M.VFMSUBADD231PD},
    "f16c": {M.VCVTPH2PS, M.VCVTPS2PH},
    # leaf 7 EBX
    "bmi1": {M.ANDN, M.BEXTR, M.BLSI, M.BLSMSK, M.BLSR, M.TZCNT},
    "avx2": {M.VPERMD, M.VPERMQ, M.VPERMPS, M.VPERMPD, M.VPBROADCASTB, M.VPBROADCASTQ, M.VPERM2I128,
             M.VINSERTI128, M.VEXTRACTI128, M.VPSLLVD, M.VPSRLVQ, M.VPSRAVD, M.VPMASKMOVD, M.VPBLENDD,
             M.VGATHERDPS, M.VGATHERQPD, M.VPGATHERDD, M.VPGATHERQQ, M.VMOVNTDQA},
    "bmi2": {M.BZHI, M.MULX, M.PDEP, M.PEXT, M.RORX, M.SARX, M.SHLX, M.SHRX},
    "adx": {M.ADCX, M.ADOX},
    "rdseed": {M.RDSEED},
    # leaf 0x80000001
    "syscall": {M.SYSCALL, M.SYSRETQ},
    "rdtscp": {M.RDTSCP},
    "lahf_lm": {M.LAHF, M.SAHF},
    "abm": {M.LZCNT},
}.items()}


def implemented(emitters) -> set[str]:
    """The features whose every listed instruction has an emitter."""
    return {name for name, ms in INSTRUCTIONS.items() if ms <= emitters.keys()}
