//! The engine's own thread: the only place model work happens once the server runs. HTTP
//! handlers send it [`Job`]s over a channel; it queues them, admits them into free slots of the
//! [`peftrt::Engine`], steps the engine, and sends each request's text and end back over the
//! request's own channel. A request whose channel is closed (the client went away) is cancelled
//! before the next step, which frees its slot.

use crate::metrics::Metrics;
use peftrt::engine::{Engine, Event, Request, RequestId};
use peftrt::{Generation, StopReason};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedSender;

/// What a request's handler receives.
pub enum Out {
    /// More of the reply.
    Text(String),
    /// The end: the reply, or the error that ended it.
    Done(peftrt::Result<Generation>),
}

/// A request for the engine.
pub struct Job {
    pub request: Request,
    pub events: UnboundedSender<Out>,
    /// When the HTTP request arrived (time to first token counts from here).
    pub arrived: Instant,
}

pub enum Command {
    /// Boxed: a job (its compiled constraint) is large beside the other commands.
    Submit(Box<Job>),
    /// Cancel every request, running or waiting (a shutdown whose grace period ran out).
    CancelAll,
    /// Cancel everything and end the thread.
    Stop,
}

/// The handlers' side of the engine thread.
pub struct Worker {
    tx: mpsc::Sender<Command>,
    /// Requests sent and not yet ended (waiting or running).
    pub in_flight: Arc<AtomicUsize>,
    thread: std::sync::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Worker {
    /// Starts the thread that owns `engine`.
    pub fn start(engine: Engine, metrics: Arc<Metrics>) -> std::io::Result<Worker> {
        let (tx, rx) = mpsc::channel();
        let in_flight = Arc::new(AtomicUsize::new(0));
        let n = in_flight.clone();
        metrics.max_sequences.store(engine.max_sequences() as u64, Relaxed);
        let thread =
            std::thread::Builder::new().name("peftrt-engine".into()).spawn(move || run(engine, rx, metrics, n))?;
        Ok(Worker { tx, in_flight, thread: std::sync::Mutex::new(Some(thread)) })
    }

    /// Hands a job to the engine thread, its place already taken in `in_flight`
    /// ([`crate::AppState::reserve_slot`]); `false` (and the place given back) if the thread has ended.
    pub fn submit(&self, job: Job) -> bool {
        let sent = self.tx.send(Command::Submit(Box::new(job))).is_ok();
        if !sent {
            self.in_flight.fetch_sub(1, Relaxed);
        }
        sent
    }

    /// Whether the engine thread still runs (it ends only on [`Worker::stop`], or by a panic).
    pub fn alive(&self) -> bool {
        self.thread.lock().ok().is_some_and(|t| t.as_ref().is_some_and(|h| !h.is_finished()))
    }

    pub fn cancel_all(&self) {
        let _ = self.tx.send(Command::CancelAll);
    }

    /// Cancels everything, ends the thread and waits for it.
    pub fn stop(&self) {
        let _ = self.tx.send(Command::Stop);
        let handle = self.thread.lock().ok().and_then(|mut t| t.take());
        if let Some(h) = handle {
            if h.join().is_err() {
                log::error!("the engine thread panicked");
            }
        }
    }
}

struct Running {
    events: UnboundedSender<Out>,
    arrived: Instant,
    first_token: bool,
}

fn run(mut engine: Engine, rx: mpsc::Receiver<Command>, metrics: Arc<Metrics>, in_flight: Arc<AtomicUsize>) {
    let mut waiting: VecDeque<Box<Job>> = VecDeque::new();
    let mut running: HashMap<RequestId, Running> = HashMap::new();
    let mut stopping = false;
    // A waiting request cancelled by a shutdown ends as a running one does: stop `Cancelled`.
    let cancelled = |job: &Job| {
        Out::Done(Ok(Generation {
            tokens: Vec::new(),
            text: String::new(),
            stop: StopReason::Cancelled,
            prompt_tokens: job.request.prompt.len(),
            prefill_time: Duration::ZERO,
            decode_time: Duration::ZERO,
        }))
    };
    loop {
        let idle = engine.active() == 0 && waiting.is_empty();
        if idle && stopping {
            break;
        }
        // Nothing to do: sleep until a command comes.
        let first = if idle {
            match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => break,
            }
        } else {
            None
        };
        for cmd in first.into_iter().chain(std::iter::from_fn(|| rx.try_recv().ok())) {
            match cmd {
                Command::Submit(job) if stopping => {
                    let _ = job.events.send(cancelled(&job));
                    in_flight.fetch_sub(1, Relaxed);
                    metrics.requests_cancelled.fetch_add(1, Relaxed);
                }
                Command::Submit(job) => waiting.push_back(job),
                Command::CancelAll | Command::Stop => {
                    stopping |= matches!(cmd, Command::Stop);
                    for job in waiting.drain(..) {
                        let _ = job.events.send(cancelled(&job));
                        in_flight.fetch_sub(1, Relaxed);
                        metrics.requests_cancelled.fetch_add(1, Relaxed);
                    }
                    for &id in running.keys() {
                        let _ = engine.cancel(id);
                    }
                }
            }
        }
        // Requests whose client left are dropped from the queue and cancelled in the engine.
        waiting.retain(|job| {
            let keep = !job.events.is_closed();
            if !keep {
                in_flight.fetch_sub(1, Relaxed);
                metrics.requests_cancelled.fetch_add(1, Relaxed);
            }
            keep
        });
        for (&id, r) in &running {
            if r.events.is_closed() {
                let _ = engine.cancel(id);
            }
        }
        // Admit waiting requests, oldest first, into free slots.
        while engine.active() < engine.max_sequences() {
            let Some(job) = waiting.pop_front() else { break };
            let Job { request, events, arrived } = *job;
            let prompt = request.prompt.len();
            match engine.submit(request) {
                Ok(id) => {
                    running.insert(id, Running { events, arrived, first_token: false });
                }
                Err(e) => {
                    metrics.requests_failed.fetch_add(1, Relaxed);
                    metrics.prompt_tokens.fetch_add(prompt as u64, Relaxed);
                    let _ = events.send(Out::Done(Err(e)));
                    in_flight.fetch_sub(1, Relaxed);
                }
            }
        }
        metrics.queue_depth.store(waiting.len() as u64, Relaxed);
        metrics.active.store(engine.active() as u64, Relaxed);
        if engine.active() == 0 {
            continue;
        }
        metrics.observe_batch(engine.active());
        engine.step(|ev| match ev {
            Event::Text { id, text } => {
                running.get(&id).is_some_and(|r| r.events.send(Out::Text(text.to_string())).is_ok())
            }
            Event::Logits { id, .. } => {
                if let Some(r) = running.get_mut(&id) {
                    if !r.first_token {
                        r.first_token = true;
                        metrics.observe_ttft(r.arrived.elapsed().as_secs_f64());
                    }
                }
                true
            }
            Event::Done { id, result } => {
                let outcome = match &result {
                    Ok(g) if g.stop == StopReason::Cancelled => &metrics.requests_cancelled,
                    Ok(_) => &metrics.requests_ok,
                    Err(_) => &metrics.requests_failed,
                };
                outcome.fetch_add(1, Relaxed);
                if let Ok(g) = &result {
                    metrics.prompt_tokens.fetch_add(g.prompt_tokens as u64, Relaxed);
                    metrics.generated_tokens.fetch_add(g.tokens.len() as u64, Relaxed);
                }
                if let Some(r) = running.remove(&id) {
                    let _ = r.events.send(Out::Done(result));
                    in_flight.fetch_sub(1, Relaxed);
                }
                true
            }
        });
        metrics.active.store(engine.active() as u64, Relaxed);
    }
    metrics.queue_depth.store(0, Relaxed);
    metrics.active.store(0, Relaxed);
}
