//! The PID file, replaced atomically so that it always names a live process.
//!
//! Written by the generation that becomes ready, before it tells its parent
//! (so a supervisor that re-reads it when the old main process exits finds
//! the new one): write a temporary file beside it, fsync, rename over the
//! old one, fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use std::path::PathBuf;
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys::ProcessId;

/// Replaces the PID file at `path` with `pid`.
pub(crate) fn write(path: &Path, pid: i32) -> Result<()> {
    write_inner(path, pid).map_err(|source| Error::PidFile {
        path: path.to_path_buf(),
        source,
    })
}

fn write_inner(path: &Path, pid: i32) -> io::Result<()> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"))?;
    let mut temporary_name = std::ffi::OsString::from(".");
    temporary_name.push(file_name);
    temporary_name.push(format!(".{pid}.tmp"));
    let temporary = dir.join(temporary_name);

    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(&temporary)?;
        writeln!(file, "{pid}")?;
        file.sync_all()?;
        fs::rename(&temporary, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// What the PID file must name when this process exits: its successor.
static AT_EXIT: Mutex<Option<(PathBuf, i32)>> = Mutex::new(None);
static HOOK: Once = Once::new();

/// Names `successor` in the PID file at `path` as this process's last act,
/// when it exits, and not before.
///
/// Why so late: a service manager that reads the file while this process
/// still runs (systemd does when an `ExecReload=` command ends) would take
/// the successor, which is this process's child until this one exits, and
/// not its own, for the main process, and lose track of it ("Supervising
/// process N which is not our child"). Read when this process has exited,
/// the successor is the manager's child (it adopts orphans), and the file
/// names it. The successor writes the file itself if this process dies
/// without exiting (a signal), when it sees the handshake link close.
pub(crate) fn name_at_exit(path: &Path, successor: i32) {
    *AT_EXIT.lock().unwrap_or_else(|p| p.into_inner()) = Some((path.to_path_buf(), successor));
    HOOK.call_once(|| {
        if let Err(error) = crate::sys::at_exit(write_at_exit) {
            tracing::error!(%error, "cannot arrange to name the successor in the PID file at exit");
        }
    });
}

/// Processes whose end must come before the file changes at exit; see
/// [`wait_at_exit_for`].
static WAIT_FOR: Mutex<Vec<ProcessId>> = Mutex::new(Vec::new());

/// How long the exit waits for them, at most.
const WAIT_AT_EXIT: Duration = Duration::from_secs(5);

/// Before naming the successor at exit, wait until `sender` has been
/// reaped. It sent the upgrade signal and is this process's sibling: an
/// `ExecReload=/bin/kill -HUP $MAINPID` of systemd, which reads the PID
/// file when it handles that command's end and reaps it right after. So
/// the file must not change between this process's last act and the
/// kernel's handing the successor to systemd while systemd has yet to
/// handle that end: usually long done after a drain, but not after an
/// instant one on a loaded machine (seen under `ci/systemd.sh`).
pub(crate) fn wait_at_exit_for(sender: ProcessId) {
    let mut wait_for = WAIT_FOR.lock().unwrap_or_else(|p| p.into_inner());
    wait_for.retain(|process| !crate::sys::is_reaped(*process));
    wait_for.push(sender);
}

/// The successor died before this process exited: the file must not name
/// a dead process.
pub(crate) fn forget_at_exit(successor: i32) {
    let mut at_exit = AT_EXIT.lock().unwrap_or_else(|p| p.into_inner());
    if at_exit.as_ref().is_some_and(|(_, pid)| *pid == successor) {
        *at_exit = None;
    }
}

extern "C" fn write_at_exit() {
    // Nothing may unwind into libc's exit.
    let _ = std::panic::catch_unwind(|| {
        let Some((path, successor)) = AT_EXIT.lock().unwrap_or_else(|p| p.into_inner()).take()
        else {
            return;
        };
        wait_for_reload_commands();
        if let Err(error) = write(&path, successor) {
            tracing::error!(%error, successor, "cannot name the successor in the PID file");
        }
    });
}

/// Waits (boundedly) until every process noted by [`wait_at_exit_for`] has
/// been reaped. No event tells of another process's reaping, so this looks
/// at `/proc` with a short backoff; it runs once, at exit, and rarely finds
/// anything to wait for.
fn wait_for_reload_commands() {
    let wait_for = std::mem::take(&mut *WAIT_FOR.lock().unwrap_or_else(|p| p.into_inner()));
    let deadline = Instant::now() + WAIT_AT_EXIT;
    let mut pause = Duration::from_micros(200);
    for process in wait_for {
        while !crate::sys::is_reaped(process) {
            if Instant::now() >= deadline {
                tracing::warn!(
                    pid = process.pid,
                    "the process that asked for the upgrade still runs: naming the successor in the PID file all the same"
                );
                return;
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }
}

/// The pid the file names, if it can be read.
pub(crate) fn read(path: &Path) -> Option<i32> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.pid");
        write(&path, 41).unwrap();
        write(&path, 42).unwrap();
        assert_eq!(fs::read_to_string(&path).unwrap(), "42\n");
        assert_eq!(read(&path), Some(42));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn a_missing_directory_is_a_pid_file_error_naming_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing/service.pid");
        let err = write(&path, 1).unwrap_err();
        assert_eq!(err.reason(), "pid_file");
        assert!(err.to_string().contains("missing/service.pid"), "{err}");
    }
}
