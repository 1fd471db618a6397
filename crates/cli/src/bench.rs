//! `stasis bench`: how fast dump and restore are, against single-thread memcpy bandwidth
//! measured in the same run (never against a fixed number: machines differ).
//!
//! For each size and image directory, a target (this binary as the hidden
//! `__bench-target SIZE READYFILE`) fills SIZE bytes with xorshift data, touching all of
//! it, writes READYFILE and sleeps. Each run dumps it (killing it, the default), reaps it,
//! restores it in this process (the restored process is our child), then kills and reaps
//! it and deletes the image. The first run warms up and is not counted; the report gives
//! medians. Images are deleted after every run and the whole work directory on any exit.

use crate::util::{self, Child, TempDir};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use stasis_engine::{DumpOptions, RestoreOptions};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Memory sizes for the target, comma-separated (K, M, G suffixes; binary units).
    #[arg(long, value_delimiter = ',', default_value = "256M,1G", value_parser = util::parse_size)]
    pub sizes: Vec<u64>,
    /// Directories to write the images into, comma-separated (tmpfs and disk, say).
    #[arg(long, value_delimiter = ',', default_value = "/dev/shm,/var/tmp")]
    pub dirs: Vec<PathBuf>,
    /// Counted runs per size and directory (after one warm-up run).
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Print a JSON document instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Task counts for the task benchmark (a tree of N processes, a process with N
    /// threads), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub tasks: Vec<usize>,
    /// Which task benchmarks to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "tree,threads")]
    pub task_kinds: Vec<crate::bench_tasks::TaskKind>,
    /// Leave out the memory benchmark (sizes x dirs).
    #[arg(long)]
    pub skip_memory: bool,
    /// Leave out the task benchmark.
    #[arg(long)]
    pub skip_tasks: bool,
}

#[derive(clap::Args, Debug)]
pub struct TargetArgs {
    /// Bytes of memory to fill.
    pub size: u64,
    /// File to create once the memory is filled.
    pub ready: PathBuf,
    /// Processes in the target's tree (itself and N-1 sleeping children).
    #[arg(long, default_value_t = 1)]
    pub procs: usize,
    /// Threads of the target (itself and N-1 sleeping threads).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
}

/// Dump and restore of 1 GiB should each take at most this many times one single-thread
/// memcpy of 1 GiB.
pub const TARGET_RATIO: f64 = 3.5;
const MEMCPY_BYTES: usize = 1 << 30;
const MEMCPY_RUNS: usize = 5;
const READY_LIMIT: Duration = Duration::from_secs(300);

