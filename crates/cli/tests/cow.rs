//! End-to-end tests of a tree whose processes share most of their memory copy-on-write
//! (a parent and the children it forked): the image holds each physical page once, and
//! every process gets all its memory back, the pages it shared as well as those it
//! wrote itself. The C fixture `cow` checks itself (see its header).
//!
//! Needs root, like the e2e tests: `cargo test -p stasis --test cow`.

#[allow(dead_code)] // shared with e2e.rs, which uses the rest
mod common;

use common::*;
use std::fs;
use std::path::Path;

/// The fixture's shared area.
const AREA: u64 = 16 << 20;
const KIDS: usize = 8;

fn start(kids: usize) -> (Fixture, Kids) {
    let fixture = Fixture::start("cow", &[DIR_ARG, &kids.to_string()]);
    let kids = Kids::of(&fixture);
    (fixture, kids)
}

fn finish(mut fixture: Fixture, kids: Kids) {
    let status = fixture.terminate();
    fixture.assert_verdict(status, true);
    kids.reap().unwrap_or_else(|e| panic!("{e}"));
}

/// Nine processes map the 16 MiB area; saved once, the image stays well below two copies.
fn assert_saved_once(image: &Path) {
    let size = fs::metadata(image.join("stasis.img")).expect("image").len();
    assert!(size < 2 * AREA, "image of {size} bytes for {} processes sharing {AREA} bytes", KIDS + 1);
    assert!(size > AREA, "image of {size} bytes cannot hold the {AREA} bytes area");
}

fn round_trip(rounds: usize) {
    let (mut fixture, kids) = start(KIDS);
    for r in 0..rounds {
        let image = fixture.dump(&format!("img{r}"), &[]);
        if r == 0 {
            assert_saved_once(&image);
        }
        fixture.reap_killed();
        kids.reap_dumped();
        fixture.restore_detached(&image);
    }
    finish(fixture, kids);
}

#[test]
fn fixture_alone_passes() {
    let (fixture, kids) = start(KIDS);
    finish(fixture, kids);
}

#[test]
fn shared_pages_one_round() {
    round_trip(1);
}

/// A restore gives each process its own copy of every page (restore does not rebuild
/// copy-on-write sharing): the next dumps save each copy, and all must still come back
/// right.
#[test]
fn shared_pages_three_rounds() {
    round_trip(3);
}

/// A dump that lets the tree run on; the tree is then killed and the image restored.
#[test]
fn shared_pages_after_leave_running() {
    let (mut fixture, kids) = start(KIDS);
    let image = fixture.dump("img", &["--leave-running"]);
    assert_saved_once(&image);
    sys::kill(fixture.pid(), libc::SIGKILL).expect("kill the root");
    for &(_, pid) in &kids.pids {
        sys::kill(pid, libc::SIGKILL).expect("kill a child");
    }
    fixture.reap_killed();
    kids.reap_dumped();
    fixture.restore_detached(&image);
    finish(fixture, kids);
}

/// `stasis show --json` counts the pages a child shares with the root as saved for it,
/// and as shared.
#[test]
fn show_counts_shared_pages() {
    let (fixture, kids) = start(2);
    let image = fixture.dump("img", &["--leave-running"]);
    let out = stasis_ok(&["show".as_ref(), image.as_os_str(), "--json".as_ref()]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("show --json");
    let child = kids.pid("K0");
    let procs = report["processes"].as_array().expect("processes");
    let mem = |pid: i32| &procs.iter().find(|p| p["pid"] == pid).expect("process in the report")["memory"];
    let (saved, shared) = (mem(child)["saved_bytes"].as_u64().unwrap(), mem(child)["shared_bytes"].as_u64().unwrap_or(0));
    assert!(saved >= AREA, "child saves {saved} bytes");
    assert!(shared >= AREA - 16 * 4096, "child shares only {shared} bytes");
    assert_eq!(mem(fixture.pid())["shared_bytes"].as_u64().unwrap_or(0), 0, "the root's copies come first");
    finish(fixture, kids);
}
