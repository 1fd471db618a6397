//! `stasis restore`: bring a process back from an image, then (unless detached) wait for
//! it like a shell waits for a job, passing on the signals a user sends to stasis.
//!
//! Waiting uses no thread and no timer: SIGCHLD and the forwarded signals are blocked, and
//! the loop alternates `waitpid(WNOHANG)` with `rt_sigtimedwait`. Because the signals are
//! blocked before the first `waitpid`, a child that ends after that check leaves SIGCHLD
//! pending, and the wait returns at once.

use crate::util;
use anyhow::{Context, Result};
use serde::Serialize;
use stasis_engine::{RestoreOptions, Restored};
use stasis_sys::ptrace::{waitpid, WaitStatus};
use stasis_sys::Pid;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Directory holding the image.
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub dir: PathBuf,
    /// Exit as soon as the process runs, instead of waiting for it.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Write the restored PID (decimal and a newline) to this file once it runs.
    #[arg(long, value_name = "FILE")]
    pub pidfile: Option<PathBuf>,
    /// Attach the restored process to this terminal and session (for images dumped with
    /// --shell-job).
    #[arg(long)]
    pub shell_job: bool,
    /// Write the restore's figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// fd[N]:KEY — connect what the image calls KEY (e.g. pipe:[1234], a pipe that led
    /// outside the dumped tree) to descriptor N of stasis. Repeatable.
    #[arg(long = "inherit-fd", value_name = "fd[N]:KEY", value_parser = parse_inherit_fd)]
    pub inherit_fd: Vec<(i32, String)>,
    /// Restore into a fresh PID namespace: the saved PIDs are kept inside it and never
    /// collide, so one image can run several times side by side. The root's parent is a
    /// small init (stasis-init, PID 1 inside); the tree gets a private mount namespace
    /// with the namespace's own /proc. Needed for images of trees that had a PID
    /// namespace of their own.
    #[arg(long)]
    pub pidns: bool,
}

/// Parses CRIU's `fd[N]:KEY` spelling.
fn parse_inherit_fd(s: &str) -> std::result::Result<(i32, String), String> {
    let bad = || format!("expected fd[N]:KEY, such as fd[3]:pipe:[1234], not {s:?}");
    let rest = s.strip_prefix("fd[").ok_or_else(bad)?;
    let (n, key) = rest.split_once("]:").ok_or_else(bad)?;
    let n: i32 = n.parse().map_err(|_| bad())?;
    if key.is_empty() {
        return Err(bad());
    }
    Ok((n, key.to_string()))
}

#[cfg(test)]
mod inherit_fd_tests {
    #[test]
    fn parses_criu_spelling() {
        assert_eq!(super::parse_inherit_fd("fd[3]:pipe:[1234]"), Ok((3, "pipe:[1234]".to_string())));
        assert!(super::parse_inherit_fd("3:pipe:[1]").is_err());
        assert!(super::parse_inherit_fd("fd[x]:pipe:[1]").is_err());
        assert!(super::parse_inherit_fd("fd[3]:").is_err());
    }
}

/// Signals sent to stasis that are passed on to the restored process while stasis waits.
pub const FORWARDED: [i32; 4] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT];

/// [`stasis_engine::RestoreStats`] with durations in seconds, for `--stats-json`.
#[derive(Serialize, Debug)]
pub struct RestoreStatsJson {
    pub pid: i32,
    /// With --pidns: the root's PID inside its namespace.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid_in_ns: Option<i32>,
    pub total: f64,
    pub validate: f64,
    pub memory_bytes: u64,
    /// Seconds of each step.
    pub phases: std::collections::BTreeMap<&'static str, f64>,
}

