//! `stasis dump`: checkpoint a process into an image directory.

use crate::util;
use anyhow::Result;
use serde::Serialize;
use stasis_engine::{DumpOptions, DumpStats};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    /// PID of the process to checkpoint.
    #[arg(short = 't', long = "tree", value_name = "PID")]
    pub pid: i32,
    /// Directory to write the image into (created 0700 if missing).
    #[arg(short = 'D', long = "images-dir", value_name = "DIR")]
    pub dir: PathBuf,
    /// Let the process run on after the dump (by default it is killed).
    #[arg(long)]
    pub leave_running: bool,
    /// The process runs on a terminal or in a session outside the dumped tree (as started
    /// from a shell); restore it with `restore --shell-job`.
    #[arg(long)]
    pub shell_job: bool,
    /// Write the dump's figures as JSON to this file.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
}

/// [`DumpStats`] with durations in seconds, for `--stats-json`.
#[derive(Serialize, Debug, PartialEq)]
pub struct DumpStatsJson {
    pub pid: i32,
    /// Seconds from the start of the dump until the image was complete.
    pub total: f64,
    /// Seconds the process was frozen.
    pub frozen: f64,
    pub image_bytes: u64,
    pub memory_bytes: u64,
    pub processes: usize,
    pub threads: usize,
    /// Seconds of each step.
    pub phases: std::collections::BTreeMap<&'static str, f64>,
}

impl DumpStatsJson {
    pub fn new(pid: i32, s: &DumpStats) -> DumpStatsJson {
        DumpStatsJson {
            pid,
            total: s.total.as_secs_f64(),
            frozen: s.frozen.as_secs_f64(),
            image_bytes: s.image_bytes,
            memory_bytes: s.memory_bytes,
            processes: s.processes,
            threads: s.threads,
            phases: s.phases.iter().map(|(k, d)| (*k, d.as_secs_f64())).collect(),
        }
    }
}

/// One line about a finished dump.
pub fn summary(s: &DumpStats) -> String {
    format!(
        "dump took {}, frozen {}; image {} ({} of memory); {} process{}, {} thread{}",
        util::duration(s.total),
        util::duration(s.frozen),
        util::bytes(s.image_bytes),
        util::bytes(s.memory_bytes),
        s.processes,
        if s.processes == 1 { "" } else { "es" },
        s.threads,
        if s.threads == 1 { "" } else { "s" },
    )
}

pub fn run(args: DumpArgs, verbose: bool) -> Result<u8> {
    if args.pid <= 0 {
        anyhow::bail!("invalid PID {}", args.pid);
    }
    let opts = DumpOptions {
        pid: args.pid,
        dir: args.dir,
        leave_running: args.leave_running,
        shell_job: args.shell_job,
    };
    log::info!("dumping pid {} into {}", opts.pid, opts.dir.display());
    let stats = stasis_engine::dump(&opts)?;
    if verbose {
        eprintln!("stasis: {}", summary(&stats));
    }
    if let Some(path) = &args.stats_json {
        util::write_json(path, &DumpStatsJson::new(opts.pid, &stats))?;
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stats_json_uses_seconds() {
        let s = DumpStats {
            total: Duration::from_millis(1500),
            frozen: Duration::from_millis(250),
            image_bytes: 10,
            memory_bytes: 8,
            processes: 1,
            threads: 2,
            phases: vec![("freeze", Duration::from_millis(5))],
        };
        let v = serde_json::to_value(DumpStatsJson::new(7, &s)).unwrap();
        assert_eq!(v["total"], 1.5);
        assert_eq!(v["frozen"], 0.25);
        assert_eq!(v["threads"], 2);
        assert_eq!(v["phases"]["freeze"], 0.005);
        assert!(summary(&s).contains("1 process, 2 threads"));
    }
}
