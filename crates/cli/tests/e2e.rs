//! End-to-end tests: the real `stasis` binary checkpoints and restores the C
//! fixtures of tests/fixtures, which verify their own state (see
//! tests/fixtures/fixture.h) and print PASS or FAIL.
//!
//! Needs root (ptrace, PIDs chosen at restore) on x86-64 Linux and gcc for
//! the fixtures. Run with `cargo test -p stasis --test e2e`; set
//! STASIS_KEEP_TEMP=1 to keep temp dirs (images, logs) for inspection.

mod common;

use common::*;
use stasis_image::format::{Header, MAGIC};
use std::ffi::OsStr;
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

// ---------------------------------------------------------------------------
// Every fixture through dump/restore rounds

/// Starts a fixture, runs `rounds` dump/restore rounds and checks it passes.
fn round_trip(name: &str, args: &[&str], rounds: usize) {
    let mut fixture = Fixture::start(name, args);
    fixture.checkpoint_rounds(rounds);
    fixture.finish();
}

/// One test per entry, plus `ROUND_TRIPS`, the same table for the
/// fixtures-only test.
macro_rules! round_trip_tests {
    ($($test:ident: $name:literal [$($arg:expr),*] x $rounds:literal;)*) => {
        $(
            #[test]
            fn $test() {
                round_trip($name, &[$($arg),*], $rounds);
            }
        )*
        const ROUND_TRIPS: &[(&str, &[&str])] = &[$(($name, &[$($arg),*])),*];
    };
}

round_trip_tests! {
    counter_three_rounds: "counter" [] x 3;
    static_counter_one_round: "static_counter" [] x 1;
    bigmem_64_mib_three_rounds: "bigmem" ["64"] x 3;
    bigmem_256_mib_one_round: "bigmem" [] x 1;
    files_three_rounds: "files" [DIR_ARG] x 3;
    regs_best_tier: "regs" [] x 1;
    regs_avx_tier: "regs" ["avx"] x 1;
    sleep_relative: "sleep" ["rel"] x 1;
    sleep_absolute_monotonic: "sleep" ["abs"] x 1;
    sleep_absolute_realtime: "sleep" ["absrt"] x 1;
    wait_in_pause: "waits" ["pause"] x 1;
    wait_in_sigsuspend: "waits" ["sigsuspend"] x 1;
    wait_in_select: "waits" ["select"] x 1;
    wait_in_ppoll: "waits" ["ppoll"] x 1;
    wait_in_poll: "waits" ["poll"] x 1;
    signals: "signals" [] x 1;
    sa_onstack_without_altstack: "onstack" [] x 2;
    widowed_pipe_with_queued_bytes: "pipe_holder" [] x 2;
    filemap: "filemap" [DIR_ARG] x 1;
    protmap: "protmap" [] x 1;
    growth: "growth" [] x 1;
    clock: "clock" [] x 1;
    procstate: "procstate" [DIR_ARG] x 1;
    threads: "threads" [] x 1;
}

/// The fixtures themselves, without stasis: each must pass when left alone,
/// so a failing round trip is the engine's fault, not the fixture's.
#[test]
fn fixtures_pass_without_checkpoint() {
    for (name, args) in ROUND_TRIPS {
        let fixture = Fixture::start(name, args);
        // Stands in for the time a dump takes: the spinning fixtures check
        // that their loops made progress before SIGTERM.
        std::thread::sleep(Duration::from_millis(50));
        fixture.finish();
    }
}

/// ... and each must fail when its state is damaged: here bigmem, whose
/// buffer is changed through /proc/PID/mem, the way a bad restore would.
#[test]
fn fixtures_fail_when_their_state_is_damaged() {
    let mut fixture = Fixture::start("bigmem", &["16"]);
    corrupt_largest_anonymous_mapping(fixture.pid());
    let status = fixture.terminate();
    fixture.assert_verdict(status, false);
}