/// The hidden target: fill, announce, sleep.
pub fn target(args: TargetArgs) -> Result<u8> {
    // Inherited descriptors (a job server's pipe, say) would make it undumpable.
    stasis_sys::proc::close_range(3, u32::MAX).context("close inherited descriptors")?;
    // Its own session, so that it can be dumped alone (no --shell-job).
    stasis_sys::proc::setsid().context("setsid")?;
    let words = (args.size / 8) as usize;
    let mut mem: Vec<u64> = Vec::with_capacity(words);
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15 ^ args.size;
    for _ in 0..words {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        mem.push(x);
    }
    std::hint::black_box(&mem);
    // Children first: a process with threads must not fork them along.
    for _ in 1..args.procs {
        if let stasis_sys::proc::Forked::Child = stasis_sys::proc::fork_with_pid(None, 0).context("fork")? {
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
    for _ in 1..args.threads {
        std::thread::Builder::new().spawn(|| loop {
            std::thread::sleep(Duration::from_secs(3600));
        })?;
    }
    util::write_atomic(&args.ready, format!("{}\n", std::process::id()).as_bytes())?;
    loop {
        std::thread::sleep(Duration::from_secs(3600));
        std::hint::black_box(&mem);
    }
}

#[derive(Serialize, Debug, Clone)]
pub struct MemcpyReport {
    pub bytes: u64,
    pub median_s: f64,
    pub bytes_per_s: f64,
    pub samples_s: Vec<f64>,
}

/// One counted run.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Sample {
    pub dump_s: f64,
    pub frozen_s: f64,
    pub restore_s: f64,
    pub image_bytes: u64,
    pub memory_bytes: u64,
}

#[derive(Serialize, Debug, Clone)]
pub struct ConfigReport {
    pub size_bytes: u64,
    pub dir: String,
    pub runs: usize,
    /// Medians over the counted runs.
    pub dump_s: f64,
    pub frozen_s: f64,
    pub restore_s: f64,
    pub image_bytes: u64,
    pub memory_bytes: u64,
    pub dump_bytes_per_s: f64,
    pub restore_bytes_per_s: f64,
    /// Time divided by the time memcpy takes for the same number of bytes.
    pub dump_vs_memcpy: f64,
    pub restore_vs_memcpy: f64,
    pub samples: Vec<Sample>,
}

#[derive(Serialize, Debug)]
pub struct BenchReport {
    pub memcpy: MemcpyReport,
    pub target_ratio: f64,
    pub results: Vec<ConfigReport>,
    /// The task benchmark (tree of N processes, process with N threads).
    pub tasks: Vec<crate::bench_tasks::TaskReport>,
}

pub fn median(v: &[f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// Single-thread memcpy of `bytes` between two buffers that are already touched; one
/// copy warms up, then `runs` copies are timed.
fn measure_memcpy(bytes: usize, runs: usize) -> MemcpyReport {
    let mut src = vec![0u8; bytes];
    src.fill(0xa5);
    let mut dst = vec![0u8; bytes];
    dst.fill(0x5a);
    dst.copy_from_slice(&src);
    let samples: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
            t.elapsed().as_secs_f64()
        })
        .collect();
    let m = median(&samples);
    MemcpyReport {
        bytes: bytes as u64,
        median_s: m,
        bytes_per_s: bytes as f64 / m,
        samples_s: samples,
    }
}

pub fn spawn_target(exe: &Path, size: u64, ready: &Path, extra: &[String]) -> Result<Child> {
    let c = Command::new(exe)
        .arg("__bench-target")
        .arg(size.to_string())
        .arg(ready)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("start {} __bench-target", exe.display()))?;
    Ok(Child::new(stasis_sys::Pid(c.id() as i32)))
}

