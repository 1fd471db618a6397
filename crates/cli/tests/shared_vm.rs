//! End-to-end tests of a child that shares its parent's address space (clone
//! with CLONE_VM, without CLONE_THREAD), with its signal handlers
//! (CLONE_SIGHAND), its descriptor table and fs info (CLONE_FILES,
//! CLONE_FS), or nothing else: after a restore the sharing is live (a write,
//! a sigaction, an open or chdir by one is seen by the other), what is not
//! shared stays separate, and each keeps its PID, parent, stack, blocked
//! mask and limits. The C fixture `shared_vm` checks itself (see its header).
//! Groupings stasis cannot restore are refused, naming the process, and the
//! tree runs on.
//!
//! Needs root, like the e2e tests: `cargo test -p stasis --test shared_vm`.

#[allow(dead_code)] // shared with e2e.rs, which uses the rest
mod common;

use common::*;
use std::ffi::OsStr;
use std::fs;

fn start(mode: &str) -> (Fixture, Kids) {
    let fixture = Fixture::start("shared_vm", &[DIR_ARG, mode]);
    let kids = Kids::of(&fixture);
    (fixture, kids)
}



fn round_trip(mode: &str, n: usize) {
    let (mut fixture, kids) = start(mode);
    kids_rounds(&mut fixture, &kids, n);
    kids_finish(fixture, kids);
}

/// The fixture's own checks hold without any dump.
#[test]
fn fixture_alone_passes() {
    for mode in ["sighand", "vm", "all", "sibling", "chain"] {
        let (fixture, kids) = start(mode);
        kids_finish(fixture, kids);
    }
}

#[test]
fn address_space_and_handlers_one_round() {
    round_trip("sighand", 1);
}

#[test]
fn address_space_and_handlers_three_rounds() {
    round_trip("sighand", 3);
}

/// Own handlers, descriptor table, cwd, umask: they differ as saved and stay
/// separate.
#[test]
fn address_space_only_one_round() {
    round_trip("vm", 1);
}

#[test]
fn address_space_only_three_rounds() {
    round_trip("vm", 3);
}

#[test]
fn address_space_handlers_files_fs_one_round() {
    round_trip("all", 1);
}

#[test]
fn address_space_handlers_files_fs_three_rounds() {
    round_trip("all", 3);
}

/// From outside after a restore: kcmp tells which kernel objects K shares
/// with the root (KCMP_VM 1, KCMP_FILES 2, KCMP_FS 3, KCMP_SIGHAND 4) and
/// which not, as before the dump; K's parent is the root and its exit signal
/// is SIGCHLD.
fn shares_as_before(mode: &str, want: [bool; 4]) {
    let (mut fixture, kids) = start(mode);
    let k = kids.pid("K");
    let shares = |root: i32| -> Vec<bool> {
        (1..=4).map(|kind| sys::kcmp_shares(root, k, kind).expect("kcmp")).collect()
    };
    assert_eq!(shares(fixture.pid()), want, "before the dump");
    kids_rounds(&mut fixture, &kids, 1);
    assert_eq!(shares(fixture.pid()), want, "after the restore");
    assert_eq!(proc_state(k).map(|s| s.1), Some(fixture.pid()), "K's parent");
    let stat = fs::read_to_string(format!("/proc/{k}/stat")).expect("stat");
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    assert_eq!(fields.get(38 - 3), Some(&"17"), "K's exit signal");
    kids_finish(fixture, kids);
}

#[test]
fn restored_child_shares_what_it_shared() {
    shares_as_before("vm", [true, false, false, false]);
    shares_as_before("sighand", [true, false, false, true]);
    shares_as_before("all", [true, true, true, true]);
}

/// A dump that lets the tree run on leaves no scratch area in the shared
/// address space, and the tree passes its checks.
#[test]
fn leave_running_leaves_the_address_space_as_it_was() {
    let (fixture, kids) = start("sighand");
    let maps = || fs::read_to_string(format!("/proc/{}/maps", fixture.pid())).expect("maps");
    let before = maps();
    fixture.dump("img", &["--leave-running"]);
    assert_eq!(maps(), before, "the mappings changed across the dump");
    kids_finish(fixture, kids);
}

/// `stasis restore --pidns -d` of `image`: the root's PID as we see it, and
/// the namespace's init, adopted.
fn restore_in_pidns(fixture: &Fixture, image: &std::path::Path, tag: &str) -> (i32, Proc) {
    let pidfile = fixture.dir().join(format!("pid-{tag}"));
    stasis_ok(&restore_pidns_detached_args(image, &pidfile));
    let root: i32 = fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("pid");
    let init = proc_state(root).map(|s| s.1).expect("the restored root runs");
    (root, Proc::adopted(init, "stasis-init"))
}