// ---------------------------------------------------------------------------
// Variants of dump and restore

#[test]
fn leave_running_keeps_the_original_and_the_image_restores() {
    let mut fixture = Fixture::start("counter", &[]);
    let image = fixture.dump("img", &["--leave-running"]);
    let pid = fixture.pid();
    assert!(
        is_alive(pid),
        "the original is gone after dump --leave-running"
    );
    assert_eq!(tracer_pid(pid), Some(0), "the original is still traced");
    assert!(
        !matches!(proc_state(pid), Some(('T' | 't', _))),
        "the original is left stopped"
    );
    let status = fixture.terminate();
    fixture.assert_verdict(status, true);

    // Only the restored incarnation's verdict may count from here on.
    fixture.clear_log();
    fixture.restore_detached(&image);
    fixture.finish();
}

#[test]
fn restore_without_detach_passes_on_the_exit_status() {
    let mut fixture = Fixture::start("counter", &[]);
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    let restore = fixture.restore_attached(&image);
    fixture.finish_attached(restore, true);
}

#[test]
fn restore_without_detach_passes_on_a_failure() {
    let mut fixture = Fixture::start("bigmem", &["16"]);
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    let restore = fixture.restore_attached(&image);
    corrupt_largest_anonymous_mapping(fixture.pid());
    fixture.finish_attached(restore, false);
}

/// Flips a byte in the middle of the process's largest anonymous mapping
/// (bigmem's buffer) through /proc/PID/mem, so the fixture must FAIL.
fn corrupt_largest_anonymous_mapping(pid: i32) {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).expect("read maps");
    let (start, end) = maps
        .lines()
        .filter(|l| l.split_whitespace().count() == 5) // no path: anonymous
        .filter_map(|l| {
            let (s, e) = l.split_whitespace().next()?.split_once('-')?;
            Some((
                u64::from_str_radix(s, 16).ok()?,
                u64::from_str_radix(e, 16).ok()?,
            ))
        })
        .max_by_key(|(s, e)| e - s)
        .expect("an anonymous mapping");
    let mem = OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .expect("open mem");
    let at = start + (end - start) / 2;
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, at).expect("read mem");
    byte[0] ^= 0x40;
    mem.write_all_at(&byte, at).expect("write mem");
}

// ---------------------------------------------------------------------------
// Refused dumps: one-line error, target untouched

#[test]
fn dump_of_a_missing_process_is_refused() {
    init();
    // A PID that was just freed: PIDs are handed out cyclically, so it will
    // not be reused during the test.
    let mut child = Proc::spawned(
        hermetic_command("true").spawn().expect("spawn true"),
        "true",
    );
    child.wait(EXIT_TIMEOUT);
    let dir = TempDir::new("missing-pid");
    assert_refused(
        &dump_args(child.pid(), &dir.join("img"), &[]),
        &["no such process"],
    );
}

#[test]
fn dump_of_a_kernel_thread_is_refused() {
    let dir = TempDir::new("kthread");
    assert_refused(
        &dump_args(kernel_thread(), &dir.join("img"), &[]),
        &["kernel thread"],
    );
}

/// kthreadd (PID 2) outside a PID namespace; any kernel thread otherwise.
fn kernel_thread() -> i32 {
    const PF_KTHREAD: u64 = 0x0020_0000;
    let is_kthread = |pid: i32| {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // flags is the 9th field, the 7th after the ") " ending the name.
        stat.rfind(')')
            .and_then(|i| stat[i + 2..].split(' ').nth(6)?.parse::<u64>().ok())
            .is_some_and(|flags| flags & PF_KTHREAD != 0)
    };
    if is_kthread(2) {
        return 2;
    }
    fs::read_dir("/proc")
        .expect("read /proc")
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|&pid| is_kthread(pid))
        .expect("no kernel thread visible in /proc")
}

