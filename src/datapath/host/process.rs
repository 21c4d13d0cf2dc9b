//! Child processes that must not outlive the process that started them.

use std::os::unix::process::CommandExt;
use std::process::Command;

/// The child gets SIGKILL when this thread's process dies, however it dies.
pub fn die_with_parent(cmd: &mut Command) {
    // SAFETY: the closure runs between fork and exec, where only
    // async-signal-safe calls are allowed; prctl with integer arguments is
    // one, and the closure touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
