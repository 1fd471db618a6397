//! End-to-end tests of processes that share kernel tables: a descriptor table
//! (CLONE_FILES) or cwd/root/umask (CLONE_FS) shared along the parent chain
//! comes back shared; so does an address space shared between two processes
//! (CLONE_VM, with or without CLONE_SIGHAND; shared_vm.rs checks it); a parent waiting in
//! vfork() for its child is refused in bounded time with the tree running on,
//! and dumps once the child has let it go; a child started by posix_spawn
//! (CLONE_VM|CLONE_VFORK, then exec) is an ordinary process.
//!
//! The C fixture `sharing` checks itself (see its header): after a restore a
//! descriptor opened or closed by one sharer must be seen by the other, and a
//! chdir or umask likewise, while a process that did not share keeps its own.
//!
//! Needs root, like the e2e tests: `cargo test -p stasis --test sharing`.

#[allow(dead_code)] // shared with e2e.rs, which uses the rest
mod common;

use common::*;
use std::fs;
use std::time::{Duration, Instant};

fn start(args: &[&str]) -> (Fixture, Kids) {
    let mut all = vec![DIR_ARG];
    all.extend_from_slice(args);
    let fixture = Fixture::start("sharing", &all);
    let kids = Kids::of(&fixture);
    (fixture, kids)
}



fn round_trip(args: &[&str], n: usize) {
    let (mut fixture, kids) = start(args);
    kids_rounds(&mut fixture, &kids, n);
    kids_finish(fixture, kids);
}

/// The fixture's own checks hold without any dump (and fail when a table
/// they expect shared is not: see `both`, whose A1 expects its own).
#[test]
fn sharing_fixture_alone_passes() {
    for mode in ["files", "fs", "both", "spawn"] {
        let (fixture, kids) = start(&[mode]);
        kids_finish(fixture, kids);
    }
}

// ---------------------------------------------------------------------------
// Shared descriptor tables and fs info

#[test]
fn shared_descriptor_table_one_round() {
    round_trip(&["files"], 1);
}

#[test]
fn shared_descriptor_table_three_rounds() {
    round_trip(&["files"], 3);
}

#[test]
fn shared_fs_info_one_round() {
    round_trip(&["fs"], 1);
}

#[test]
fn shared_fs_info_three_rounds() {
    round_trip(&["fs"], 3);
}

/// Both tables shared with the parent, and a plain child of the sharing
/// child that must keep tables of its own.
#[test]
fn shared_tables_with_a_private_grandchild_one_round() {
    round_trip(&["both"], 1);
}

#[test]
fn shared_tables_with_a_private_grandchild_three_rounds() {
    round_trip(&["both"], 3);
}