/// Dumps the fixture expecting a refusal naming all of `all_of`, and checks
/// that the target was left running (not killed, not stopped).
fn assert_dump_refused(fixture: &Fixture, all_of: &[&str]) {
    assert_refused(
        &dump_args(fixture.pid(), &fixture.dir().join("img"), &[]),
        all_of,
    );
    let pid = fixture.pid();
    assert!(is_alive(pid), "the target died after a refused dump");
    assert!(
        !matches!(proc_state(pid), Some(('T' | 't', _))),
        "the target is left stopped"
    );
}

#[test]
fn dump_of_a_traced_process_is_refused() {
    let target = Fixture::start("counter", &[]);
    let tracer = Fixture::start("ptracer", &[&target.pid().to_string()]);
    assert_eq!(tracer_pid(target.pid()), Some(tracer.pid()));
    assert_dump_refused(&target, &["already traced"]);
    assert_eq!(
        tracer_pid(target.pid()),
        Some(tracer.pid()),
        "our ptracer lost the target"
    );
    tracer.finish();
    target.finish();
}

#[test]
fn dump_of_a_process_holding_a_socket_is_refused() {
    let fixture = Fixture::start("pipe_holder", &["socket"]);
    assert_dump_refused(&fixture, &["fd 10", "socket"]);
    fixture.finish();
}

// ---------------------------------------------------------------------------
// Refused restores: one-line error, no process appears

/// Restore must fail with an error naming one of `any_of`, and create no
/// process with the image's PID.
fn assert_restore_refused(fixture: &Fixture, image: &Path, any_of: &[&str], context: &str) {
    let pidfile = fixture.dir().join("pid-refused");
    let line = stasis_error(&restore_detached_args(image, &pidfile));
    assert!(
        any_of.iter().any(|n| line.contains(n)),
        "{context}: error {line:?} contains none of {any_of:?}"
    );
    assert_no_process(fixture.pid(), context);
    assert!(!pidfile.exists(), "{context}: a pidfile was written");
}

#[test]
fn restore_into_a_pid_taken_by_a_live_process_is_refused() {
    let fixture = Fixture::start("counter", &[]);
    let image = fixture.dump("img", &["--leave-running"]);
    let pidfile = fixture.dir().join("pid-taken");
    assert_refused(
        &restore_detached_args(&image, &pidfile),
        &["taken by a live process"],
    );
    fixture.finish();
}

/// A tree `stasis dump` has just killed is zombies until its parent reaps it. A restore
/// started before that waits for the reaping (here: the test, the fixture's parent, reaps
/// once the restore has said it waits), and restores.
#[test]
fn restore_waits_for_the_parent_of_a_zombie_to_reap_it() {
    let mut fixture = Fixture::start("counter", &[]);
    let image = fixture.dump("img", &[]);
    assert_eq!(proc_state(fixture.pid()).map(|s| s.0), Some('Z'), "the dumped fixture is our zombie");
    let pidfile = fixture.dir().join("pid-after-zombie");
    let mut args = vec![OsStr::new("-vv").to_os_string()];
    args.extend(restore_detached_args(&image, &pidfile));
    let mut cmd = stasis_command(&args);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning stasis restore");
    let mut err = std::io::BufReader::new(child.stderr.take().expect("stderr"));
    let mut restore = Proc::spawned(child, "stasis restore");
    let mut seen = String::new();
    loop {
        let mut line = String::new();
        let n = std::io::BufRead::read_line(&mut err, &mut line).expect("reading the restore's log");
        assert!(n > 0, "stasis restore ended without waiting for the zombie:\n{seen}");
        seen.push_str(&line);
        if line.contains(&format!("PID {} is a zombie", fixture.pid())) {
            break;
        }
    }
    fixture.reap_killed();
    // Drain the rest of the log so that the restore never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::Read::read_to_string(&mut err, &mut seen).map(|_| seen));
    let status = restore.wait(COMMAND_TIMEOUT);
    let log = drain.join().expect("log reader").unwrap_or_default();
    assert!(status.success(), "stasis restore failed after the zombie was reaped ({status}):\n{log}");
    fixture.adopt_restored(&pidfile);
    fixture.finish();
}

