//! A fixed pool of threads that run replica I/O, so one request can go to
//! every replica at once without spawning threads per request.

use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, Sender};

type Job = Box<dyn FnOnce() + Send + 'static>;

pub struct Workers {
    sender: Option<Sender<Job>>,
    threads: Vec<JoinHandle<()>>,
}

impl Workers {
    pub fn new(name: &str, count: usize) -> std::io::Result<Workers> {
        let (sender, receiver) = crossbeam_channel::unbounded::<Job>();
        let mut threads = Vec::with_capacity(count);
        for i in 0..count {
            let receiver: Receiver<Job> = receiver.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .stack_size(256 * 1024)
                    .spawn(move || {
                        // Reclaim must not wait on the thread that completes its I/O;
                        // without the capability the pool still works.
                        let _ = crate::datapath::frontend::mark_io_flusher();
                        for job in receiver {
                            job();
                        }
                    })?,
            );
        }
        Ok(Workers {
            sender: Some(sender),
            threads,
        })
    }

    /// Runs `job` on a worker. Jobs sent after shutdown run on the caller.
    pub fn run(&self, job: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(job);
        match &self.sender {
            Some(s) => {
                if let Err(e) = s.send(job) {
                    (e.into_inner())();
                }
            }
            None => job(),
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.sender = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_concurrently_and_drop_joins() {
        let w = Workers::new("t", 4).unwrap();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(4));
        let (tx, rx) = crossbeam_channel::unbounded();
        for i in 0..4 {
            let barrier = barrier.clone();
            let tx = tx.clone();
            w.run(move || {
                barrier.wait();
                tx.send(i).unwrap();
            });
        }
        let mut got: Vec<i32> = (0..4).map(|_| rx.recv().unwrap()).collect();
        got.sort();
        assert_eq!(got, [0, 1, 2, 3]);
        drop(w);
    }
}
