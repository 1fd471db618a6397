//! `stasis restore --pidns`: the tree fixture restored into PID namespaces of
//! its own, two copies of one image side by side, and a namespaced tree
//! dumped and restored again (its image then needs --pidns).
//!
//! Inside, every process has its saved PID (the fixture checks getpid(),
//! getppid() of the children, groups, sessions and that /proc/self agrees);
//! from outside, the root has another PID and its parent is stasis-init,
//! PID 1 of the namespace, which ends with the root's status.
//!
//! Needs root: `cargo test -p stasis --test pidns`.

#[allow(dead_code)]
mod common;

use common::*;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs::{self, File};
use std::path::Path;
use std::process::Stdio;

fn status_field(pid: i32, key: &str) -> Vec<i32> {
    let text = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| v.split_whitespace().filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_default()
}

fn ppid(pid: i32) -> i32 {
    status_field(pid, "PPid:").first().copied().unwrap_or(0)
}

fn comm(pid: i32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_owned()
}

/// Outer PIDs of the children of every thread of `pid`.
fn children(pid: i32) -> Vec<i32> {
    let mut out: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| {
            rd.filter_map(|t| fs::read_to_string(t.ok()?.path().join("children")).ok())
                .flat_map(|s| s.split_whitespace().filter_map(|x| x.parse().ok()).collect::<Vec<i32>>())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// A restored copy: the guard of its namespace's init (killing it kills the
/// namespace) and the root's PID as we see it.
struct Copy {
    init: Proc,
    root: i32,
}

/// Checks what a restored copy looks like from outside: the root keeps its
/// saved PID inside, under stasis-init (PID 1 there), with the saved
/// children inside.
fn assert_namespaced(root: i32, saved: &BTreeMap<String, i32>) -> i32 {
    assert_ne!(root, saved["root"], "the root kept its PID outside too");
    assert_eq!(status_field(root, "NSpid:").last(), Some(&saved["root"]), "root's PID inside");
    let init = ppid(root);
    assert_eq!(comm(init), "stasis-init", "the root's parent");
    assert_eq!(status_field(init, "NSpid:").last(), Some(&1), "stasis-init is PID 1 inside");
    let mut inner: Vec<i32> =
        children(root).iter().filter_map(|c| status_field(*c, "NSpid:").last().copied()).collect();
    inner.sort();
    let mut want = vec![saved["A"], saved["B"]];
    want.sort();
    assert_eq!(inner, want, "the root's children, by their PIDs inside");
    init
}

/// `stasis restore --pidns -d`: returns the copy, its init adopted.
fn restore_detached(image: &Path, pidfile: &Path, saved: &BTreeMap<String, i32>) -> Copy {
    let out = stasis_ok(&restore_pidns_detached_args(image, pidfile));
    drop(out);
    let root: i32 = fs::read_to_string(pidfile).expect("pidfile").trim().parse().expect("pid");
    let init = assert_namespaced(root, saved);
    Copy { init: Proc::adopted(init, "stasis-init"), root }
}

/// Two copies of one image run at once, each in its own namespace with the
/// same PIDs inside; each passes its own checks, and `stasis restore`
/// (attached) exits with its root's status.
#[test]
fn one_image_restored_twice_side_by_side() {
    let mut fixture = Fixture::start("tree", &[DIR_ARG]);
    let saved = tree_roles(fixture.dir().path());
    let originals: Vec<Proc> =
        saved.iter().filter(|(r, _)| *r != "root").map(|(r, p)| Proc::adopted(*p, format!("original {r}"))).collect();
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    drop(originals); // killed by the dump; reaped here

    let mut copies = Vec::new();
    for name in ["a", "b"] {
        let pidfile = fixture.dir().join(format!("pid-{name}"));
        let log = fixture.dir().join(format!("restore-{name}"));
        let out = File::create(&log).expect("restore log");
        let mut cmd = stasis_command(&[
            OsStr::new("restore"),
            "-D".as_ref(),
            image.as_os_str(),
            "--pidns".as_ref(),
            "--pidfile".as_ref(),
            pidfile.as_os_str(),
        ]);
        cmd.stdin(Stdio::null()).stdout(out.try_clone().expect("dup")).stderr(out);
        let restore = Proc::spawned(cmd.spawn().expect("spawn stasis restore"), "stasis restore --pidns");
        wait_until(COMMAND_TIMEOUT, "the copy runs", || {
            pidfile.exists() || !is_alive(restore.pid())
        });
        assert!(pidfile.exists(), "restore failed: {}", fs::read_to_string(&log).unwrap_or_default());
        let root: i32 = fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("pid");
        let init = assert_namespaced(root, &saved);
        assert_eq!(ppid(init), restore.pid(), "stasis restore waits for the namespace's init");
        copies.push((restore, root, log));
    }
    assert_ne!(copies[0].1, copies[1].1);
    for (mut restore, root, log) in copies {
        let_runners_run(root);
        sys::kill(root, libc::SIGTERM).expect("SIGTERM the copy's root");
        let st = restore.wait(EXIT_TIMEOUT);
        assert!(
            st.success(),
            "copy {root}: stasis restore exited {st}\n{}\n{}",
            fs::read_to_string(&log).unwrap_or_default(),
            fixture.log_text()
        );
    }
}

/// A tree restored into a namespace is dumped again (its image then holds
/// the PIDs it sees itself) and restored, three rounds; without --pidns such
/// an image is refused before anything is created.
#[test]
fn namespaced_tree_three_rounds() {
    let mut fixture = Fixture::start("tree", &[DIR_ARG]);
    let saved = tree_roles(fixture.dir().path());
    let originals: Vec<Proc> =
        saved.iter().filter(|(r, _)| *r != "root").map(|(r, p)| Proc::adopted(*p, format!("original {r}"))).collect();
    let mut image = fixture.dump("img0", &[]);
    fixture.reap_killed();
    drop(originals);
    let mut copy = restore_detached(&image, &fixture.dir().join("pid0"), &saved);
    for round in 1..=3 {
        image = fixture.dir().join(format!("img{round}"));
        stasis_ok(&dump_args(copy.root, &image, &[]));
        // Its last process gone, the namespace's init ends with the root's
        // status: killed by SIGKILL, 128 + 9.
        let st = copy.init.wait(EXIT_TIMEOUT);
        assert_eq!(st.code(), Some(137), "stasis-init after the dump killed the tree");
        if round == 1 {
            let err = assert_refused(
                &[OsStr::new("restore"), "-D".as_ref(), image.as_os_str(), "-d".as_ref()],
                &["PID namespace of its own", "--pidns"],
            );
            assert!(err.contains(&saved["root"].to_string()), "{err}");
        }
        copy = restore_detached(&image, &fixture.dir().join(format!("pid{round}")), &saved);
    }
    fixture.clear_log();
    let_runners_run(copy.root);
    sys::kill(copy.root, libc::SIGTERM).expect("SIGTERM");
    let st = copy.init.wait(EXIT_TIMEOUT);
    assert!(st.success(), "the last copy's verdict: {st}\n{}", fixture.log_text());
    assert!(fixture.log_text().trim_end().ends_with("PASS"), "{}", fixture.log_text());
}