/// A zombie nobody reaps keeps its PID: the restore gives up after its wait and says who
/// holds it; once reaped, the same image restores.
#[test]
fn restore_into_a_pid_held_by_an_unreaped_zombie_is_refused_then_restores() {
    let mut fixture = Fixture::start("counter", &[]);
    let image = fixture.dump("img", &[]);
    let pidfile = fixture.dir().join("pid-zombie");
    let line = assert_refused(&restore_detached_args(&image, &pidfile), &["zombie", "has not reaped it"]);
    assert!(line.contains(&std::process::id().to_string()), "the error names the parent: {line}");
    assert!(!pidfile.exists(), "a pidfile was written");
    fixture.reap_killed();
    fixture.restore_detached(&image);
    fixture.finish();
}

#[test]
fn restore_from_a_missing_directory_is_refused() {
    let dir = TempDir::new("missing-dir");
    let image = dir.join("no-such-image");
    assert_refused_any(
        &restore_detached_args(&image, &dir.join("pid")),
        &["missing", "No such file"],
    );
}

/// A counter dumped (and killed) into DIR/img: the image to corrupt.
fn dumped_counter() -> (Fixture, PathBuf) {
    let mut fixture = Fixture::start("counter", &[]);
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    (fixture, image)
}

/// Every regular file in the image directory, at any depth: the tests do
/// not assume a layout.
fn image_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        let kind = fs::symlink_metadata(&path).expect("stat").file_type();
        if kind.is_dir() {
            files.extend(image_files(&path));
        } else if kind.is_file() {
            files.push(path);
        }
    }
    files
}

/// A way to damage one image file, given its path and original bytes;
/// returns a description, or None if it does not apply to this file.
type Damage = fn(&Path, &[u8]) -> Option<String>;

/// Dumps a counter, then for each image file and each damage: damages the
/// file, expects the restore to be refused with one of `any_of` (and no
/// process), and puts the original bytes back. Finally the untouched image
/// must restore and pass, which shows that the damage was the cause.
fn assert_damage_refused(any_of: &[&str], damages: &[Damage]) {
    let (mut fixture, image) = dumped_counter();
    let mut damaged = 0;
    for file in image_files(&image) {
        let original = fs::read(&file).expect("read image file");
        for damage in damages {
            if let Some(what) = damage(&file, &original) {
                assert_restore_refused(
                    &fixture,
                    &image,
                    any_of,
                    &format!("{} {what}", file.display()),
                );
                damaged += 1;
            }
            fs::write(&file, &original).expect("restore image file");
        }
    }
    assert!(damaged > 0, "no image file could be damaged");
    fixture.restore_detached(&image);
    fixture.finish();
}

/// Flips the lowest bit of byte `at`.
fn flip_byte(file: &Path, bytes: &[u8], at: usize) -> Option<String> {
    let byte = *bytes.get(at)?;
    let f = OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open image file");
    f.write_all_at(&[byte ^ 1], at as u64)
        .expect("write image file");
    Some(format!("with byte {at} of {} flipped", bytes.len()))
}

/// Cuts the file to `len` bytes.
fn truncate_to(file: &Path, bytes: &[u8], len: usize) -> Option<String> {
    let f = OpenOptions::new()
        .write(true)
        .open(file)
        .expect("open image file");
    f.set_len(len as u64).expect("truncate image file");
    Some(format!("truncated from {} to {len} bytes", bytes.len()))
}

#[test]
fn restore_of_an_image_with_a_flipped_byte_is_refused() {
    // In the header (past any 8-byte magic, whose damage would read as "not
    // an image" instead), in the middle, and the last byte.
    assert_damage_refused(
        &["checksum", "corrupt"],
        &[
            |f, b| flip_byte(f, b, 12),
            |f, b| flip_byte(f, b, b.len() / 2),
            |f, b| flip_byte(f, b, b.len().checked_sub(1)?),
        ],
    );
}

