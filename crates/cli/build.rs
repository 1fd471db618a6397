//! Builds the C fixtures used by the end-to-end tests (tests/e2e.rs).
//!
//! Every `tests/fixtures/*.c` becomes an executable of the same name in
//! `$OUT_DIR/fixtures`, plus `static_counter`, the counter fixture linked
//! statically. The directory reaches the tests as `STASIS_FIXTURE_DIR`.
//! Build scripts cannot tell whether tests are being built, so this runs
//! for every build of the package; the compilers run in parallel and only
//! when a fixture source changed.

use std::env;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

/// Flags for every fixture. -pthread only matters for `threads` but is
/// harmless elsewhere and keeps one command line for all.
const CFLAGS: &[&str] = &["-O1", "-g", "-Wall", "-pthread"];

struct Fixture {
    name: String,
    source: PathBuf,
    extra_flags: &'static [&'static str],
}

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let src_dir = manifest_dir.join("tests").join("fixtures");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR")).join("fixtures");
    fs::create_dir_all(&out_dir).unwrap_or_else(|e| panic!("creating {}: {e}", out_dir.display()));

    println!("cargo:rerun-if-changed=build.rs");
    // A directory makes cargo rescan everything below it, so new, changed
    // and removed fixtures (and fixture.h) all trigger a rebuild.
    println!("cargo:rerun-if-changed={}", src_dir.display());
    println!("cargo:rerun-if-env-changed=CC");

    // CC may carry arguments ("ccache gcc").
    let cc = env::var("CC").unwrap_or_else(|_| "gcc".to_owned());
    let fixtures = list_fixtures(&src_dir);
    let jobs: Vec<(&Fixture, Child)> = fixtures
        .iter()
        .map(|f| (f, spawn_compiler(&cc, f, &out_dir)))
        .collect();

    let mut failures = Vec::new();
    for (fixture, child) in jobs {
        let output = child
            .wait_with_output()
            .unwrap_or_else(|e| panic!("waiting for {cc} ({}): {e}", fixture.name));
        report(fixture, &output, &mut failures);
    }
    if !failures.is_empty() {
        panic!(
            "building the C test fixtures failed:\n{}",
            failures.join("\n")
        );
    }
    println!("cargo:rustc-env=STASIS_FIXTURE_DIR={}", out_dir.display());
}

fn list_fixtures(src_dir: &Path) -> Vec<Fixture> {
    let entries =
        fs::read_dir(src_dir).unwrap_or_else(|e| panic!("reading {}: {e}", src_dir.display()));
    let mut sources: Vec<PathBuf> = entries
        .map(|e| {
            e.unwrap_or_else(|e| panic!("reading {}: {e}", src_dir.display()))
                .path()
        })
        .filter(|p| p.extension().is_some_and(|ext| ext == "c"))
        .collect();
    sources.sort();

    let mut fixtures: Vec<Fixture> = sources
        .into_iter()
        .map(|source| Fixture {
            name: source
                .file_stem()
                .expect("file stem")
                .to_string_lossy()
                .into_owned(),
            source,
            extra_flags: &[],
        })
        .collect();
    // The same program without a dynamic loader: no ld.so or shared
    // libraries in the address space, TLS set up by libc itself.
    fixtures.push(Fixture {
        name: "static_counter".to_owned(),
        source: src_dir.join("counter.c"),
        extra_flags: &["-static"],
    });
    fixtures
}

fn spawn_compiler(cc: &str, fixture: &Fixture, out_dir: &Path) -> Child {
    let mut words = cc.split_whitespace();
    Command::new(words.next().unwrap_or("gcc"))
        .args(words)
        .args(CFLAGS)
        .args(fixture.extra_flags)
        .arg("-o")
        .arg(out_dir.join(&fixture.name))
        .arg(&fixture.source)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| match e.kind() {
            io::ErrorKind::NotFound => panic!(
                "C compiler `{cc}` not found: the stasis end-to-end tests build their C \
                 fixtures with it. Install gcc (with static glibc, libc.a, for \
                 static_counter) or point CC at a compiler."
            ),
            _ => panic!("running `{cc}` for fixture {}: {e}", fixture.name),
        })
}

/// Collects a failed compile, and passes compiler warnings on to cargo so
/// they are not lost.
fn report(fixture: &Fixture, output: &Output, failures: &mut Vec<String>) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        failures.push(format!(
            "--- {} ({}):\n{stderr}",
            fixture.name, output.status
        ));
    } else {
        for line in stderr.lines() {
            println!("cargo:warning={}: {line}", fixture.name);
        }
    }
}
