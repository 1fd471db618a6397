//! timerfd descriptors: clock, flags, next expiry, period and the expirations not read yet.
//!
//! Dump reads them from fdinfo, through the dumper's own duplicate of the description.
//! A periodic timer that expired is not moved on to its next expiry until someone reads
//! it or asks for its time (fdinfo then shows no time left and one expiration, however
//! many periods passed), so dump first calls timerfd_gettime, which moves it on and counts
//! the missed periods without consuming them, and reads fdinfo after that.
//!
//! A relative timer gets back the time it had left at dump (the time the tree spent
//! checkpointed does not count, as for a stopped process); a timer armed with
//! TFD_TIMER_ABSTIME is saved with its expiry on its clock and armed for that same time.
//! Restore creates the timer in the restorer, arms it, then sets the expirations not read
//! yet (TFD_IOC_SET_TICKS), adding any that happened since it was armed.

use crate::error::{Error, Result};
use stasis_image::{FdKind, TimerfdRecord};
use stasis_sys::events as ev;
use stasis_sys::Pid;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

const TFD_TIMER_ABSTIME: i32 = 1;

/// The fields of a timerfd's fdinfo: clock, ticks, settime flags, time left, interval.
#[derive(Debug, PartialEq, Eq)]
pub struct Info {
    pub clockid: i32,
    pub ticks: u64,
    pub settime_flags: i32,
    pub value_ns: u64,
    pub interval_ns: u64,
}

/// "(SECONDS, NANOSECONDS)" in nanoseconds.
fn parse_pair(v: &str) -> Option<u64> {
    let (s, ns) = v.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    s.trim().parse::<u64>().ok()?.checked_mul(1_000_000_000)?.checked_add(ns.trim().parse::<u64>().ok()?)
}

pub fn parse(text: &str) -> std::result::Result<Info, String> {
    let field = |k: &str| crate::procfs::fdinfo_field(text, k).ok_or(format!("no {k} line"));
    let bad = |k: &str, v: &str| format!("bad {k} {v:?}");
    let clockid = field("clockid")?;
    let ticks = field("ticks")?;
    let flags = field("settime flags")?;
    let value = field("it_value")?;
    let interval = field("it_interval")?;
    Ok(Info {
        clockid: clockid.parse().map_err(|_| bad("clockid", clockid))?,
        ticks: ticks.parse().map_err(|_| bad("ticks", ticks))?,
        settime_flags: i32::from_str_radix(flags, 8).map_err(|_| bad("settime flags", flags))?,
        value_ns: parse_pair(value).ok_or_else(|| bad("it_value", value))?,
        interval_ns: parse_pair(interval).ok_or_else(|| bad("it_interval", interval))?,
    })
}

/// `own` is our duplicate of descriptor `fd` of `pid`.
pub fn dump(pid: Pid, fd: i32, own: &OwnedFd, flags: i32) -> Result<FdKind> {
    let mut info = None;
    // A period shorter than the time between the two reads expires again in between;
    // a few tries settle any sane timer.
    for _ in 0..100 {
        ev::timerfd_gettime(own.as_raw_fd()).map_err(Error::sys(pid, "timerfd_gettime"))?;
        let (path, text) = crate::procfs::read_text(pid, &format!("fdinfo/{fd}"))?;
        let i = parse(&text).map_err(|what| Error::ProcParse { pid, path, what })?;
        let settled = !(i.interval_ns != 0 && i.value_ns == 0);
        info = Some(i);
        if settled {
            break;
        }
    }
    let Some(mut i) = info else { unreachable!("the loop runs at least once") };
    if i.interval_ns != 0 && i.value_ns == 0 {
        // Due right now: armed to expire at once on restore.
        i.value_ns = 1;
    }
    if i.settime_flags & TFD_TIMER_ABSTIME != 0 && i.value_ns != 0 {
        let now = ev::clock_ns(i.clockid).map_err(Error::sys(pid, "clock_gettime"))?;
        i.value_ns += now;
    }
    Ok(FdKind::Timerfd(TimerfdRecord {
        clockid: i.clockid,
        flags,
        settime_flags: i.settime_flags,
        value_ns: i.value_ns,
        interval_ns: i.interval_ns,
        ticks: i.ticks,
    }))
}

/// A new timerfd as saved: armed, with its unread expirations.
pub fn create(pid: Pid, fd: i32, t: &TimerfdRecord) -> Result<OwnedFd> {
    let fail = |op: &str, e: stasis_sys::Errno| Error::Restore { pid, what: format!("fd {fd}: timerfd (clock {}): {op}: {e}", t.clockid) };
    let timer = ev::timerfd_create(t.clockid, libc::TFD_CLOEXEC | libc::TFD_NONBLOCK).map_err(|e| match e.0 {
        libc::EPERM => Error::Restore { pid, what: format!("fd {fd}: a timerfd on alarm clock {} needs CAP_WAKE_ALARM", t.clockid) },
        _ => fail("timerfd_create", e),
    })?;
    let raw = timer.as_raw_fd();
    if t.value_ns != 0 {
        ev::timerfd_settime(raw, t.settime_flags, t.value_ns, t.interval_ns).map_err(|e| fail("timerfd_settime", e))?;
    }
    // An absolute expiry may have passed already: those expirations count too.
    let since = read_ticks(raw).map_err(|e| fail("read", e))?;
    let ticks = t.ticks.saturating_add(since);
    if ticks != 0 {
        ev::timerfd_set_ticks(raw, ticks).map_err(|e| fail("TFD_IOC_SET_TICKS", e))?;
    }
    crate::files::set_flags(pid, &timer, t.flags)?;
    Ok(timer)
}

/// Expirations of a non-blocking timerfd, read (0 if none).
fn read_ticks(fd: RawFd) -> stasis_sys::SysResult<u64> {
    let mut b = [0u8; 8];
    match stasis_sys::proc::read_raw(fd, &mut b) {
        Ok(8) => Ok(u64::from_ne_bytes(b)),
        Ok(_) => Err(stasis_sys::Errno(libc::EIO)),
        Err(e) if e.0 == libc::EAGAIN => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_of_a_timer() {
        let text = "pos:\t0\nflags:\t02\nmnt_id:\t17\nino:\t1038\nclockid: 0\nticks: 2\nsettime flags: 03\nit_value: (999, 63284698)\nit_interval: (1, 500)\n";
        assert_eq!(
            parse(text),
            Ok(Info { clockid: 0, ticks: 2, settime_flags: 3, value_ns: 999_063_284_698, interval_ns: 1_000_000_500 })
        );
        assert!(parse("clockid: 0\nticks: 0\nsettime flags: 00\nit_value: 5\nit_interval: (0, 0)\n").is_err());
    }
}