#[test]
fn restore_of_a_truncated_image_is_refused() {
    assert_damage_refused(
        &["truncated"],
        &[
            |f, b| truncate_to(f, b, b.len().checked_sub(1)?),
            |f, b| truncate_to(f, b, b.len() / 2),
        ],
    );
}

#[test]
fn restore_of_an_image_with_another_format_version_is_refused() {
    // The version sits in the header of each image file; the header
    // checksum is recomputed so that this reads as a genuine image of
    // another version, not as corruption.
    assert_damage_refused(
        &["format version"],
        &[|file, bytes| {
            if !bytes.starts_with(MAGIC) {
                return None;
            }
            let mut header = Header::decode(file, bytes).expect("decode header");
            header.version += 1;
            let f = OpenOptions::new()
                .write(true)
                .open(file)
                .expect("open image file");
            f.write_all_at(&header.encode(), 0).expect("write header");
            Some(format!("with format version {}", header.version))
        }],
    );
}

// ---------------------------------------------------------------------------
// An interrupted dump

#[test]
fn a_killed_dumper_leaves_the_target_running_and_no_image() {
    let mut fixture = Fixture::start("bigmem", &[]);
    let pid = fixture.pid();
    let image = fixture.dir().join("img");
    let mut cmd = stasis_command(&dump_args(pid, &image, &[]));
    // Halfway: the target is frozen and page data is being written. The dumper stops
    // itself as its third chunk of page data is about to be read (with two copy threads,
    // one of them has written a chunk by then), so it cannot finish before it is killed,
    // however the machine schedules it.
    cmd.env("STASIS_FAULT_STOP_AT_PAGE_CHUNK", "3")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut dumper = Proc::spawned(cmd.spawn().expect("spawn stasis dump"), "stasis dump");
    wait_until(COMMAND_TIMEOUT, "the dumper stops itself while writing the image", || {
        let state = proc_state(dumper.pid()).map(|(s, _)| s);
        assert!(
            matches!(state, Some('R' | 'S' | 'D' | 'T')),
            "the dumper ended before it could be interrupted (state {state:?})"
        );
        state == Some('T')
    });
    assert!(tracer_pid(pid).is_some_and(|t| t != 0), "the target is not frozen by the stopped dumper");
    assert!(partial_image_exists(&image), "no partial image of more than 1 MiB");
    dumper.signal(libc::SIGKILL);
    dumper.wait(EXIT_TIMEOUT);

    wait_until(
        READY_TIMEOUT,
        "the target is no longer traced",
        || tracer_pid(pid) == Some(0),
    );
    wait_until(
        READY_TIMEOUT,
        "the target runs again",
        || matches!(proc_state(pid), Some((s, _)) if !matches!(s, 'T' | 't' | 'Z' | 'X')),
    );
    let status = fixture.terminate();
    fixture.assert_verdict(status, true);

    // The original is gone now, so only a missing image can stop a restore.
    assert_restore_refused(
        &fixture,
        &image,
        &["no complete image", "missing", "No such file"],
        "interrupted dump",
    );
}

// ---------------------------------------------------------------------------
// A shell job
//
// What this checks: a fixture whose stdio is a pseudo-terminal and which is
// not a session leader (as started from a shell in `script`) is refused
// without --shell-job, dumps with it, and restores with --shell-job inside
// another `script`: it then runs in the restoring session (same session ID
// as its stasis parent) with a pty on its stdio, and its PASS arrives on
// that terminal.

/// `script -qec CMD /dev/null` with its terminal output going to `output`.
fn spawn_in_pty(shell_cmd: &str, output: &Path, what: &str) -> Proc {
    let out = fs::File::create(output).expect("create script output");
    let mut cmd = hermetic_command("script");
    cmd.args(["-qec", shell_cmd, "/dev/null"])
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawning script (util-linux) for the shell-job test: {e}"));
    Proc::spawned(child, what)
}

