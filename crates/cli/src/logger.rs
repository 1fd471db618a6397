//! A minimal `log` backend: one line per record on stderr (debug and trace lines carry
//! the seconds since start).
//!
//! Warnings and errors always show; `-v` adds info, `-vv` debug, `-vvv` trace.

use log::{Level, LevelFilter, Log, Metadata, Record};
use std::io::Write;
use std::sync::OnceLock;
use std::time::Instant;

struct StderrLogger {
    level: LevelFilter,
    start: Instant,
}

static LOGGER: OnceLock<StderrLogger> = OnceLock::new();

pub fn level_for(verbosity: u8) -> LevelFilter {
    match verbosity {
        0 => LevelFilter::Warn,
        1 => LevelFilter::Info,
        2 => LevelFilter::Debug,
        _ => LevelFilter::Trace,
    }
}

/// Installs the logger once; later calls keep the first setting.
pub fn init(verbosity: u8) {
    let level = level_for(verbosity);
    let logger = LOGGER.get_or_init(|| StderrLogger {
        level,
        start: Instant::now(),
    });
    if log::set_logger(logger).is_ok() {
        log::set_max_level(logger.level);
    }
}

impl Log for StderrLogger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= self.level
    }

    fn log(&self, r: &Record) {
        if !self.enabled(r.metadata()) {
            return;
        }
        let line = match r.level() {
            Level::Error => format!("stasis: error: {}\n", r.args()),
            Level::Warn => format!("stasis: warning: {}\n", r.args()),
            Level::Info => format!("stasis: {}\n", r.args()),
            // Detail for whoever debugs timing: seconds since start.
            lvl => {
                let t = self.start.elapsed().as_secs_f64();
                format!(
                    "stasis: [{t:.6}] {}: {}\n",
                    lvl.as_str().to_lowercase(),
                    r.args()
                )
            }
        };
        // One write per record so that lines from several processes sharing stderr stay
        // whole.
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verbosity_levels() {
        assert_eq!(level_for(0), LevelFilter::Warn);
        assert_eq!(level_for(1), LevelFilter::Info);
        assert_eq!(level_for(9), LevelFilter::Trace);
    }
}