impl RestoreStatsJson {
    pub fn new(r: &Restored) -> RestoreStatsJson {
        RestoreStatsJson {
            pid: r.pid.0,
            pid_in_ns: r.pid_in_ns.map(|p| p.0),
            total: r.stats.total.as_secs_f64(),
            validate: r.stats.validate.as_secs_f64(),
            memory_bytes: r.stats.memory_bytes,
            phases: r.stats.phases.iter().map(|(k, d)| (*k, d.as_secs_f64())).collect(),
        }
    }
}

/// One line about a finished restore.
pub fn summary(r: &Restored) -> String {
    let ns = match r.pid_in_ns {
        Some(inner) => format!(" (pid {inner} in its own PID namespace, whose init is pid {})", r.child),
        None => String::new(),
    };
    format!(
        "restored pid {}{ns} in {} (image checked in {}, {} of memory)",
        r.pid,
        util::duration(r.stats.total),
        util::duration(r.stats.validate),
        util::bytes(r.stats.memory_bytes),
    )
}

/// Makes sure SIGCHLD is not ignored: a stasis started with SIGCHLD set to SIG_IGN (which
/// survives exec) would have its children reaped by the kernel, and waitpid would fail.
pub fn default_sigchld() -> Result<()> {
    let dfl = stasis_sys::proc::KernelSigaction::default();
    stasis_sys::proc::set_sigaction(libc::SIGCHLD, &dfl).context("reset SIGCHLD to default")
}

pub fn run(args: RestoreArgs, verbose: bool) -> Result<u8> {
    default_sigchld()?;
    let opts = RestoreOptions {
        dir: args.dir.clone(),
        shell_job: args.shell_job,
        inherit_fds: args.inherit_fd.clone(),
        pidns: args.pidns,
    };
    log::info!("restoring from {}", opts.dir.display());
    let restored = stasis_engine::restore(&opts)?;
    let pid = restored.pid;
    let child = restored.child;
    // Blocked from here on, so nothing sent to stasis from now is lost or kills it while
    // the restored process runs on without its waiter.
    if !args.detach {
        let mut blocked = FORWARDED.to_vec();
        blocked.push(libc::SIGCHLD);
        stasis_sys::probe::block_signals(&blocked).context("block signals")?;
    }
    if verbose {
        eprintln!("stasis: {}", summary(&restored));
    }
    // The process runs from here on whatever else fails: errors must name it.
    let running = || format!("restored pid {pid} is running, but");
    if let Some(path) = &args.pidfile {
        util::write_atomic(path, format!("{pid}\n").as_bytes()).with_context(running)?;
    }
    if let Some(path) = &args.stats_json {
        util::write_json(path, &RestoreStatsJson::new(&restored)).with_context(running)?;
    }
    if args.detach {
        return Ok(0);
    }
    let st = wait_forwarding(child, pid)?;
    log::info!("pid {pid} {}", util::describe_status(st));
    Ok(util::shell_status(st).unwrap_or(1))
}

/// Waits for `child` (the root, or the init of its PID namespace) to end, forwarding
/// [`FORWARDED`] signals to the root `pid`. The caller has blocked those signals and
/// SIGCHLD.
fn wait_forwarding(child: Pid, pid: Pid) -> Result<WaitStatus> {
    let mut wanted = FORWARDED.to_vec();
    wanted.push(libc::SIGCHLD);
    loop {
        let st = waitpid(child, libc::WNOHANG).with_context(|| format!("waitpid {child}"))?;
        if matches!(st, WaitStatus::Exited(..) | WaitStatus::Signaled(..)) {
            return Ok(st);
        }
        let sig = stasis_sys::probe::wait_signal(&wanted).context("wait for signals")?;
        if sig != libc::SIGCHLD {
            log::info!("forwarding {} to pid {pid}", crate::names::signal(sig));
            match stasis_sys::proc::kill(pid, sig) {
                Ok(()) => {}
                // Gone already: the next waitpid reports it.
                Err(e) if e.0 == libc::ESRCH => {}
                Err(e) => return Err(e).with_context(|| format!("kill {pid}")),
            }
        }
    }
}