fn shell_quote(s: &OsStr) -> String {
    format!(
        "'{}'",
        s.to_str().expect("UTF-8 path").replace('\'', r"'\''")
    )
}

/// The process whose command line is exactly `argv`.
fn find_by_argv(argv: &[&OsStr]) -> Option<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| a.as_encoded_bytes().iter().copied().chain([0]))
        .collect();
    fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .find(|pid: &i32| fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
}

fn session_id(pid: i32) -> i32 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).expect("read stat");
    let rest = &stat[stat.rfind(')').expect("stat") + 2..];
    rest.split(' ')
        .nth(3)
        .and_then(|s| s.parse().ok())
        .expect("session field")
}

fn assert_stdout_is_a_pty(pid: i32) {
    let target = fs::read_link(format!("/proc/{pid}/fd/1")).expect("readlink fd 1");
    assert!(
        target.starts_with("/dev/pts/"),
        "fd 1 of {pid} is {}, not a pty",
        target.display()
    );
}

#[test]
fn shell_job_in_a_pty() {
    init();
    let dir = TempDir::new("shell-job");
    let fixture_bin = fixture_path("counter");
    let fifo = dir.join("ready");
    let mut ready = open_ready_fifo(&fifo);

    // `; true` keeps the shell from exec'ing the fixture, so the fixture is
    // a shell job: in the shell's session, not leading one.
    let job = format!(
        "{} {}; true",
        shell_quote(fixture_bin.as_os_str()),
        shell_quote(fifo.as_os_str())
    );
    let mut script = spawn_in_pty(&job, &dir.join("pty-before"), "script (original)");
    wait_ready(&mut ready, script.pid()).expect("fixture in script");
    let pid = find_by_argv(&[fixture_bin.as_os_str(), fifo.as_os_str()]).expect("fixture process");
    let mut job_guard = Proc::adopted(pid, "counter in script");
    assert_ne!(
        session_id(pid),
        pid,
        "the fixture leads its session: not a shell job"
    );
    assert_stdout_is_a_pty(pid);

    let image = dir.join("img");
    assert_refused(&dump_args(pid, &image, &[]), &["--shell-job"]);
    assert!(is_alive(pid), "the fixture died after a refused dump");
    stasis_ok(&dump_args(pid, &image, &["--shell-job"]));
    // The shell reaps the killed fixture and exits; so does script.
    script.wait(EXIT_TIMEOUT);
    wait_until(EXIT_TIMEOUT, "the dumped fixture is gone", || {
        proc_state(pid).is_none()
    });
    job_guard.disown();

    let pidfile = dir.join("pid");
    let restore = format!(
        "{} restore --shell-job -D {} --pidfile {}",
        shell_quote(OsStr::new(env!("CARGO_BIN_EXE_stasis"))),
        shell_quote(image.as_os_str()),
        shell_quote(pidfile.as_os_str())
    );
    let output = dir.join("pty-after");
    let mut script = spawn_in_pty(&restore, &output, "script (restore)");
    wait_until(COMMAND_TIMEOUT, "the restored fixture runs", || {
        assert!(
            is_alive(script.pid()),
            "script exited: {}",
            fs::read_to_string(&output).unwrap_or_default()
        );
        pidfile.exists() && is_alive(pid)
    });
    let mut restored = Proc::adopted(pid, "counter restored in script");
    assert_stdout_is_a_pty(pid);
    let (_, parent) = proc_state(pid).expect("restored process");
    assert_eq!(
        session_id(pid),
        session_id(parent),
        "not in the restoring stasis' session"
    );

    let_runners_run(pid);
    restored.signal(libc::SIGTERM);
    let status = script.wait(EXIT_TIMEOUT);
    restored.disown(); // reaped by its parent, stasis restore
    let text = fs::read_to_string(&output).expect("read pty output");
    let last = text
        .lines()
        .map(|l| l.trim_end_matches('\r'))
        .rfind(|l| !l.is_empty());
    assert!(
        status.success() && last == Some("PASS"),
        "shell job: {status}, terminal output:\n{text}"
    );
}

