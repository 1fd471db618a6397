//! The task part of `stasis bench`: a tree of N small processes (a root and N-1 children)
//! and one process with N threads, each dumped and restored for every N asked (10, 100 and
//! 1000 by default), to show how the times grow with the number of tasks.
//!
//! The target is this binary as `__bench-target 0 READY --procs N` (or `--threads N`):
//! every task sleeps. Each run dumps the target (killing it), collects every process of
//! the tree (we are a child subreaper, so orphans come to us), restores it with `stasis
//! restore -d` as users run it (a fresh restorer: every restored process starts as a copy
//! of the restorer, so a benchmark process grown by earlier runs would slow it down; the
//! time is the restore's own, from its `--stats-json`), then kills and collects the
//! restored tree. The first run warms up; medians of the rest.

use crate::bench::{median, spawn_target, wait_ready};
use crate::util::{self, TempDir};
use anyhow::{Context, Result};
use serde::Serialize;
use stasis_engine::DumpOptions;
use stasis_sys::ptrace::waitpid;
use stasis_sys::Pid;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskKind {
    /// A root process and N-1 children.
    Tree,
    /// One process with N threads.
    Threads,
}

impl TaskKind {
    fn name(self) -> &'static str {
        match self {
            TaskKind::Tree => "tree",
            TaskKind::Threads => "threads",
        }
    }
}

#[derive(Serialize, Debug, Clone, Copy)]
pub struct TaskSample {
    pub dump_s: f64,
    pub frozen_s: f64,
    pub restore_s: f64,
}

#[derive(Serialize, Debug, Clone)]
pub struct TaskReport {
    pub kind: TaskKind,
    pub tasks: usize,
    pub runs: usize,
    /// Medians over the counted runs.
    pub dump_s: f64,
    pub frozen_s: f64,
    pub restore_s: f64,
    /// The medians per 100 tasks, in milliseconds.
    pub dump_ms_per_100: f64,
    pub restore_ms_per_100: f64,
    pub samples: Vec<TaskSample>,
}

/// Every process of the tree under `root` (root included), read from /proc.
fn tree_pids(root: Pid) -> Vec<Pid> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let p = out[i];
        if let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in rd.flatten() {
                let text = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(text.split_whitespace().filter_map(|c| c.parse().ok()).map(Pid));
            }
        }
        i += 1;
    }
    out
}

/// Collects processes that were ours or became ours (subreaper) once they ended.
fn reap_all(pids: &[Pid]) {
    for &p in pids {
        let _ = waitpid(p, 0);
    }
}

/// Kills the restored tree (all of it, by PID) and collects it.
fn kill_tree(root: Pid) {
    let pids = tree_pids(root);
    for &p in &pids {
        let _ = stasis_sys::proc::kill(p, libc::SIGKILL);
    }
    reap_all(&pids);
}

