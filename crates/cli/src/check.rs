//! `stasis check`: which kernel features stasis relies on are present here.

use crate::util;
use anyhow::Result;
use serde::Serialize;
use stasis_engine::check::{essentials_present, run_checks, Check};
use std::fmt::Write as _;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Print a JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize, Debug)]
pub struct CheckReport {
    pub kernel_release: String,
    pub machine: String,
    pub cpu_model: String,
    /// Every essential feature is present: dump and restore can work here.
    pub ok: bool,
    pub essential_missing: Vec<&'static str>,
    pub checks: Vec<Check>,
}

pub fn report(checks: Vec<Check>) -> CheckReport {
    let (kernel_release, machine) = stasis_sys::proc::uname();
    CheckReport {
        kernel_release,
        machine,
        cpu_model: stasis_sys::cpu::model_name(),
        ok: essentials_present(&checks),
        essential_missing: checks
            .iter()
            .filter(|c| c.essential && !c.present())
            .map(|c| c.id)
            .collect(),
        checks,
    }
}

pub fn text(r: &CheckReport) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Linux {} {}, {}",
        r.kernel_release, r.machine, r.cpu_model
    );
    let width = r.checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    for c in &r.checks {
        let tag = match (c.present(), c.essential) {
            (true, _) => "  ok   ",
            (false, true) => "MISSING",
            (false, false) => "missing",
        };
        let _ = writeln!(o, "[{tag}] {:<width$}  {}", c.name, c.detail);
        if !c.present() {
            let _ = writeln!(o, "          {:<width$}  without it: {}", "", c.without);
        }
    }
    let optional = r
        .checks
        .iter()
        .filter(|c| !c.essential && !c.present())
        .count();
    if r.ok {
        let _ = write!(o, "all essential features are present");
        if optional > 0 {
            let _ = write!(o, "; {optional} optional feature(s) missing (see above)");
        }
        let _ = writeln!(o);
    } else {
        let _ = writeln!(
            o,
            "essential features missing: {} (dump/restore will not work here)",
            r.essential_missing.join(", ")
        );
    }
    o
}

pub fn run(args: CheckArgs) -> Result<u8> {
    let rep = report(run_checks());
    if args.json {
        util::print_out(&format!("{}\n", serde_json::to_string_pretty(&rep)?))?;
    } else {
        util::print_out(&text(&rep))?;
    }
    Ok(if rep.ok { 0 } else { 1 })
}