/// From outside after a restore: the sharers hold the same descriptors, and
/// the plain child B does not share them.
#[test]
fn restored_sharers_have_one_table() {
    let (mut fixture, kids) = start(&["both"]);
    kids_rounds(&mut fixture, &kids, 1);
    let fds = |pid: i32| {
        let mut v: Vec<String> = fs::read_dir(format!("/proc/{pid}/fd"))
            .expect("read fd dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let cwd = |pid: i32| fs::read_link(format!("/proc/{pid}/cwd")).expect("cwd");
    let (root, a, b) = (fixture.pid(), kids.pid("A"), kids.pid("B"));
    assert_eq!(fds(root), fds(a), "root and A list different descriptors");
    assert_eq!(cwd(root), cwd(a));
    assert_eq!(cwd(root), cwd(b));
    kids_finish(fixture, kids);
}

// ---------------------------------------------------------------------------
// posix_spawn: CLONE_VM|CLONE_VFORK, then exec

#[test]
fn posix_spawn_child_one_round() {
    round_trip(&["spawn"], 1);
}

#[test]
fn posix_spawn_child_three_rounds() {
    round_trip(&["spawn"], 3);
}

// ---------------------------------------------------------------------------
// Refused

fn assert_untouched(fixture: &Fixture, pids: &[i32]) {
    assert!(!fixture.dir().join("img").join("stasis.img").exists(), "an image was written");
    for &pid in pids {
        assert!(is_alive(pid), "pid {pid} died after the refused dump");
        assert_eq!(tracer_pid(pid), Some(0), "pid {pid} is still traced");
    }
}

/// An address space shared between two processes (CLONE_VM, with or
/// without CLONE_SIGHAND) used to be refused; it now comes back (see
/// shared_vm.rs for the checks of the sharing itself).
#[test]
fn shared_address_space_round_trip() {
    let (mut fixture, kids) = start(&["vm"]);
    kids_rounds(&mut fixture, &kids, 1);
    kids_finish(fixture, kids);
}

#[test]
fn shared_address_space_and_signal_handlers_round_trip() {
    let (mut fixture, kids) = start(&["vm", "sighand"]);
    kids_rounds(&mut fixture, &kids, 2);
    kids_finish(fixture, kids);
}

/// A parent blocked in vfork() cannot be frozen until its child execs or
/// exits: the dump says so in bounded time (it used to hang), naming both,
/// and the tree runs on. Once the child has exited, the same tree dumps and
/// restores.
fn vfork_refused(how: &str) {
    let deep = how == "deep";
    let (mut fixture, mut kids) = start(&["vfork", how]);
    let parent = if deep { kids.pid("P") } else { fixture.pid() };
    let child = kids.pid("child");
    let t0 = Instant::now();
    assert_refused(
        &dump_args(fixture.pid(), &fixture.dir().join("img"), &[]),
        &[&format!("pid {parent} is in vfork() waiting for child {child} to exec or exit")],
    );
    assert!(t0.elapsed() < Duration::from_secs(20), "the refusal took {:?}", t0.elapsed());
    assert_untouched(&fixture, &[fixture.pid(), parent, child]);
    // Let the child go: the parent reaps it and runs on, an ordinary process.
    sys::kill(child, libc::SIGUSR1).expect("SIGUSR1 to the vfork child");
    wait_until(EXIT_TIMEOUT, "the vfork child is reaped", || proc_state(child).is_none());
    kids.pids.retain(|(r, _)| r != "child");
    kids_rounds(&mut fixture, &kids, 1);
    kids_finish(fixture, kids);
}

#[test]
fn vfork_parent_is_refused_then_dumps() {
    vfork_refused("");
}

/// The same below the root: the root, already frozen, is let go unharmed.
#[test]
fn vfork_parent_below_the_root_is_refused_then_dumps() {
    vfork_refused("deep");
}

/// clone(CLONE_VFORK) without CLONE_VM: the child has its own memory, yet its parent
/// waits all the same (the dump used to wait for its stop forever).
#[test]
fn vfork_without_a_shared_address_space_is_refused_then_dumps() {
    vfork_refused("copy");
}

/// `stasis show` says which processes share which table with their parent.
#[test]
fn show_names_shared_tables() {
    let (fixture, kids) = start(&["both"]);
    let dir = fixture.dump("img", &["--leave-running"]);
    let out = stasis_ok(&[std::ffi::OsStr::new("show"), dir.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let a = kids.pid("A");
    let a_part = text.split(&format!("process  {a} ")).nth(1).expect("A in the report");
    let a_part = a_part.split("\nprocess  ").next().unwrap_or(a_part);
    assert!(a_part.contains("shares with its parent: descriptor table, fs"), "{text}");
    assert_eq!(text.matches("shares with its parent").count(), 1, "{text}");
    kids_finish(fixture, kids);
}

/// Field 38 of /proc/PID/stat: the signal the process's parent gets when it ends.
fn exit_signal_of(pid: i32) -> Option<i32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit_once(')')?.1.split_whitespace().nth(35)?.parse().ok()
}

/// A child cloned with SIGUSR2 as its exit signal comes back with it: its parent is told
/// of its end by SIGUSR2 and waits for it as a clone child (the fixture checks both).
fn exit_signal_kept(rounds: usize) {
    let mut fixture = Fixture::start("exitsig", &[DIR_ARG]);
    let kids = Kids::of(&fixture);
    let k = kids.pid("K");
    assert_eq!(exit_signal_of(k), Some(libc::SIGUSR2), "before the dump");
    kids_rounds(&mut fixture, &kids, rounds);
    assert_eq!(exit_signal_of(k), Some(libc::SIGUSR2), "after the restore");
    kids_finish(fixture, kids);
}

#[test]
fn a_child_with_another_exit_signal_keeps_it_one_round() {
    exit_signal_kept(1);
}

#[test]
fn a_child_with_another_exit_signal_keeps_it_three_rounds() {
    exit_signal_kept(3);
}
