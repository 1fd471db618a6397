//! BPF iterators: a small program, written here instruction by instruction, that the
//! kernel runs once per task (or per mapping) of the whole system, and whose output
//! (`bpf_seq_write`) is read like a file. See Documentation/bpf/bpf_iterators.rst and
//! include/uapi/linux/bpf.h; the instruction set is Documentation/bpf/standardization.
//!
//! Loading needs CAP_BPF and CAP_PERFMON (or CAP_SYS_ADMIN) and a kernel with BTF; every
//! failure comes back as an error for the caller to fall back on another way.

use crate::Errno;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_PROG_LOAD: i32 = 5;
const BPF_LINK_CREATE: i32 = 28;
const BPF_ITER_CREATE: i32 = 33;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_ITER: u32 = 28;

pub const FUNC_PROBE_READ_KERNEL: i32 = 113;
pub const FUNC_SEQ_WRITE: i32 = 127;

/// One instruction: opcode, registers (dst low nibble, src high), offset, immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    pub code: u8,
    pub regs: u8,
    pub off: i16,
    pub imm: i32,
}

/// Registers: R0 result, R1-R5 arguments, R6-R9 kept across calls, R10 frame pointer.
pub type Reg = u8;
pub const R0: Reg = 0;
pub const R1: Reg = 1;
pub const R2: Reg = 2;
pub const R3: Reg = 3;
pub const R6: Reg = 6;
pub const R7: Reg = 7;
pub const R8: Reg = 8;
pub const R9: Reg = 9;
pub const R10: Reg = 10;

/// A load or store size in bytes → its opcode bits.
fn size_bits(bytes: u32) -> u8 {
    match bytes {
        1 => 0x10,
        2 => 0x08,
        4 => 0x00,
        _ => 0x18,
    }
}

fn insn(code: u8, dst: Reg, src: Reg, off: i16, imm: i32) -> Insn {
    Insn { code, regs: dst | (src << 4), off, imm }
}

/// `dst = *(size *)(src + off)`, `size` in bytes (1, 2, 4, 8).
pub fn ldx(size: u32, dst: Reg, src: Reg, off: i16) -> Insn {
    insn(0x61 | size_bits(size), dst, src, off, 0)
}

/// `*(size *)(dst + off) = src`.
pub fn stx(size: u32, dst: Reg, off: i16, src: Reg) -> Insn {
    insn(0x63 | size_bits(size), dst, src, off, 0)
}

/// `*(size *)(dst + off) = imm`.
pub fn st(size: u32, dst: Reg, off: i16, imm: i32) -> Insn {
    insn(0x62 | size_bits(size), dst, 0, off, imm)
}

/// `dst = imm` (64-bit, sign-extended).
pub fn mov_imm(dst: Reg, imm: i32) -> Insn {
    insn(0xb7, dst, 0, 0, imm)
}

/// `dst = src`.
pub fn mov(dst: Reg, src: Reg) -> Insn {
    insn(0xbf, dst, src, 0, 0)
}

/// `dst += imm`.
pub fn add_imm(dst: Reg, imm: i32) -> Insn {
    insn(0x07, dst, 0, 0, imm)
}

/// `if dst == imm goto +off`.
pub fn jeq_imm(dst: Reg, imm: i32, off: i16) -> Insn {
    insn(0x15, dst, 0, off, imm)
}

/// `if dst != imm goto +off`.
pub fn jne_imm(dst: Reg, imm: i32, off: i16) -> Insn {
    insn(0x55, dst, 0, off, imm)
}

/// `if (u32)dst != (u32)src goto +off`.
pub fn jne32(dst: Reg, src: Reg, off: i16) -> Insn {
    insn(0x5e, dst, src, off, 0)
}

/// `goto +off`.
pub fn ja(off: i16) -> Insn {
    insn(0x05, 0, 0, off, 0)
}

/// Call helper `func`: arguments in R1-R5, result in R0; R1-R5 are lost.
pub fn call(func: i32) -> Insn {
    insn(0x85, 0, 0, 0, func)
}

pub fn exit() -> Insn {
    insn(0x95, 0, 0, 0, 0)
}

/// A verifier's refusal, with the end of its log.
#[derive(Debug)]
pub struct LoadError {
    pub errno: Errno,
    pub log: String,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.errno)?;
        if !self.log.is_empty() {
            write!(f, " (verifier: {})", self.log)?;
        }
        Ok(())
    }
}

