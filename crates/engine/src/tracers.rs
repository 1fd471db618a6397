//! The tracer threads of a dump.
//!
//! ptrace requests must come from the thread that seized a tracee, and most of a dump's
//! time goes in waiting for tracee stops. So the processes of a tree are shared out
//! among a few tracer threads: each one seizes its processes, runs their injected calls
//! and reads their state, and keeps them frozen until it releases or kills them. Work
//! reaches a tracer as a job on its channel.
//!
//! A tracer whose channel closes (the dump ended, by error or not) drops the processes
//! it still holds, and the freeze guard lets each of them run on as before. Dropping
//! [`Tracers`] waits for that, so no process is left frozen once a dump returns.

use crate::error::{Error, Result};
use crate::freeze::Frozen;
use stasis_sys::Pid;
use std::sync::mpsc;
use std::thread::JoinHandle;

/// The frozen processes of one tracer thread, in the order it froze them.
pub(crate) type Held = Vec<Frozen>;

type Job = Box<dyn FnOnce(&mut Held) + Send>;

/// At most this many tracer threads: the work is mostly waiting for tracee stops, so a
/// few more than the CPUs still help.
const MAX_TRACERS: usize = 8;

/// How many tracer threads a dump or restore uses at most: `STASIS_TRACERS` from the
/// environment, else twice the CPUs, within 1..=8.
pub(crate) fn count() -> usize {
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let n = std::env::var("STASIS_TRACERS").ok().and_then(|v| v.parse().ok()).unwrap_or(2 * cpus);
    n.clamp(1, MAX_TRACERS)
}

struct Worker {
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

pub(crate) struct Tracers {
    workers: Vec<Worker>,
    max: usize,
}

impl Tracers {
    /// No thread is started before it gets work.
    pub(crate) fn new() -> Tracers {
        Tracers { workers: Vec::new(), max: count() }
    }

    /// How many tracer threads there may be.
    pub(crate) fn max(&self) -> usize {
        self.max
    }

    /// How many tracer threads run.
    pub(crate) fn started(&self) -> usize {
        self.workers.len()
    }

    /// Runs `job` on tracer `w` (below [`Tracers::max`]), with the processes it holds.
    pub(crate) fn run(&mut self, w: usize, job: impl FnOnce(&mut Held) + Send + 'static) -> Result<()> {
        while self.workers.len() <= w {
            let (tx, rx) = mpsc::channel::<Job>();
            let handle = std::thread::Builder::new()
                .name(format!("tracer-{}", self.workers.len()))
                .spawn(move || {
                    // Its short naps while a thread reaches its stop end on time (the
                    // default slack adds 50 µs to each).
                    let _ = stasis_sys::proc::set_timer_slack(1);
                    let mut held = Held::new();
                    for job in rx {
                        job(&mut held);
                    }
                })
                .map_err(|e| Error::Sys { pid: stasis_sys::proc::getpid(), op: "start a tracer thread", errno: stasis_sys::Errno(e.raw_os_error().unwrap_or(libc::EAGAIN)) })?;
            self.workers.push(Worker { tx: Some(tx), handle: Some(handle) });
        }
        let sent = self.workers[w].tx.as_ref().map(|tx| tx.send(Box::new(job)).is_ok()).unwrap_or(false);
        match sent {
            true => Ok(()),
            false => Err(Error::TracerLost),
        }
    }

    /// Runs `job` on every started tracer at once and returns the first error.
    fn on_all(&mut self, job: impl Fn(&mut Held) -> Result<()> + Send + Sync + Clone + 'static) -> Result<()> {
        let (tx, rx) = mpsc::channel::<Result<()>>();
        for w in 0..self.started() {
            let (job, tx) = (job.clone(), tx.clone());
            self.run(w, move |held| {
                let _ = tx.send(job(held));
            })?;
        }
        drop(tx);
        let mut first = Ok(());
        let mut answers = 0;
        for r in rx {
            answers += 1;
            first = first.and(r);
        }
        match answers == self.started() {
            true => first,
            false => first.and(Err(Error::TracerLost)),
        }
    }

    /// Lets every process run on, registers and signal masks as they were.
    pub(crate) fn release_all(mut self) -> Result<()> {
        self.on_all(|held| {
            let mut first = Ok(());
            for f in held.drain(..) {
                first = first.and(f.release());
            }
            first
        })
    }

    /// Kills every process first, then each tracer collects the exits of its own, in
    /// whatever order they come (see Frozen::reap_killed): a PID namespace's init ends
    /// only after every other task of its namespace is gone, and as their tracer we must
    /// collect those first (the tracers do so at the same time, so one waiting for an
    /// init does not hold up the others).
    pub(crate) fn kill_all(mut self, pids: &[Pid]) -> Result<()> {
        // Every one, whatever fails: a tree killed halfway helps nobody.
        let mut first = Ok(());
        for &pid in pids {
            first = first.and(stasis_sys::proc::kill(pid, libc::SIGKILL).map_err(Error::sys(pid, "kill")));
        }
        first.and(self.on_all(|held| Frozen::reap_killed(std::mem::take(held))))
    }
}

impl Drop for Tracers {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx = None;
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

/// The answer of one job, keyed by `idx`: sent once by [`Answer::send`], or, if the job
/// ends without sending (it panicked), as [`Error::TracerLost`] when the job is dropped,
/// so that whoever counts answers is never left waiting.
pub(crate) struct Answer<T> {
    idx: usize,
    tx: Option<mpsc::Sender<(usize, Result<T>)>>,
}

impl<T> Answer<T> {
    pub(crate) fn new(idx: usize, tx: mpsc::Sender<(usize, Result<T>)>) -> Answer<T> {
        Answer { idx, tx: Some(tx) }
    }

    pub(crate) fn send(mut self, r: Result<T>) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.idx, r));
        }
    }
}

impl<T> Drop for Answer<T> {
    fn drop(&mut self) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send((self.idx, Err(Error::TracerLost)));
        }
    }
}

/// The frozen process `pid` among those a tracer holds.
pub(crate) fn held(held: &mut Held, pid: Pid) -> Result<&mut Frozen> {
    held.iter_mut().find(|f| f.pid == pid).ok_or(Error::TracerLost)
}
