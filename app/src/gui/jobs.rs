//! Background jobs. Anything that can take longer than a frame (resolving or downloading a model, loading it,
//! calibrating and compressing, evaluating, waiting on a file dialog) runs on its own thread. The thread owns its
//! inputs, sends typed events through a channel, polls a shared cancel flag at safe points, and wakes the UI with
//! `request_repaint` after every event. The UI drains the channel with `try_recv` at the start of a frame and never
//! waits on the thread, so a frame costs the same whether a job runs or not.
//!
//! Job threads, and the rayon pool each job gets for its parallel work, run at a lower scheduling priority (nice
//! 10 on Linux): the work still uses every core, but the UI thread is scheduled first whenever it has a frame to
//! build, which is what keeps frames short while all cores are busy.
//!
//! A panic inside a job is caught and reported as the job's failure: the window keeps running and says what broke.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// The sending half a job's thread holds.
pub struct Sink<E> {
    tx: Sender<E>,
    cancel: Arc<AtomicBool>,
    ctx: eframe::egui::Context,
}

impl<E> Sink<E> {
    /// Sends an event and asks for a frame so the UI shows it promptly.
    pub fn send(&self, event: E) {
        // The receiver is gone only when the UI dropped the job; the event has nobody left to inform.
        let _ = self.tx.send(event);
        self.ctx.request_repaint();
    }

    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }
}

/// How a job's thread ended, once it has.
#[derive(Debug, PartialEq)]
pub enum Ended {
    /// The thread returned (its last event says whether the work succeeded).
    Returned,
    /// The thread panicked; the message is what the panic said.
    Panicked(String),
}

pub struct Job<E> {
    /// What the job does, for the status bar ("Compressing w4g32").
    pub label: String,
    pub started: Instant,
    rx: Receiver<E>,
    cancel: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
}

impl<E: Send + 'static> Job<E> {
    /// Starts `work` on a new thread.
    pub fn spawn(label: impl Into<String>, ctx: &eframe::egui::Context, work: impl FnOnce(&Sink<E>) + Send + 'static) -> Self {
        let (tx, rx) = channel();
        let cancel = Arc::new(AtomicBool::new(false));
        let sink = Sink { tx, cancel: cancel.clone(), ctx: ctx.clone() };
        let label = label.into();
        let handle = std::thread::Builder::new()
            .name(format!("whittle-job: {label}"))
            .spawn(move || {
                lower_priority();
                let outcome = catch_unwind(AssertUnwindSafe(|| in_background_pool(|| work(&sink))));
                // Wake the UI once more so it notices the thread has ended even if the last event was consumed.
                sink.ctx.request_repaint();
                if let Err(payload) = outcome {
                    std::panic::resume_unwind(payload);
                }
            })
            .ok();
        Job { label, started: Instant::now(), rx, cancel, handle }
    }
}

impl<E> Job<E> {
    /// Asks the job to stop at its next safe point.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelling(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// The events sent since the last poll, and whether the thread has ended. The end is checked before draining,
    /// so once `Some` is returned every event the thread sent is in the list.
    pub fn poll(&mut self) -> (Vec<E>, Option<Ended>) {
        let finished = self.handle.as_ref().is_none_or(|h| h.is_finished());
        let events: Vec<E> = std::iter::from_fn(|| self.rx.try_recv().ok()).collect();
        if !finished {
            return (events, None);
        }
        let ended = match self.handle.take().map(JoinHandle::join) {
            None => Ended::Panicked("the job's thread could not be started".into()),
            Some(Ok(())) => Ended::Returned,
            Some(Err(payload)) => Ended::Panicked(panic_message(payload.as_ref())),
        };
        (events, Some(ended))
    }
}

/// Runs `work` inside a rayon pool of low-priority threads, so the core functions' parallel loops (which use the
/// current pool) never compete with the UI thread on equal terms.
fn in_background_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    let pool = rayon::ThreadPoolBuilder::new()
        .thread_name(|i| format!("whittle-worker-{i}"))
        .start_handler(|_| lower_priority())
        .build();
    match pool {
        Ok(pool) => pool.install(work),
        Err(_) => work(),
    }
}

/// Lowers the calling thread's priority by 10 nice levels (at most to 19). On Linux the nice value is per thread,
/// so this leaves the UI thread as is; elsewhere it would apply to the whole process, so it is not done there.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: getpriority/setpriority take plain integers and only read or change the calling thread's nice value.
    unsafe {
        let current = libc::getpriority(libc::PRIO_PROCESS, 0);
        libc::setpriority(libc::PRIO_PROCESS, 0, (current + 10).min(19));
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait<E>(job: &mut Job<E>) -> (Vec<E>, Ended) {
        let mut all = Vec::new();
        let start = Instant::now();
        loop {
            let (events, ended) = job.poll();
            all.extend(events);
            if let Some(e) = ended {
                return (all, e);
            }
            assert!(start.elapsed().as_secs() < 10, "job did not end");
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    #[test]
    fn events_arrive_in_order_and_the_end_is_seen_after_all_of_them() {
        let ctx = eframe::egui::Context::default();
        let mut job = Job::spawn("count", &ctx, |s: &Sink<usize>| (0..100).for_each(|i| s.send(i)));
        let (events, ended) = wait(&mut job);
        assert_eq!(events, (0..100).collect::<Vec<_>>());
        assert_eq!(ended, Ended::Returned);
    }

    #[test]
    fn cancel_is_seen_by_the_thread() {
        let ctx = eframe::egui::Context::default();
        let mut job = Job::spawn("spin", &ctx, |s: &Sink<&'static str>| {
            while !s.cancelled() {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            s.send("stopped");
        });
        job.cancel();
        assert_eq!(wait(&mut job).0, vec!["stopped"]);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn work_runs_below_the_ui_threads_priority() {
        // SAFETY: getpriority only reads the calling thread's nice value.
        let nice = || unsafe { libc::getpriority(libc::PRIO_PROCESS, 0) };
        let ui = nice();
        let ctx = eframe::egui::Context::default();
        let mut job = Job::spawn("nice", &ctx, move |s: &Sink<(i32, Vec<i32>)>| {
            let workers = rayon::broadcast(|_| nice());
            s.send((nice(), workers));
        });
        let (events, _) = wait(&mut job);
        let (job_nice, workers) = &events[0];
        // A process already at the lowest priority (19) has nothing left to lower.
        let lower = |n: i32| n > ui || ui == 19;
        assert!(lower(*job_nice), "job thread {job_nice} vs ui {ui}");
        assert!(workers.iter().all(|w| lower(*w)), "rayon workers {workers:?} vs ui {ui}");
        assert_eq!(nice(), ui, "the calling thread keeps its priority");
    }

    #[test]
    fn a_panic_becomes_a_failure_not_a_crash() {
        let ctx = eframe::egui::Context::default();
        let mut job = Job::spawn("boom", &ctx, |_: &Sink<()>| panic!("kaboom"));
        assert_eq!(wait(&mut job).1, Ended::Panicked("kaboom".into()));
    }
}
