//! How a started engine process tells its starter it serves: one line,
//! `ready`, on its stdout. The node plugin waits for it from the supervisor,
//! the supervisor from each worker.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

/// Whether `child` prints `ready` on its (piped) stdout within `timeout`.
pub fn says_ready(child: &mut Child, timeout: Duration) -> bool {
    let Some(stdout) = child.stdout.take() else {
        return false;
    };
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = BufReader::new(stdout).read_line(&mut line);
        let _ = tx.send(line);
    });
    rx.recv_timeout(timeout).unwrap_or_default().trim() == "ready"
}
