//! `stasis`: checkpoint a running Linux process to an image and restore it later.
//!
//! A thin binary: each command parses its arguments, builds the engine's options struct,
//! calls the engine and presents the result. One file per command.
//!
//! `restore`, `demo` and `bench` call `stasis_engine::restore`, which forks the restored
//! process from this one and so needs it to be single-threaded: nothing in this binary
//! starts a thread.

mod bench;
mod bench_tasks;
mod check;
mod demo;
mod dump;
mod logger;
mod names;
mod restore;
mod show;
mod util;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// The system allocator, but for the image records `restore` decodes: those go to a shared
/// arena, which the processes it forks get without a copy of its page tables.
#[global_allocator]
static ALLOC: stasis_sys::alloc::StasisAlloc = stasis_sys::alloc::StasisAlloc;

/// stasis: transparent checkpoint/restore of Linux processes.
#[derive(Parser, Debug)]
#[command(name = "stasis", version, propagate_version = true)]
struct Cli {
    /// Say more on stderr (repeat for more detail).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Checkpoint a running process into an image directory.
    Dump(dump::DumpArgs),
    /// Restore a process from an image directory.
    Restore(restore::RestoreArgs),
    /// Show what an image holds.
    Show(show::ShowArgs),
    /// Probe the kernel features stasis relies on.
    Check(check::CheckArgs),
    /// Start a small counter, checkpoint it, restore it, and show that it continues.
    Demo,
    /// Measure dump and restore speed against single-thread memcpy bandwidth.
    Bench(bench::BenchArgs),
    #[command(name = "__demo-counter", hide = true)]
    DemoCounter(demo::CounterArgs),
    #[command(name = "__bench-target", hide = true)]
    BenchTarget(bench::TargetArgs),
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(e),
    };
    logger::init(cli.verbose);
    let verbose = cli.verbose > 0;
    let result = match cli.command {
        Command::Dump(a) => dump::run(a, verbose),
        Command::Restore(a) => restore::run(a, verbose),
        Command::Show(a) => show::run(a),
        Command::Check(a) => check::run(a),
        Command::Demo => demo::run(),
        Command::Bench(a) => bench::run(a),
        Command::DemoCounter(a) => demo::counter(a),
        Command::BenchTarget(a) => bench::target(a),
    };
    match result {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("stasis: {}", util::one_line(&format!("{e:#}")));
            ExitCode::FAILURE
        }
    }
}

/// Help and version go to stdout as clap renders them; a usage error becomes one line on
/// stderr, like every other error.
fn usage_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    match e.kind() {
        ErrorKind::DisplayHelp
        | ErrorKind::DisplayVersion
        | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            let _ = e.print();
            if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            }
        }
        _ => {
            let text = e.render().to_string();
            let first = text
                .lines()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .unwrap_or("invalid arguments");
            let msg = first.strip_prefix("error: ").unwrap_or(first);
            eprintln!("stasis: {msg} (see stasis --help)");
            ExitCode::from(2)
        }
    }
}