/// Waits for the target's ready file. The target needs a while to fill its memory and the
/// wait is not timed, so a coarse poll that also notices a dead target is enough.
pub fn wait_ready(ready: &Path, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + READY_LIMIT;
    while !ready.exists() {
        if let Some(st) = child.try_wait()? {
            bail!(
                "the benchmark target {} before it was ready",
                util::describe_status(st)
            );
        }
        if Instant::now() > deadline {
            bail!("the benchmark target was not ready after {READY_LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn one_run(exe: &Path, size: u64, work: &Path, n: usize) -> Result<Sample> {
    let ready = work.join(format!("ready-{n}"));
    let images = work.join(format!("image-{n}"));
    let mut target = spawn_target(exe, size, &ready, &[])?;
    wait_ready(&ready, &mut target)?;
    let opts = DumpOptions {
        pid: target.pid().0,
        dir: images.clone(),
        leave_running: false,
        shell_job: false,
    };
    let t = Instant::now();
    let stats = stasis_engine::dump(&opts)?;
    let dump_s = t.elapsed().as_secs_f64();
    target.reap_after_dump()?;
    util::settle_threads();
    let t = Instant::now();
    let restored = stasis_engine::restore(&RestoreOptions::plain(images.clone()))?;
    let restore_s = t.elapsed().as_secs_f64();
    Child::new(restored.pid).kill()?;
    std::fs::remove_dir_all(&images).with_context(|| format!("remove {}", images.display()))?;
    let _ = std::fs::remove_file(&ready);
    Ok(Sample {
        dump_s,
        frozen_s: stats.frozen.as_secs_f64(),
        restore_s,
        image_bytes: stats.image_bytes,
        memory_bytes: stats.memory_bytes,
    })
}

fn bench_config(
    exe: &Path,
    size: u64,
    dir: &Path,
    runs: usize,
    memcpy: &MemcpyReport,
) -> Result<ConfigReport> {
    // Everything of this configuration lives in `work`, removed on every exit path.
    let work = TempDir::new_in(dir, "stasis-bench")?;
    let mut samples = Vec::with_capacity(runs);
    for n in 0..=runs {
        let what = if n == 0 {
            "warm-up".to_string()
        } else {
            format!("run {n}/{runs}")
        };
        eprintln!(
            "bench: {} in {}: {what}",
            util::size_label(size),
            dir.display()
        );
        let s = one_run(exe, size, work.path(), n)
            .with_context(|| format!("{} in {}, {what}", util::size_label(size), dir.display()))?;
        if n > 0 {
            samples.push(s);
        }
    }
    let med = |f: fn(&Sample) -> f64| median(&samples.iter().map(f).collect::<Vec<_>>());
    let dump_s = med(|s| s.dump_s);
    let restore_s = med(|s| s.restore_s);
    let memcpy_s = size as f64 / memcpy.bytes_per_s;
    Ok(ConfigReport {
        size_bytes: size,
        dir: dir.display().to_string(),
        runs,
        dump_s,
        frozen_s: med(|s| s.frozen_s),
        restore_s,
        image_bytes: med(|s| s.image_bytes as f64) as u64,
        memory_bytes: med(|s| s.memory_bytes as f64) as u64,
        dump_bytes_per_s: size as f64 / dump_s,
        restore_bytes_per_s: size as f64 / restore_s,
        dump_vs_memcpy: dump_s / memcpy_s,
        restore_vs_memcpy: restore_s / memcpy_s,
        samples,
    })
}

pub fn run(args: BenchArgs) -> Result<u8> {
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    for d in &args.dirs {
        if !d.is_dir() {
            bail!("image directory parent {} does not exist", d.display());
        }
    }
    crate::restore::default_sigchld()?;
    let exe = std::env::current_exe().context("find the stasis binary")?;
    eprintln!(
        "bench: measuring single-thread memcpy of {}",
        util::bytes(MEMCPY_BYTES as u64)
    );
    // The buffers are freed before any target starts.
    let memcpy = measure_memcpy(MEMCPY_BYTES, MEMCPY_RUNS);
    eprintln!(
        "bench: memcpy took {} ({})",
        secs(memcpy.median_s),
        per_s(memcpy.bytes_per_s)
    );
    let mut results = Vec::new();
    for &size in args.sizes.iter().filter(|_| !args.skip_memory) {
        for dir in &args.dirs {
            results.push(bench_config(&exe, size, dir, args.runs, &memcpy)?);
        }
    }
    let tasks = match (args.skip_tasks, args.dirs.first()) {
        (false, Some(dir)) => crate::bench_tasks::run(&exe, &args.task_kinds, &args.tasks, dir, args.runs)?,
        _ => Vec::new(),
    };
    let report = BenchReport {
        memcpy,
        target_ratio: TARGET_RATIO,
        results,
        tasks,
    };
    if args.json {
        util::print_out(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        util::print_out(&table(&report))?;
    }
    Ok(0)
}

fn secs(s: f64) -> String {
    util::duration(Duration::from_secs_f64(s.max(0.0)))
}

fn per_s(b: f64) -> String {
    format!("{:.2} GiB/s", b / (1u64 << 30) as f64)
}

/// The human table.
pub fn table(r: &BenchReport) -> String {
    let mut o = String::new();
    let m = &r.memcpy;
    let _ = writeln!(
        o,
        "memcpy, one thread, {}: {} (median of {}), {}",
        util::bytes(m.bytes),
        secs(m.median_s),
        m.samples_s.len(),
        per_s(m.bytes_per_s)
    );
    let _ = writeln!(
        o,
        "target: dump and restore of 1 GiB each within {:.1}x one memcpy of 1 GiB ({})\n",
        r.target_ratio,
        secs(r.target_ratio * (1u64 << 30) as f64 / m.bytes_per_s)
    );
    if !r.results.is_empty() {
        memory_table(&mut o, r);
    }
    o.push_str(&crate::bench_tasks::table(&r.tasks));
    o
}

/// The rows of the memory benchmark, with the verdict for 1 GiB.
fn memory_table(o: &mut String, r: &BenchReport) {
    let _ = writeln!(
        o,
        "{:<5} {:<12} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>8} {:>8}",
        "SIZE",
        "DIR",
        "DUMP",
        "FROZEN",
        "RESTORE",
        "IMAGE",
        "DUMP RATE",
        "REST. RATE",
        "DUMP/MC",
        "REST/MC"
    );
    for c in &r.results {
        let _ = writeln!(
            o,
            "{:<5} {:<12} {:>9} {:>9} {:>9} {:>9} {:>11} {:>11} {:>7.2}x {:>7.2}x",
            util::size_label(c.size_bytes),
            c.dir,
            secs(c.dump_s),
            secs(c.frozen_s),
            secs(c.restore_s),
            util::bytes(c.image_bytes),
            per_s(c.dump_bytes_per_s),
            per_s(c.restore_bytes_per_s),
            c.dump_vs_memcpy,
            c.restore_vs_memcpy
        );
    }
    let _ = writeln!(
        o,
        "\n(medians of {} runs after one warm-up; X/MC = time / memcpy time of the same bytes)",
        r.results.first().map(|c| c.runs).unwrap_or(0)
    );
    for c in r.results.iter().filter(|c| c.size_bytes == 1 << 30) {
        let verdict = |x: f64| {
            if x <= r.target_ratio {
                "within target"
            } else {
                "over target"
            }
        };
        let _ = writeln!(
            o,
            "1 GiB in {}: dump {:.2}x memcpy ({}), restore {:.2}x memcpy ({})",
            c.dir,
            c.dump_vs_memcpy,
            verdict(c.dump_vs_memcpy),
            c.restore_vs_memcpy,
            verdict(c.restore_vs_memcpy)
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
    }

    #[test]
    fn memcpy_measures_something() {
        let m = measure_memcpy(1 << 20, 3);
        assert_eq!(m.samples_s.len(), 3);
        assert!(m.bytes_per_s > 0.0);
    }

    #[test]
    fn table_lists_every_config() {
        let s = Sample {
            dump_s: 0.2,
            frozen_s: 0.1,
            restore_s: 0.3,
            image_bytes: 1 << 30,
            memory_bytes: 1 << 30,
        };
        let c = ConfigReport {
            size_bytes: 1 << 30,
            dir: "/dev/shm".into(),
            runs: 1,
            dump_s: 0.2,
            frozen_s: 0.1,
            restore_s: 0.3,
            image_bytes: 1 << 30,
            memory_bytes: 1 << 30,
            dump_bytes_per_s: 5e9,
            restore_bytes_per_s: 3e9,
            dump_vs_memcpy: 2.0,
            restore_vs_memcpy: 4.0,
            samples: vec![s],
        };
        let r = BenchReport {
            memcpy: MemcpyReport {
                bytes: 1 << 30,
                median_s: 0.1,
                bytes_per_s: 1e10,
                samples_s: vec![0.1],
            },
            target_ratio: TARGET_RATIO,
            results: vec![c],
            tasks: Vec::new(),
        };
        let t = table(&r);
        assert!(t.contains("/dev/shm"));
        assert!(t.contains("dump 2.00x memcpy (within target), restore 4.00x memcpy (over target)"));
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["results"][0]["size_bytes"], 1u64 << 30);
    }
}
