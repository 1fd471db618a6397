//! eventfd descriptors: a 64-bit counter and the semaphore mode. Dump reads both from
//! fdinfo ("eventfd-count:", hexadecimal; "eventfd-semaphore:", absent on kernels before
//! 6.1, where it cannot be told and is refused if the flags cannot say it either).
//! Restore creates a new eventfd in the restorer and writes the counter into it.

use crate::error::{Error, Result};
use stasis_image::FdKind;
use stasis_sys::Pid;
use std::os::fd::OwnedFd;

/// (counter, semaphore mode) from an eventfd's fdinfo.
pub fn parse(text: &str) -> std::result::Result<(u64, bool), String> {
    let v = crate::procfs::fdinfo_field(text, "eventfd-count").ok_or("no eventfd-count line")?;
    let count = u64::from_str_radix(v, 16).map_err(|_| format!("bad eventfd-count {v:?}"))?;
    let sem = crate::procfs::fdinfo_field(text, "eventfd-semaphore").ok_or("no eventfd-semaphore line")?;
    let semaphore = match sem {
        "0" => false,
        "1" => true,
        _ => return Err(format!("bad eventfd-semaphore {sem:?}")),
    };
    Ok((count, semaphore))
}

pub fn dump(pid: Pid, path: &str, text: &str, flags: i32) -> Result<FdKind> {
    let (count, semaphore) = parse(text).map_err(|what| Error::ProcParse { pid, path: path.into(), what })?;
    Ok(FdKind::Eventfd { count, semaphore, flags })
}

/// A new eventfd holding `count`.
pub fn create(pid: Pid, fd: i32, count: u64, semaphore: bool, flags: i32) -> Result<OwnedFd> {
    let fl = libc::EFD_CLOEXEC | (flags & libc::O_NONBLOCK) | if semaphore { libc::EFD_SEMAPHORE } else { 0 };
    stasis_sys::events::eventfd(count, fl)
        .map_err(|e| Error::Restore { pid, what: format!("fd {fd}: eventfd (count {count}): {e}") })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_is_hexadecimal_and_padded() {
        let text = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t1038\neventfd-count:            1e240\neventfd-id: 1\neventfd-semaphore: 1\n";
        assert_eq!(parse(text), Ok((123456, true)));
        let text = "eventfd-count:                f\neventfd-id: 2\neventfd-semaphore: 0\n";
        assert_eq!(parse(text), Ok((15, false)));
        assert!(parse("eventfd-count: f\n").is_err());
    }
}
