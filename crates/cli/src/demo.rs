//! `stasis demo`: checkpoint and restore a small counter, end to end, and show that it
//! continues where it stopped.
//!
//! The counter is this binary re-executed as the hidden `__demo-counter LOGFILE`: it makes
//! itself a session leader, then appends `tick N` to LOGFILE every 100 ms. It holds no pipe
//! and no terminal (stdin and stdout are /dev/null, stderr is the log), so it is a plain
//! single-process job stasis can dump without `--shell-job`.

use crate::util::{self, Child, TempDir};
use anyhow::{bail, Context, Result};
use stasis_engine::{DumpOptions, RestoreOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct CounterArgs {
    /// File to append the ticks to.
    pub log: PathBuf,
}

/// Progress on stdout; a reader that went away does not stop the demo.
macro_rules! say {
    ($($t:tt)*) => {
        let _ = util::print_out(&format!("{}\n", format_args!($($t)*)));
    };
}

const TICK: Duration = Duration::from_millis(100);
/// The counter stops by itself after this many ticks, so that a demo that dies half-way
/// never leaves it running for long.
const MAX_TICKS: u64 = 3000;
/// Ticks to see before the dump and after the restore.
const WANT_TICKS: usize = 3;
const WAIT_LIMIT: Duration = Duration::from_secs(10);

/// The hidden counter program.
pub fn counter(args: CounterArgs) -> Result<u8> {
    // Whatever stasis inherited beyond stdio (a job server's pipe, a harness's sockets)
    // is not the counter's business and would only make it undumpable.
    stasis_sys::proc::close_range(3, u32::MAX).context("close inherited descriptors")?;
    // Its own session, as a daemon would be: nothing ties it to the demo's terminal.
    stasis_sys::proc::setsid().context("setsid")?;
    let mut log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&args.log)
        .with_context(|| format!("open {}", args.log.display()))?;
    let mut n: u64 = 0;
    loop {
        std::thread::sleep(TICK);
        n += 1;
        // One write per line: the reader never sees half a line as a line.
        log.write_all(format!("tick {n}\n").as_bytes())
            .context("write tick")?;
        if n >= MAX_TICKS || !args.log.exists() {
            return Ok(0);
        }
    }
}

/// The tick numbers in a log, in order; a partial last line is ignored.
pub fn parse_ticks(text: &str) -> Vec<u64> {
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse().ok())
        .collect()
}

/// Whether the ticks after a restore continue the ticks from before the dump.
pub fn continues(before: &[u64], after: &[u64]) -> Result<(), String> {
    let Some(&last) = before.last() else {
        return Err("no tick before the dump".into());
    };
    let Some(&first) = after.first() else {
        return Err("no tick after the restore".into());
    };
    if first <= 1 && last > 1 {
        return Err(format!(
            "it restarted from scratch (tick {first} after tick {last})"
        ));
    }
    for (i, &t) in after.iter().enumerate() {
        let want = last + 1 + i as u64;
        if t != want {
            return Err(format!(
                "expected tick {want} after the restore, found tick {t}"
            ));
        }
    }
    Ok(())
}

