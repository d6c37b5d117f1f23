//! The engine thread: owns the model's [`Batch`] and runs it step by step while sequences are running.
//! Requests join between steps (continuous batching); each request's tokens go back through its own
//! channel, and a request whose channel closed (the client went away) is cancelled at the next step.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use herd_runtime::{Batch, BatchEvent, GenerateParams, Model, SequenceId, StopReason};
use tokio::sync::mpsc::UnboundedSender;

use super::metrics::Metrics;

/// What a request hears back.
#[derive(Debug)]
pub enum Event {
    Token(i64),
    Done(StopReason),
    Failed(String),
}

/// One generation to run.
pub struct Job {
    pub ids: Vec<i64>,
    pub features: Vec<f32>,
    pub params: GenerateParams,
    pub events: UnboundedSender<Event>,
}

/// The queue was full.
#[derive(Debug)]
pub struct Busy;

/// Where handlers submit jobs.
#[derive(Clone)]
pub struct Engine {
    jobs: mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    max_queue: usize,
}

impl Engine {
    /// Starts the engine thread over `model` with `slots` rows in `micro_batches` groups; at most
    /// `max_queue` jobs wait for a slot.
    pub fn start(
        model: Arc<Model>,
        slots: usize,
        micro_batches: usize,
        max_queue: usize,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Engine> {
        // Allocate the cache here, so that a context too large for memory fails at startup.
        let (jobs, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread_queued = queued.clone();
        std::thread::Builder::new()
            .name("herd-engine".into())
            .spawn(move || {
                let batch = match Batch::with_micro_batches(&model, slots, micro_batches) {
                    Ok(b) => {
                        let _ = ready_tx.send(Ok(()));
                        b
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                run(batch, slots, rx, thread_queued, metrics);
            })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the engine thread ended at startup"))??;
        Ok(Engine {
            jobs,
            queued,
            max_queue,
        })
    }

    /// Queues `job`, or refuses it when `max_queue` jobs already wait.
    pub fn submit(&self, job: Job) -> Result<(), Busy> {
        let before = self.queued.fetch_add(1, Ordering::SeqCst);
        if before >= self.max_queue {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy);
        }
        self.jobs.send(job).map_err(|_| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
            Busy
        })
    }
}

struct Running {
    events: UnboundedSender<Event>,
    started: Instant,
    first_token: bool,
}

fn run(
    mut batch: Batch<'_>,
    slots: usize,
    jobs: mpsc::Receiver<Job>,
    queued: Arc<AtomicUsize>,
    metrics: Arc<Metrics>,
) {
    let mut waiting: VecDeque<Job> = VecDeque::new();
    let mut running: HashMap<SequenceId, Running> = HashMap::new();
    let mut open = true;
    loop {
        if batch.is_idle() && waiting.is_empty() {
            metrics.set_load(0, 0, slots);
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(job) => waiting.push_back(job),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(job) => waiting.push_back(job),
                Err(mpsc::TryRecvError::Empty) => break,
                Err(mpsc::TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        while batch.free_slots() > 0 {
            let Some(job) = waiting.pop_front() else {
                break;
            };
            queued.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                continue;
            }
            match batch.add(job.ids, job.features, job.params) {
                Ok(id) => {
                    running.insert(
                        id,
                        Running {
                            events: job.events,
                            started: Instant::now(),
                            first_token: true,
                        },
                    );
                }
                Err(e) => {
                    let _ = job.events.send(Event::Failed(e.to_string()));
                }
            }
        }
        // Clients that went away.
        let gone: Vec<SequenceId> = running
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            batch.cancel(id);
        }
        metrics.set_load(waiting.len(), running.len(), slots);
        match batch.step() {
            Ok(events) => {
                for event in events {
                    route(event, &mut running, &metrics);
                }
            }
            Err(e) => {
                // A failed call leaves no row in a known state: end them all with the reason.
                let message = e.to_string();
                for (id, r) in running.drain() {
                    batch.cancel(id);
                    let _ = r.events.send(Event::Failed(message.clone()));
                }
                let _ = batch.step();
            }
        }
    }
}

fn route(event: BatchEvent, running: &mut HashMap<SequenceId, Running>, metrics: &Metrics) {
    match event {
        BatchEvent::Token { sequence, id, .. } => {
            if let Some(r) = running.get_mut(&sequence) {
                if r.first_token {
                    r.first_token = false;
                    metrics.time_to_first_token(r.started.elapsed());
                }
                metrics.generated_tokens(1);
                let _ = r.events.send(Event::Token(id));
            }
        }
        BatchEvent::Finished {
            sequence, reason, ..
        } => {
            if let Some(r) = running.remove(&sequence) {
                let _ = r.events.send(Event::Done(reason));
            }
        }
    }
}