fn bpf(cmd: i32, attr: &mut [u8; 144]) -> Result<OwnedFd, Errno> {
    // SAFETY: attr is a bpf_attr-sized buffer that outlives the call; the kernel reads
    // and writes only within the size given.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len()) };
    if r < 0 {
        return Err(Errno::last());
    }
    // SAFETY: on success these commands return a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

fn put32(a: &mut [u8], at: usize, v: u32) {
    a[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

fn put64(a: &mut [u8], at: usize, v: u64) {
    a[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// Loads `prog` as an iterator program for the kernel function with BTF ID
/// `iter_func` (`bpf_iter_task`, `bpf_iter_task_vma`, ...). On a refusal the verifier's
/// log is asked for and returned.
pub fn load_iter(name: &str, prog: &[Insn], iter_func: u32) -> Result<OwnedFd, LoadError> {
    let license = b"GPL\0";
    let attempt = |log: &mut [u8]| {
        let mut a = [0u8; 144];
        put32(&mut a, 0, BPF_PROG_TYPE_TRACING);
        put32(&mut a, 4, prog.len() as u32);
        put64(&mut a, 8, prog.as_ptr() as u64);
        put64(&mut a, 16, license.as_ptr() as u64);
        if !log.is_empty() {
            put32(&mut a, 24, 1);
            put32(&mut a, 28, log.len() as u32);
            put64(&mut a, 32, log.as_mut_ptr() as u64);
        }
        let n = name.len().min(15);
        a[48..48 + n].copy_from_slice(&name.as_bytes()[..n]);
        put32(&mut a, 68, BPF_TRACE_ITER);
        put32(&mut a, 108, iter_func);
        bpf(BPF_PROG_LOAD, &mut a)
    };
    attempt(&mut []).or_else(|_| {
        let mut log = vec![0u8; 64 * 1024];
        let again = attempt(&mut log);
        let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
        let tail: String = text.lines().rev().take(6).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("; ");
        again.map_err(|e| LoadError { errno: e, log: tail })
    })
}

/// Runs an iterator program over everything it iterates and returns what it wrote.
pub fn run_iter(prog: &OwnedFd) -> Result<Vec<u8>, Errno> {
    let mut a = [0u8; 144];
    put32(&mut a, 0, prog.as_raw_fd() as u32);
    put32(&mut a, 8, BPF_TRACE_ITER);
    let link = bpf(BPF_LINK_CREATE, &mut a)?;
    let mut a = [0u8; 144];
    put32(&mut a, 0, link.as_raw_fd() as u32);
    let iter = bpf(BPF_ITER_CREATE, &mut a)?;
    let mut out = Vec::with_capacity(256 * 1024);
    loop {
        if out.capacity() - out.len() < 64 * 1024 {
            out.reserve(out.capacity());
        }
        let spare = out.spare_capacity_mut();
        // SAFETY: reads into the vector's spare capacity, whose length is passed; only
        // the bytes the kernel reports written are then counted as initialised.
        let n = unsafe { libc::read(iter.as_raw_fd(), spare.as_mut_ptr().cast(), spare.len()) };
        match n {
            0 => return Ok(out),
            n if n > 0 => {
                // SAFETY: see above.
                unsafe { out.set_len(out.len() + n as usize) };
            }
            _ => match Errno::last() {
                e if e.0 == libc::EINTR || e.0 == libc::EAGAIN => continue,
                e => return Err(e),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_as_the_kernel_documents() {
        // r1 = *(u64 *)(r1 + 0): 0x79, dst 1, src 1.
        assert_eq!(ldx(8, R1, R1, 0), Insn { code: 0x79, regs: 0x11, off: 0, imm: 0 });
        assert_eq!(ldx(4, R2, R6, 8).code, 0x61);
        assert_eq!(stx(8, R10, -8, R7), Insn { code: 0x7b, regs: 0x7a, off: -8, imm: 0 });
        assert_eq!(st(4, R10, -4, 5).code, 0x62);
        assert_eq!(mov_imm(R0, 0), Insn { code: 0xb7, regs: 0, off: 0, imm: 0 });
        assert_eq!(call(FUNC_SEQ_WRITE), Insn { code: 0x85, regs: 0, off: 0, imm: 127 });
        assert_eq!(exit().code, 0x95);
        assert_eq!(std::mem::size_of::<Insn>(), 8);
    }
}

/// A program under construction, with forward jumps to labels.
#[derive(Default)]
pub struct Asm {
    pub insns: Vec<Insn>,
    /// Per label: where it is, once placed.
    labels: Vec<Option<usize>>,
    /// Jumps to fix: (instruction index, label).
    jumps: Vec<(usize, usize)>,
}

impl Asm {
    pub fn push(&mut self, i: Insn) -> &mut Asm {
        self.insns.push(i);
        self
    }

    pub fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    pub fn place(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }

    /// A jump instruction (its offset is filled in by [`Asm::finish`]) to `label`.
    pub fn jump(&mut self, i: Insn, label: usize) -> &mut Asm {
        self.jumps.push((self.insns.len(), label));
        self.push(i)
    }

    /// The instructions, every jump resolved. Panics on a label never placed: a bug in
    /// the program's author, not an input error.
    pub fn finish(mut self) -> Vec<Insn> {
        for &(at, label) in &self.jumps {
            let to = self.labels[label].expect("every label is placed");
            self.insns[at].off = (to as i64 - at as i64 - 1) as i16;
        }
        self.insns
    }
}