/// The same, restored into a PID namespace of its own (the fixture checks its
/// PIDs and K's parent inside), dumped there (kcmp and the image see the
/// namespace's PIDs) and restored into another one.
#[test]
fn address_space_shared_under_pidns() {
    let (fixture, kids) = start("all");
    let image = fixture.dump("img", &["--leave-running"]);
    let (root, mut init) = restore_in_pidns(&fixture, &image, "ns1");
    let image2 = fixture.dir().join("img-ns");
    stasis_ok(&dump_args(root, &image2, &[]));
    let st = init.wait(EXIT_TIMEOUT);
    assert_eq!(st.code(), Some(137), "stasis-init after the dump killed the copy");
    let (root, mut init) = restore_in_pidns(&fixture, &image2, "ns2");
    // The original runs on beside the copy; the copy goes first.
    fixture.clear_log();
    let_runners_run(root);
    sys::kill(root, libc::SIGTERM).expect("SIGTERM the copy's root");
    let st = init.wait(EXIT_TIMEOUT);
    assert!(st.success(), "the copy's verdict: {st}\n{}", fixture.log_text());
    assert!(fixture.log_text().trim_end().ends_with("PASS"), "{}", fixture.log_text());
    fixture.clear_log();
    kids_finish(fixture, kids);
}

/// `stasis show` says what K shares with its parent.
#[test]
fn show_names_the_shared_address_space() {
    let (fixture, kids) = start("sighand");
    let dir = fixture.dump("img", &["--leave-running"]);
    let out = stasis_ok(&[OsStr::new("show"), dir.as_os_str()]);
    let text = String::from_utf8_lossy(&out.stdout);
    let k = kids.pid("K");
    let part = text.split(&format!("process  {k} ")).nth(1).expect("K in the report");
    let part = part.split("\nprocess  ").next().unwrap_or(part);
    assert!(part.contains("shares with its parent: address space, signal handlers"), "{text}");
    assert_eq!(text.matches("shares with its parent").count(), 1, "{text}");
    kids_finish(fixture, kids);
}

/// A restorer killed at any of its injected calls (before K is cloned, at
/// the clone, while K is being finished) leaves neither the root nor K
/// behind; the image restores afterwards.
#[test]
fn a_restorer_killed_midway_leaves_no_sharer_behind() {
    let (mut fixture, kids) = start("vm");
    let pids = vec![fixture.pid(), kids.pid("K")];
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    kids.reap().unwrap_or_else(|e| panic!("after the dump: {e}"));
    // The restore makes 7: the root's rebuild batch (1), the clone of K (2),
    // K's descriptor batch (3), the root's close_range (4), K's own state (5),
    // K's thread state (6), the root's thread state ending with the helper's unmap (7).
    for n in 1..=7 {
        let pidfile = fixture.dir().join(format!("pid-{n}"));
        let mut cmd = stasis_command(&restore_detached_args(&image, &pidfile));
        cmd.env("STASIS_FAULT_KILL_AT_INJECTION", n.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        let mut restorer = Proc::spawned(cmd.spawn().expect("spawn stasis restore"), "stasis restore");
        let status = restorer.wait(EXIT_TIMEOUT);
        assert!(!status.success(), "the restorer was to be killed at injection {n}");
        assert!(!pidfile.exists(), "a killed restorer wrote its pidfile");
        wait_until(EXIT_TIMEOUT, &format!("nothing is left after a restorer killed at injection {n}"), || {
            for &p in &pids {
                let _ = sys::waitpid(p, libc::WNOHANG);
            }
            pids.iter().all(|&p| proc_state(p).is_none())
        });
    }
    fixture.restore_detached(&image);
    kids_finish(fixture, kids);
}

// ---------------------------------------------------------------------------
// Refused

/// The dump of the fixture in `mode` is refused with an error naming every
/// process of `named` (roles) and saying `what`; the tree runs on untraced and
/// passes its checks.
fn refused(mode: &str, named: &[&str], what: &[&str]) {
    let (fixture, kids) = start(mode);
    let mut all: Vec<String> = named.iter().map(|r| format!("pid {}", kids.pid(r))).collect();
    all.extend(what.iter().map(|w| w.to_string()));
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    assert_refused(&dump_args(fixture.pid(), &fixture.dir().join("img"), &[]), &all);
    assert!(!fixture.dir().join("img").join("stasis.img").exists(), "an image was written");
    let mut pids = vec![fixture.pid()];
    pids.extend(kids.pids.iter().map(|p| p.1));
    for pid in pids {
        assert!(is_alive(pid), "pid {pid} died after the refused dump");
        assert_eq!(tracer_pid(pid), Some(0), "pid {pid} is still traced");
    }
    kids_finish(fixture, kids);
}

/// K shares P's address space, but its parent is the root (CLONE_PARENT).
#[test]
fn sharing_with_a_sibling_is_refused() {
    refused("sibling", &["K", "P"], &["address space", "CLONE_VM", "but not with its parent"]);
}

/// K shares the root's address space and has a child of its own (K2, which
/// shares it too).
#[test]
fn a_sharer_with_children_is_refused() {
    refused("chain", &["K", "K2"], &["address space", "children of its own"]);
}
