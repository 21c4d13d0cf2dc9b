//! The engine's upkeep, one round at a time: what the engine process runs
//! every second while it serves, and background repair runs while an
//! unstaged volume gets somewhere. Each caller keeps its own pace.

use super::Engine;

impl Engine {
    /// Makes the healthy replicas agree where the last engine had writes in
    /// flight, faults replicas that are gone, replaces those lost past their
    /// grace period, lets reachable ones catch up, and unlists idle extents
    /// from the write log. `none_healthy` runs as
    /// soon as the check leaves no healthy replica, before the slower
    /// replacing and copying. Returns whether more replicas are healthy
    /// than before the round.
    pub fn maintain(&self, none_healthy: impl FnOnce()) -> bool {
        let before = self.healthy_count();
        self.resync_step();
        self.check_replicas();
        if self.healthy_count() == 0 {
            none_healthy();
        }
        self.replace_lost();
        self.catch_up();
        self.sweep_write_log(super::in_flight::IDLE);
        self.healthy_count() > before
    }
}
