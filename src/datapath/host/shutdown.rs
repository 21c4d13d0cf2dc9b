//! The signals that ask a role to stop (SIGTERM from the kubelet or a
//! rolling update, SIGINT from a terminal).

/// Resolves when SIGTERM or SIGINT arrives; never, if the handlers cannot
/// be installed (the process then stops the way it always could, by kill).
pub async fn requested() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
