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

/// Kibibytes of `field` in /proc/PID/smaps_rollup.
fn rollup_kib(pid: i32, field: &str) -> u64 {
    let text = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).expect("smaps_rollup");
    let line = text.lines().find(|l| l.starts_with(field)).unwrap_or_else(|| panic!("no {field} in smaps_rollup"));
    line[field.len()..].trim().trim_end_matches("kB").trim().parse().expect("a number of kB")
}

/// A dump that lets the tree run on leaves the pages shared as they were: reading them
/// must not give a process its own copies (the 16 MiB area would turn private in the
/// first process saved, the root).
#[test]
fn leave_running_keeps_pages_shared() {
    let (mut fixture, kids) = start(KIDS);
    // The root's proportional share of anonymous memory: an area shared by 9 processes
    // counts for a ninth.
    let before = rollup_kib(fixture.pid(), "Pss_Anon:");
    let image = fixture.dump("img", &["--leave-running"]);
    assert_saved_once(&image);
    let after = rollup_kib(fixture.pid(), "Pss_Anon:");
    assert!(after < before + 1024, "the root's share of anonymous memory went from {before} to {after} KiB");
    let status = fixture.terminate();
    fixture.assert_verdict(status, true);
    kids.reap().unwrap_or_else(|e| panic!("{e}"));
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

/// Writes a copy of the image in `from` into `to` with its metadata changed by `edit`
/// (checksums made to match: only restore's own checks can catch it).
fn forge(from: &Path, to: &Path, edit: impl FnOnce(&mut stasis_image::Image, u64)) {
    let reader = stasis_image::ImageReader::open(from).expect("open image");
    let map = reader.map_pages().expect("map pages");
    let pages = &map.as_slice()[..reader.header.pages_len as usize];
    let mut image = reader.image.clone();
    edit(&mut image, reader.header.pages_len);
    let mut w = stasis_image::ImageWriter::create(to).expect("create forged image");
    w.write_pages(pages).expect("write pages");
    w.finish(&mut image).expect("finish forged image");
}

/// A run referring to page data outside the image is refused before any process exists,
/// naming the process and the mapping; the intact image restores.
#[test]
fn a_reference_outside_the_page_data_is_refused() {
    let (mut fixture, kids) = start(2);
    let image = fixture.dump("img", &[]);
    fixture.reap_killed();
    kids.reap_dumped();
    let child = kids.pid("K1");
    for (tag, shift, why) in [("past-end", 0u64, "outside the image"), ("unaligned", 1, "not on a page boundary")] {
        let bad = fixture.dir().join(format!("bad-{tag}"));
        let mut mapping = String::new();
        forge(&image, &bad, |img, pages_len| {
            let p = img.processes.iter_mut().find(|p| p.pid == child).expect("K1 in the image");
            let v = p.mm.vmas.iter_mut().find(|v| v.pages.iter().any(|r| r.data.is_some())).expect("a shared run");
            mapping = format!("{:#x}-{:#x}", v.start, v.end);
            let r = v.pages.iter_mut().find(|r| r.data.is_some()).expect("a shared run");
            r.data = Some(if shift == 0 { pages_len } else { 4096 + shift });
        });
        assert_refused(&restore_detached_args(&bad, &fixture.dir().join("pid-bad")), &[&child.to_string(), &mapping, why]);
        for &(_, pid) in &kids.pids {
            assert_no_process(pid, "after the refused restore");
        }
        assert_no_process(fixture.pid(), "after the refused restore");
    }
    fixture.restore_detached(&image);
    finish(fixture, kids);
}