fn one_run(exe: &Path, kind: TaskKind, n: usize, work: &Path, i: usize) -> Result<TaskSample> {
    let ready = work.join(format!("ready-{i}"));
    let images = work.join(format!("image-{i}"));
    let extra = match kind {
        TaskKind::Tree => ["--procs".to_string(), n.to_string()],
        TaskKind::Threads => ["--threads".to_string(), n.to_string()],
    };
    let mut target = spawn_target(exe, 0, &ready, &extra)?;
    wait_ready(&ready, &mut target)?;
    let pids = tree_pids(target.pid());
    let opts = DumpOptions { pid: target.pid().0, dir: images.clone(), leave_running: false, shell_job: false };
    let t = Instant::now();
    let stats = stasis_engine::dump(&opts)?;
    let dump_s = t.elapsed().as_secs_f64();
    target.reap_after_dump()?;
    reap_all(&pids[1..]);
    util::settle_threads();
    let stats_file = work.join(format!("restore-{i}.json"));
    let out = std::process::Command::new(exe)
        .arg("restore")
        .arg("-D")
        .arg(&images)
        .arg("-d")
        .arg("--stats-json")
        .arg(&stats_file)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
        .context("run stasis restore")?;
    if !out.status.success() {
        anyhow::bail!("stasis restore: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&stats_file).context("read restore stats")?)?;
    let restore_s = json["total"].as_f64().context("restore stats without total")?;
    let root = Pid(json["pid"].as_i64().context("restore stats without pid")? as i32);
    kill_tree(root);
    std::fs::remove_dir_all(&images).with_context(|| format!("remove {}", images.display()))?;
    let _ = std::fs::remove_file(&ready);
    Ok(TaskSample { dump_s, frozen_s: stats.frozen.as_secs_f64(), restore_s })
}

/// Every kind for every count, images in `dir`.
pub fn run(exe: &Path, kinds: &[TaskKind], counts: &[usize], dir: &Path, runs: usize) -> Result<Vec<TaskReport>> {
    // Orphans of the dumped and restored trees must come to us, not to a slow init: their
    // PIDs are taken again by the next restore.
    stasis_sys::proc::set_child_subreaper().context("PR_SET_CHILD_SUBREAPER")?;
    let mut out = Vec::new();
    for &kind in kinds {
        for &n in counts {
            let work = TempDir::new_in(dir, "stasis-bench-tasks")?;
            let mut samples = Vec::with_capacity(runs);
            for i in 0..=runs {
                let what = if i == 0 { "warm-up".to_string() } else { format!("run {i}/{runs}") };
                eprintln!("bench: {} of {n} in {}: {what}", kind.name(), dir.display());
                let s = one_run(exe, kind, n, work.path(), i).with_context(|| format!("{} of {n}, {what}", kind.name()))?;
                if i > 0 {
                    samples.push(s);
                }
            }
            let med = |f: fn(&TaskSample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
            let (dump_s, restore_s) = (med(|s| s.dump_s), med(|s| s.restore_s));
            out.push(TaskReport {
                kind,
                tasks: n,
                runs,
                dump_s,
                frozen_s: med(|s| s.frozen_s),
                restore_s,
                dump_ms_per_100: dump_s * 1e3 * 100.0 / n as f64,
                restore_ms_per_100: restore_s * 1e3 * 100.0 / n as f64,
                samples,
            });
        }
    }
    Ok(out)
}

/// The human table of the task part.
pub fn table(reports: &[TaskReport]) -> String {
    let mut o = String::new();
    if reports.is_empty() {
        return o;
    }
    let _ = writeln!(
        o,
        "\n{:<8} {:>6} {:>10} {:>10} {:>10} {:>14} {:>14}",
        "TASKS", "N", "DUMP", "FROZEN", "RESTORE", "DUMP/100", "RESTORE/100"
    );
    let ms = |s: f64| format!("{:.1} ms", s * 1e3);
    for r in reports {
        let _ = writeln!(
            o,
            "{:<8} {:>6} {:>10} {:>10} {:>10} {:>14} {:>14}",
            r.kind.name(),
            r.tasks,
            ms(r.dump_s),
            ms(r.frozen_s),
            ms(r.restore_s),
            format!("{:.1} ms", r.dump_ms_per_100),
            format!("{:.1} ms", r.restore_ms_per_100),
        );
    }
    let _ = writeln!(o, "(tree: a root and N-1 children; threads: one process with N threads; medians)");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_report() {
        let s = TaskSample { dump_s: 0.01, frozen_s: 0.009, restore_s: 0.02 };
        let r = TaskReport {
            kind: TaskKind::Tree,
            tasks: 100,
            runs: 1,
            dump_s: 0.01,
            frozen_s: 0.009,
            restore_s: 0.02,
            dump_ms_per_100: 10.0,
            restore_ms_per_100: 20.0,
            samples: vec![s],
        };
        let t = table(&[r.clone(), TaskReport { kind: TaskKind::Threads, ..r }]);
        assert!(t.contains("tree"), "{t}");
        assert!(t.contains("threads"), "{t}");
        assert!(t.contains("20.0 ms"), "{t}");
    }

    #[test]
    fn tree_pids_of_ourselves() {
        let me = stasis_sys::proc::getpid();
        assert_eq!(tree_pids(me)[0], me);
    }
}
