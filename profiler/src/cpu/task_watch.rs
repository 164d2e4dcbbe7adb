//! Task events read on a thread of their own, which also reads a process's
//! mappings the moment it execs.
//!
//! The session loop drains counts, builds unwind tables and unwinds stack
//! copies; on a busy host one of those steps can take longer than a
//! short-lived program lives. Read there, its exec event would come after its
//! `/proc/PID/maps` is gone, and none of its addresses could be named. This
//! thread only polls the ring buffer and reads maps, so the mappings are
//! caught within milliseconds and kept by [`crate::process::remember_maps`]
//! for the symbolizer.

use std::{
    os::fd::AsRawFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use aya::maps::{MapData, RingBuf};
use profiler_common::cpu::{TASK_EXEC, TaskEvent};
use tokio::sync::mpsc;

use super::sampler;
use crate::process;

/// After an exec, the mappings are read again after these delays: the
/// loader maps the libraries only after the exec event.
const REREADS: [Duration; 3] = [
    Duration::from_millis(5),
    Duration::from_millis(30),
    Duration::from_millis(150),
];
/// The longest the thread sleeps before it looks at the stop flag.
const POLL_MAX: Duration = Duration::from_millis(100);

/// The thread that reads the task events (see the module docs).
pub(crate) struct TaskWatch {
    events: mpsc::UnboundedReceiver<Vec<TaskEvent>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl TaskWatch {
    /// Starts reading `ring`.
    pub(crate) fn start(ring: RingBuf<MapData>) -> anyhow::Result<Self> {
        let (sender, events) = mpsc::unbounded_channel();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("task-events".into())
            .spawn(move || watch(ring, &sender, &stopping))?;
        Ok(Self {
            events,
            stop,
            thread: Some(thread),
        })
    }

    /// The next batch of events (cancel-safe). Pends forever once the
    /// thread is gone.
    pub(crate) async fn next(&mut self) -> Vec<TaskEvent> {
        match self.events.recv().await {
            Some(events) => events,
            None => std::future::pending().await,
        }
    }

    /// Stops the thread after its last read and returns every event not
    /// taken yet.
    pub(crate) fn finish(&mut self) -> Vec<TaskEvent> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let mut events = Vec::new();
        while let Ok(batch) = self.events.try_recv() {
            events.extend(batch);
        }
        events
    }
}

impl Drop for TaskWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The thread's loop: waits for events (or the next re-read), catches the
/// mappings of new programs and passes the events on.
fn watch(
    mut ring: RingBuf<MapData>,
    sender: &mpsc::UnboundedSender<Vec<TaskEvent>>,
    stop: &AtomicBool,
) {
    let mut rereads: Vec<(Instant, u32)> = Vec::new();
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if !stopping {
            let now = Instant::now();
            let wait = rereads
                .iter()
                .map(|(at, _)| at.saturating_duration_since(now))
                .min()
                .unwrap_or(POLL_MAX)
                .min(POLL_MAX);
            wait_readable(&ring, wait);
        }
        let events = sampler::task_events(&mut ring);
        let now = Instant::now();
        for event in events.iter().filter(|e| e.kind == TASK_EXEC) {
            process::remember_maps(event.pid);
            rereads.extend(REREADS.iter().map(|d| (now + *d, event.pid)));
        }
        rereads.retain(|&(at, pid)| {
            if at > now {
                return true;
            }
            process::remember_maps(pid);
            false
        });
        if !events.is_empty() && sender.send(events).is_err() {
            return;
        }
        if stopping {
            return;
        }
    }
}

/// Sleeps until `ring` has data or `timeout` passes.
fn wait_readable(ring: &RingBuf<MapData>, timeout: Duration) {
    let mut fd = libc::pollfd {
        fd: ring.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
    // SAFETY: one valid pollfd for the duration of the call. An error
    // (EINTR) only ends the wait early.
    unsafe { libc::poll(&mut fd, 1, ms) };
}
