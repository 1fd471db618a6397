//! signalfd descriptors. The set of signals is all the state a signalfd has: it reads the
//! signals pending for whichever process reads it, and those are saved with the process
//! (see signals.rs). Dump reads the set from fdinfo ("sigmask:"); restore creates a new
//! signalfd with it in the restorer, which every restored process inherits like any other
//! description.

use crate::error::{Error, Result};
use stasis_image::FdKind;
use stasis_sys::Pid;
use std::os::fd::OwnedFd;

/// The "sigmask:" line of a signalfd's fdinfo (hexadecimal, bit N-1 for signal N).
pub fn parse(text: &str) -> std::result::Result<u64, String> {
    let v = crate::procfs::fdinfo_field(text, "sigmask").ok_or("no sigmask line")?;
    u64::from_str_radix(v, 16).map_err(|_| format!("bad sigmask {v:?}"))
}

pub fn dump(pid: Pid, path: &str, text: &str, flags: i32) -> Result<FdKind> {
    let mask = parse(text).map_err(|what| Error::ProcParse { pid, path: path.into(), what })?;
    Ok(FdKind::Signalfd { mask, flags })
}

/// A new signalfd for `mask`, close-on-exec in the restorer (the restore child sets the
/// saved close-on-exec flag where it places it).
pub fn create(pid: Pid, fd: i32, mask: u64, flags: i32) -> Result<OwnedFd> {
    let fl = libc::SFD_CLOEXEC | (flags & libc::O_NONBLOCK);
    stasis_sys::events::signalfd(mask, fl)
        .map_err(|e| Error::Restore { pid, what: format!("fd {fd}: signalfd (mask {mask:#x}): {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sigmask_is_hexadecimal() {
        let text = "pos:\t0\nflags:\t02004002\nmnt_id:\t17\nino:\t1038\nsigmask:\t0000000800000200\n";
        assert_eq!(parse(text), Ok((1 << 9) | (1 << 35)));
        assert!(parse("pos:\t0\n").is_err());
    }
}