fn read_ticks(log: &Path) -> Result<Vec<u64>> {
    match std::fs::read_to_string(log) {
        Ok(s) => Ok(parse_ticks(&s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("read {}", log.display())),
    }
}

/// Polls the log until it holds `count` ticks, failing early if the counter ended.
fn wait_for_ticks(log: &Path, count: usize, child: &mut Child) -> Result<Vec<u64>> {
    let deadline = Instant::now() + WAIT_LIMIT;
    loop {
        let ticks = read_ticks(log)?;
        if ticks.len() >= count {
            return Ok(ticks);
        }
        if let Some(st) = child.try_wait()? {
            bail!(
                "the counter (pid {}) {} after {} ticks",
                child.pid(),
                util::describe_status(st),
                ticks.len()
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the counter wrote {} ticks in {:?}, expected {count}",
                ticks.len(),
                WAIT_LIMIT
            );
        }
        std::thread::sleep(TICK / 4);
    }
}

fn show_ticks(t: &[u64]) -> String {
    t.iter()
        .map(|n| format!("tick {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn run() -> Result<u8> {
    crate::restore::default_sigchld()?;
    let exe = std::env::current_exe().context("find the stasis binary")?;
    let work = TempDir::new_in(&std::env::temp_dir(), "stasis-demo")?;
    let log = work.path().join("counter.log");
    let images = work.path().join("image");
    say!("stasis demo: checkpoint a running counter, restore it, watch it continue");

    let stderr_log = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(&log)
        .with_context(|| format!("create {}", log.display()))?;
    let spawned = Command::new(&exe)
        .arg("__demo-counter")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_log)
        .spawn()
        .with_context(|| format!("start {} __demo-counter", exe.display()))?;
    let mut original = Child::new(stasis_sys::Pid(spawned.id() as i32));
    let pid = original.pid();
    say!(
        "  started the counter: pid {pid}, ticking every 100 ms into {}",
        log.display()
    );

    let ticks = wait_for_ticks(&log, WANT_TICKS, &mut original)?;
    say!("  it is running: {}", show_ticks(&ticks));

    let stats = stasis_engine::dump(&DumpOptions {
        pid: pid.0,
        dir: images.clone(),
        leave_running: false,
        shell_job: false,
    })?;
    let image_file = images.join(stasis_image::IMAGE_FILE);
    say!(
        "  dumped into {}: {}",
        image_file.display(),
        crate::dump::summary(&stats)
    );
    let gone = match original.reap_after_dump()? {
        Some(st) => util::describe_status(st),
        None => "killed and reaped by the dump".into(),
    };
    say!("  the original process is gone ({gone})");
    let before = read_ticks(&log)?;
    let Some(&last) = before.last() else {
        bail!("the log holds no tick")
    };
    say!("  last tick before the dump: tick {last}");

    util::settle_threads();
    let restored = stasis_engine::restore(&RestoreOptions::plain(images.clone()))?;
    let mut again = Child::new(restored.pid);
    say!("  {}", crate::restore::summary(&restored));
    if restored.pid != pid {
        bail!(
            "restored as pid {}, but the counter was pid {pid}",
            restored.pid
        );
    }
    let all = wait_for_ticks(&log, before.len() + WANT_TICKS, &mut again)?;
    let after = &all[before.len()..];
    say!("  ticks after the restore: {}", show_ticks(after));
    let verdict = continues(&before, after);

    let st = again.stop(Duration::from_secs(2))?;
    say!("  stopped pid {pid} ({})", util::describe_status(st));
    let dir = work.path().display().to_string();
    drop(work);
    say!("  removed {dir}");
    match verdict {
        Ok(()) => {
            say!("OK: the counter continued from tick {last} without restarting");
            Ok(0)
        }
        Err(why) => bail!("the restored counter did not continue: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_parsing() {
        assert_eq!(parse_ticks("tick 1\ntick 2\ntick 3"), [1, 2]);
        assert_eq!(parse_ticks("tick 1\nnoise\ntick 2\n"), [1, 2]);
        assert!(parse_ticks("").is_empty());
    }

    #[test]
    fn continuation() {
        assert!(continues(&[1, 2, 3], &[4, 5, 6]).is_ok());
        assert!(continues(&[1, 2, 3], &[1, 2, 3])
            .unwrap_err()
            .contains("from scratch"));
        assert!(continues(&[1, 2, 3], &[5, 6])
            .unwrap_err()
            .contains("expected tick 4"));
        assert!(continues(&[1, 2, 3], &[3, 4]).is_err());
        assert!(continues(&[], &[1]).is_err());
        assert!(continues(&[1], &[]).is_err());
    }
}