/// A dump in progress past its first megabyte of page data.
fn partial_image_exists(dir: &Path) -> bool {
    fs::read_dir(dir).is_ok_and(|rd| {
        rd.flatten().any(|e| {
            e.file_name().to_string_lossy().starts_with(".stasis.img.partial-")
                && e.metadata().is_ok_and(|m| m.len() > 1 << 20)
        })
    })
}

/// A dumper killed while one of its injected calls runs in the target: the thread returns
/// through the sigframe the parasite prepared and continues with every register intact
/// (the regs fixture checks general, SSE/AVX/AVX-512 and mask registers; the threads
/// fixture each thread's registers, mask and wait). The single-threaded regs fixture has
/// its scratch area on its own stack: injection 1 is the chain of calls that write memory,
/// 2 the brk. The threads fixture gets a scratch mapping: injection 1 is the mmap
/// (unprotected, like the final munmap), then per thread the chain (2, 4, ...), and 3 the
/// brk; a dumper killed in the middle of a chain leaves a thread that runs the rest of it,
/// drops the stop signal and returns to where it was.
#[test]
fn a_dumper_killed_during_an_injected_call_leaves_registers_intact() {
    for (name, n) in [("regs", 1), ("regs", 2), ("threads", 2), ("threads", 4), ("threads", 6)] {
        let fixture = Fixture::start(name, &[]);
        let image = fixture.dir().join("img");
        let mut cmd = stasis_command(&dump_args(fixture.pid(), &image, &[]));
        // Injected calls are the fallback where BPF cannot read what they read.
        cmd.env("STASIS_FAULT_KILL_AT_INJECTION", n.to_string())
            .env("STASIS_NO_BPF", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut dumper = Proc::spawned(cmd.spawn().expect("spawn stasis dump"), "stasis dump");
        let status = dumper.wait(EXIT_TIMEOUT);
        assert!(!status.success(), "the dumper was to be killed at injection {n}");
        wait_until(READY_TIMEOUT, "the target is no longer traced", || {
            tracer_pid(fixture.pid()) == Some(0)
        });
        if name == "threads" {
            // Its main thread waits in sigsuspend (with SIGTERM unblocked around it): an
            // orphaned thread returns by re-entering that call, and a signal that arrives
            // before it is back inside would be handled outside the wait (see README).
            wait_until(READY_TIMEOUT, "the main thread is back in sigsuspend", || {
                fs::read_to_string(format!("/proc/{}/syscall", fixture.pid()))
                    .is_ok_and(|s| s.split_whitespace().next() == Some("130"))
            });
            // Its spinning workers must show progress when it ends: let each of them run
            // for a millisecond of CPU (a loaded machine may not have run them yet).
            let runtime = |tid: &str| -> u64 {
                fs::read_to_string(format!("/proc/{}/task/{tid}/schedstat", fixture.pid()))
                    .ok()
                    .and_then(|s| s.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0)
            };
            let tids: Vec<String> = fs::read_dir(format!("/proc/{}/task", fixture.pid()))
                .expect("task dir")
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            let start: Vec<u64> = tids.iter().map(|t| runtime(t)).collect();
            wait_until(READY_TIMEOUT, "the workers ran again", || {
                tids.iter().zip(&start).all(|(t, &s0)| {
                    let sleeping = fs::read_to_string(format!("/proc/{}/task/{t}/stat", fixture.pid()))
                        .is_ok_and(|st| st.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('S')));
                    sleeping || runtime(t) >= s0 + 1_000_000
                })
            });
        }
        fixture.finish();
    }
}

