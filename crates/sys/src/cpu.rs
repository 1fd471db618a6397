//! CPU facts that decide whether register state can move between machines.

/// `cpuid` with a leaf and sub-leaf: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32, subleaf: u32) -> (u32, u32, u32, u32) {
    #[allow(unused_unsafe)]
    // SAFETY: cpuid is available on every x86-64 CPU and has no memory effects.
    let r = unsafe { std::arch::x86_64::__cpuid_count(leaf, subleaf) };
    (r.eax, r.ebx, r.ecx, r.edx)
}

/// XCR0: the XSAVE feature components the OS enabled (`xgetbv(0)`).
pub fn xcr0() -> u64 {
    let (_, _, ecx, _) = cpuid(1, 0);
    if ecx & (1 << 27) == 0 {
        return 0; // OSXSAVE off: no XSAVE state at all.
    }
    let lo: u32;
    let hi: u32;
    // SAFETY: OSXSAVE is set (checked above), so xgetbv with ecx=0 is a valid instruction;
    // it only writes the two output registers.
    unsafe {
        std::arch::asm!("xgetbv", in("ecx") 0u32, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    ((hi as u64) << 32) | lo as u64
}

/// The size of the user XSAVE area the kernel exposes through `NT_X86_XSTATE`: the
/// standard-format size covering every supported component (CPUID 0xD.0 ECX), which is
/// what the kernel sizes its user buffer with once dynamic features such as AMX exist.
/// Asked once per process: it cannot change, and in a virtual machine every cpuid traps
/// to the hypervisor (a dump reads the XSAVE area of every thread).
pub fn xsave_size() -> usize {
    static SIZE: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        let (_, ebx, ecx, _) = cpuid(0xd, 0);
        ecx.max(ebx) as usize
    })
}

/// The CPU's brand string, for messages only.
pub fn model_name() -> String {
    let mut bytes = Vec::new();
    for leaf in 0x8000_0002u32..=0x8000_0004 {
        let (a, b, c, d) = cpuid(leaf, 0);
        for r in [a, b, c, d] {
            bytes.extend_from_slice(&r.to_le_bytes());
        }
    }
    String::from_utf8_lossy(&bytes).trim_matches(char::from(0)).trim().to_string()
}
