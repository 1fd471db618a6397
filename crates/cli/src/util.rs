//! Small helpers shared by the commands: formatting, files, and child processes.

use anyhow::{Context, Result};
use stasis_sys::ptrace::{waitpid, WaitStatus};
use stasis_sys::Pid;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Joins the lines of a message, so that every error is one line on stderr.
pub fn one_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Writes `text` to stdout. A reader that went away (a closed pipe, as in `| head`) is not
/// an error: the output is simply no longer wanted.
pub fn print_out(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("write to stdout"),
        _ => Ok(()),
    }
}

/// `1536` -> `1.5 KiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A short human duration: `850 µs`, `12.3 ms`, `1.24 s`.
pub fn duration(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s < 1e-3 {
        format!("{:.0} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.1} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// Parses `256M`, `1G`, `4096`, `512K` (binary units) into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_suffix(['b', 'B']).unwrap_or(t);
    let t = t.strip_suffix(['i', 'I']).unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size unit in {s:?} (use K, M, G or T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("not a size: {s:?}"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size out of range: {s:?}"))
}

/// Size as given on the command line, for tables: `256M`, `1G`.
pub fn size_label(n: u64) -> String {
    for (unit, m) in [
        ("T", 1u64 << 40),
        ("G", 1 << 30),
        ("M", 1 << 20),
        ("K", 1 << 10),
    ] {
        if n >= m && n.is_multiple_of(m) {
            return format!("{}{unit}", n / m);
        }
    }
    bytes(n)
}

/// Writes `contents` to `path` through a temporary file and a rename, so that a reader
/// never sees it half-written.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write()
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
        .with_context(|| format!("write {}", path.display()))
}

/// Serializes `value` as pretty JSON into `path` (atomically).
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value).context("encode JSON")?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// How a child ended, as a shell reports it: the exit code, or 128 + the signal number.
pub fn shell_status(st: WaitStatus) -> Option<u8> {
    match st {
        WaitStatus::Exited(_, code) => Some(code as u8),
        WaitStatus::Signaled(_, sig) => Some((128 + sig).min(255) as u8),
        WaitStatus::Stopped(..) | WaitStatus::StillAlive => None,
    }
}

/// How a child ended, in words.
pub fn describe_status(st: WaitStatus) -> String {
    match st {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig) => format!("killed by {}", crate::names::signal(sig)),
        WaitStatus::Stopped(_, sig, _) => format!("stopped by {}", crate::names::signal(sig)),
        WaitStatus::StillAlive => "still running".into(),
    }
}

/// A child process of ours that is killed (SIGKILL) and reaped when dropped, unless it was
/// reaped already. Keeps error paths from leaving processes behind.
pub struct Child {
    pid: Pid,
    reaped: bool,
}

impl Child {
    pub fn new(pid: Pid) -> Child {
        Child { pid, reaped: false }
    }

    pub fn pid(&self) -> Pid {
        self.pid
    }

    /// `waitpid(pid, WNOHANG)`: the status if it has ended (and is now reaped).
    pub fn try_wait(&mut self) -> Result<Option<WaitStatus>> {
        if self.reaped {
            anyhow::bail!("pid {} was already reaped", self.pid);
        }
        let st =
            waitpid(self.pid, libc::WNOHANG).with_context(|| format!("waitpid {}", self.pid))?;
        Ok(match st {
            WaitStatus::Exited(..) | WaitStatus::Signaled(..) => {
                self.reaped = true;
                Some(st)
            }
            _ => None,
        })
    }

    /// Blocks until the child ends; reaps it.
    pub fn wait(&mut self) -> Result<WaitStatus> {
        if self.reaped {
            anyhow::bail!("pid {} was already reaped", self.pid);
        }
        loop {
            let st = waitpid(self.pid, 0).with_context(|| format!("waitpid {}", self.pid))?;
            if matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
                self.reaped = true;
                return Ok(st);
            }
        }
    }

    /// Reaps a child that a dump has just killed. When stasis is both the child's parent
    /// and its tracer, the dump's own wait for the exit may already have reaped it; then
    /// there is nothing left (`None`).
    pub fn reap_after_dump(&mut self) -> Result<Option<WaitStatus>> {
        match waitpid(self.pid, 0) {
            Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) => {
                self.reaped = true;
                Ok(Some(st))
            }
            Ok(_) => self.wait().map(Some),
            Err(e) if e.0 == libc::ECHILD => {
                self.reaped = true;
                Ok(None)
            }
            Err(e) => Err(e).with_context(|| format!("waitpid {}", self.pid)),
        }
    }

    /// SIGTERM, then SIGKILL if it is still there after `grace`; reaps it.
    pub fn stop(&mut self, grace: Duration) -> Result<WaitStatus> {
        let _ = stasis_sys::proc::kill(self.pid, libc::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        while std::time::Instant::now() < deadline {
            if let Some(st) = self.try_wait()? {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill()
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) -> Result<WaitStatus> {
        let _ = stasis_sys::proc::kill(self.pid, libc::SIGKILL);
        self.wait()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if !self.reaped {
            let _ = stasis_sys::proc::kill(self.pid, libc::SIGKILL);
            let _ = waitpid(self.pid, 0);
        }
    }
}

/// Waits (up to a second) until this process has one thread left. A dump may use worker
/// threads; they are joined before it returns, but the kernel can list an exiting thread
/// for a moment longer, and restore refuses to fork from a process with more than one.
pub fn settle_threads() {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    while std::time::Instant::now() < deadline {
        let threads = std::fs::read_dir("/proc/self/task")
            .map(Iterator::count)
            .unwrap_or(1);
        if threads <= 1 {
            return;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A private (0700) directory removed with everything in it when dropped.
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<parent>/<prefix>-<pid>-<n>`.
    pub fn new_in(parent: &Path, prefix: &str) -> Result<TempDir> {
        use std::os::unix::fs::DirBuilderExt;
        let mut last = None;
        for n in 0..100 {
            let path = parent.join(format!("{prefix}-{}-{n}", std::process::id()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
                Err(e) => {
                    return Err(e).with_context(|| format!("create directory {}", path.display()))
                }
            }
        }
        Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
            .with_context(|| format!("create a directory in {}", parent.display()))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// `2026-05-09 07:29:33 UTC` from milliseconds since the epoch.
pub fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil algorithm.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size(" 2k "), Ok(2048));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("0").is_err());
        assert!(parse_size("99999999999T").is_err());
        assert_eq!(size_label(256 << 20), "256M");
        assert_eq!(size_label(1 << 30), "1G");
    }

    #[test]
    fn human_formats() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(300 << 20), "300 MiB");
        assert_eq!(duration(Duration::from_micros(850)), "850 µs");
        assert_eq!(duration(Duration::from_micros(12_345)), "12.3 ms");
        assert_eq!(duration(Duration::from_millis(1240)), "1.24 s");
        assert_eq!(one_line("a\n  b\n\nc"), "a b c");
    }

    #[test]
    fn shell_statuses() {
        assert_eq!(shell_status(WaitStatus::Exited(Pid(1), 3)), Some(3));
        assert_eq!(shell_status(WaitStatus::Signaled(Pid(1), 9)), Some(137));
        assert_eq!(shell_status(WaitStatus::StillAlive), None);
    }

    #[test]
    fn dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_778_311_773_000), "2026-05-09 07:29:33 UTC");
    }

    #[test]
    fn atomic_write_and_tempdir() {
        let d = TempDir::new_in(&std::env::temp_dir(), "stasis-util-test").unwrap();
        let p = d.path().join("pid");
        write_atomic(&p, b"42\n").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "42\n");
        let kept = d.path().to_path_buf();
        drop(d);
        assert!(!kept.exists());
    }
}