/// `stasis dump` of itself (a shell that execs stasis with its own PID), and of a tree that
/// contains it (the shell that runs it): both refused, the shell unharmed.
#[test]
fn dump_of_stasis_itself_or_a_tree_containing_it_is_refused() {
    let dir = TempDir::new("self");
    let stasis = env!("CARGO_BIN_EXE_stasis");
    let image = dir.join("img");
    for (script, want) in [
        (format!("exec {stasis} dump -t $$ -D {}", image.display()), "stasis itself"),
        (format!("{stasis} dump -t $$ -D {}; echo shell-alive", image.display()), "contains stasis itself"),
    ] {
        let mut cmd = hermetic_command("sh");
        cmd.arg("-c").arg(&script);
        let out = run(cmd, COMMAND_TIMEOUT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{script}: {err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        if !script.starts_with("exec") {
            assert!(String::from_utf8_lossy(&out.stdout).contains("shell-alive"));
        } else {
            assert!(!out.status.success());
        }
    }
}

/// What BPF reads of a frozen process (dispositions, break, XSAVE permissions, resource
/// limits, personality, each thread's clear_child_tid and alternate stack, the mappings'
/// flags) is what injected
/// calls, smaps and /proc read of the same process: two dumps that leave it running, one
/// with STASIS_NO_BPF=1, give the same records.
#[test]
fn bpf_reads_what_injected_calls_read() {
    let fixtures: [(&str, &[&str]); 7] = [
        ("signals", &[]),
        ("threads", &[]),
        ("protmap", &[]),
        ("growth", &[]),
        ("onstack", &[]),
        ("regs", &[]),
        ("procstate", &[DIR_ARG]),
    ];
    for (name, args) in fixtures {
        let fixture = Fixture::start(name, args);
        let images: Vec<stasis_image::Image> = [false, true]
            .iter()
            .map(|&no_bpf| {
                let dir = fixture.dir().join(if no_bpf { "injected" } else { "bpf" });
                let mut cmd = stasis_command(&dump_args(fixture.pid(), &dir, &["--leave-running", "-v", "-v"]));
                match no_bpf {
                    true => cmd.env("STASIS_NO_BPF", "1"),
                    false => cmd.env_remove("STASIS_NO_BPF"),
                };
                let out = run(cmd, EXIT_TIMEOUT);
                let log = String::from_utf8_lossy(&out.stderr);
                assert!(out.status.success(), "{name}: dump failed: {log}");
                // The dump with BPF allowed must have used it: this is a machine where it
                // works (the unit tests in kfacts say so when it does not).
                assert_eq!(log.contains("read by BPF"), !no_bpf, "{name}: {log}");
                stasis_image::ImageReader::open(&dir).expect("open image").image.clone()
            })
            .collect();
        let (bpf, injected) = (&images[0].processes[0], &images[1].processes[0]);
        assert_eq!(bpf.sigactions, injected.sigactions, "{name}: dispositions");
        assert_eq!(bpf.mm.brk, injected.mm.brk, "{name}: brk");
        assert_eq!(bpf.mm.xcomp_perm, injected.mm.xcomp_perm, "{name}: XSAVE permissions");
        assert_eq!(bpf.rlimits, injected.rlimits, "{name}: resource limits");
        assert_eq!(bpf.personality, injected.personality, "{name}: personality");
        let threads = |p: &stasis_image::ProcessRecord| -> Vec<_> {
            p.threads.iter().map(|t| (t.tid, t.clear_child_tid, t.altstack, t.robust_list, t.sigmask)).collect()
        };
        assert_eq!(threads(bpf), threads(injected), "{name}: threads");
        let vmas = |p: &stasis_image::ProcessRecord| -> Vec<_> {
            p.mm.vmas.iter().map(|v| (v.start, v.end, v.prot, v.flags)).collect()
        };
        assert_eq!(vmas(bpf), vmas(injected), "{name}: mappings");
        assert!(!bpf.sigactions.is_empty() || name != "signals");
        fixture.finish();
    }
}
