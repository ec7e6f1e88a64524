//! Children that do not outlive their parent.

use std::{io, os::unix::process::CommandExt, process::Command};

/// Makes the kernel send `signal` to the child when the spawning *thread* exits (that is how
/// `PR_SET_PDEATHSIG` works): a supervisor killed or panicking leaves no process behind. Use it
/// from a thread that lives as long as the process (the main thread, or a runtime worker).
#[allow(unsafe_code)]
pub fn die_with_parent(cmd: &mut Command, signal: i32) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the forked child before exec. It only calls prctl(2) and
    // getppid(2), which are async-signal-safe, and builds io::Errors from raw codes, which
    // does not allocate; it touches no locks or shared state of the parent.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // The parent may have died between fork and prctl; then nobody would signal us.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}
