//! The PID file, replaced atomically so that it always names a live process
//! that a service manager may adopt.
//!
//! Generation 0 writes it when it becomes ready; an old generation names
//! its successor in it when the upgrade commits, or, inside a systemd unit
//! where the successor is its own child, as its last act, when it exits
//! (see [`name_at_exit`]). Each write puts the pid into a new file beside it, created exclusively
//! under an unpredictable name (`O_EXCL|O_NOFOLLOW`, so never through a link
//! someone planted), which is then renamed over the old one. A reader sees
//! the old file or the new one, never a partial one.
//!
//! Nothing is fsynced: the rename alone is atomic for readers, and a PID
//! file has no use after a crash of the machine (every process it could
//! name is gone then), while an fsync behind a busy disk would put tens of
//! milliseconds on the handover's critical path.
//!
//! A directory that anyone may write to without the sticky bit is refused:
//! anyone could replace the PID file there, and whoever reads it would
//! signal the pid they chose.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use nix::libc;

use crate::error::{Error, Result};
use crate::sys::ProcessId;

/// Fresh temporary names tried before giving up: each is 64 random bits, so
/// a clash with an existing file is already unlikely once.
const ATTEMPTS: usize = 16;

/// Replaces the PID file at `path` with `pid`.
pub(crate) fn write(path: &Path, pid: i32) -> Result<()> {
    write_inner(path, pid, temporary_names(path)).map_err(|source| Error::PidFile {
        path: path.to_path_buf(),
        source,
    })
}

fn write_inner(
    path: &Path,
    pid: i32,
    temporary_names: impl Iterator<Item = PathBuf>,
) -> io::Result<()> {
    if path.file_name().is_none() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the path names no file",
        ));
    }
    check_directory(directory_of(path))?;
    let (temporary, mut file) = create_exclusive(temporary_names)?;
    // One write(2): the pid and its newline.
    let result = file
        .write_all(format!("{pid}\n").as_bytes())
        .and_then(|()| replace(&temporary, path));
    if result.is_err() {
        let _ = fs::remove_file(&temporary);
    }
    result
}

/// Puts the file at `temporary` in the place of `path`, atomically for
/// readers.
///
/// Linux: an existing file is exchanged with the new one, which is then
/// removed under its temporary name. A plain rename over an existing file
/// makes ext4 (its default `auto_da_alloc`) start writing the new file's
/// data out inside the rename, as a guard for programs that replace a file
/// without fsync: on this project's machine 0.6 ms median and 2-5 ms at p99
/// per replacement against 0.1 ms and 0.4-0.5 ms exchanged (200 of each),
/// on the critical path of every handover, for a file that has no use after
/// a crash. Where the exchange cannot be done (no file at `path` yet, a
/// file system or kernel without it), the rename does it.
fn replace(temporary: &Path, path: &Path) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    if crate::sys::exchange(temporary, path).is_ok() {
        // `temporary` names what `path` named before: the previous PID
        // file, which goes. Anything else (a directory) goes back where it
        // was, and the error is what the rename would have said.
        return fs::remove_file(temporary).inspect_err(|_| {
            let _ = crate::sys::exchange(temporary, path);
        });
    }
    fs::rename(temporary, path)
}

/// What the PID file must name when this process exits: its successor.
static AT_EXIT: Mutex<Option<(PathBuf, i32)>> = Mutex::new(None);
static HOOK: Once = Once::new();
/// The process that registered the hook.
static HOOK_PID: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

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
        HOOK_PID.get_or_init(crate::sys::pid);
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
/// instant one on a loaded machine (seen under a real systemd, `harness/tests/systemd.rs`).
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
    // Only in the process that registered it, not in a child forked from it
    // that calls exit(3): that one must not name anyone.
    if HOOK_PID.get() != Some(&crate::sys::pid()) {
        return;
    }
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

fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Refuses a directory in which anyone may replace another's file.
fn check_directory(dir: &Path) -> io::Result<()> {
    let mode = fs::metadata(dir)?.permissions().mode();
    let anyone_writes = mode & 0o002 != 0;
    let sticky = mode & 0o1000 != 0;
    if anyone_writes && !sticky {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "its directory {} is writable by anyone and not sticky, so anyone could replace it",
                dir.display()
            ),
        ));
    }
    Ok(())
}

/// `.NAME.RANDOM.tmp` beside the PID file, [`ATTEMPTS`] of them.
fn temporary_names(path: &Path) -> impl Iterator<Item = PathBuf> + '_ {
    let dir = directory_of(path);
    let file_name = path.file_name().unwrap_or_default();
    (0..ATTEMPTS).map(move |_| {
        let mut name = OsString::from(".");
        name.push(file_name);
        name.push(format!(".{:016x}.tmp", unpredictable()));
        dir.join(name)
    })
}

/// 64 bits nobody can guess: std seeds each `RandomState` from the
/// operating system's random source.
fn unpredictable() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Creates the first of `names` that does not exist yet, mode 0644, never
/// through a symbolic link (`O_EXCL` refuses any existing name, a link
/// included; `O_NOFOLLOW` says so twice).
fn create_exclusive(names: impl Iterator<Item = PathBuf>) -> io::Result<(PathBuf, File)> {
    let mut taken = 0;
    for name in names {
        let created = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&name);
        match created {
            Ok(file) => return Ok((name, file)),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => taken += 1,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AlreadyExists,
        format!("{taken} temporary names beside it were all taken"),
    ))
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

    /// What the rename over it refuses (a directory at the PID file's
    /// path) is refused, and the directory stays where it was.
    #[test]
    fn a_directory_at_the_path_is_an_error_and_stays() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.pid");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("inside"), "kept\n").unwrap();
        let err = write(&path, 42).unwrap_err();
        assert_eq!(err.reason(), "pid_file");
        assert_eq!(fs::read_to_string(path.join("inside")).unwrap(), "kept\n");
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "a temporary file is left"
        );
    }

    /// Readers see the old pid or the new one, never no file nor a partial
    /// one, while it is replaced over and over.
    #[test]
    fn a_reader_always_finds_a_whole_pid() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.pid");
        write(&path, 1_000_000).unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| {
                let mut reads = 0u32;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let text = fs::read_to_string(&path).expect("the PID file is always there");
                    let pid: i32 = text.trim().parse().expect("a whole pid");
                    assert!((1_000_000..1_002_000).contains(&pid), "{pid}");
                    reads += 1;
                }
                reads
            });
            for pid in 1_000_001..1_002_000 {
                write(&path, pid).unwrap();
            }
            done.store(true, std::sync::atomic::Ordering::Relaxed);
            assert!(reader.join().unwrap() > 0);
        });
        assert_eq!(read(&path), Some(1_001_999));
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

    /// The attack on a predictable temporary name: a link planted where the
    /// library used to write (`.NAME.PID.tmp`) must neither be written
    /// through nor become the PID file.
    #[test]
    fn a_link_planted_at_a_temporary_name_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.pid");
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let planted = dir.path().join(".service.pid.42.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();

        write(&path, 42).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(fs::symlink_metadata(&path).unwrap().file_type().is_file());
        assert_eq!(read(&path), Some(42));
    }

    /// A name that is taken (here by a planted link) is skipped for the
    /// next one, and what it points at is left alone.
    #[test]
    fn a_taken_temporary_name_is_skipped_without_following_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("service.pid");
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious\n").unwrap();
        let planted = dir.path().join(".service.pid.planted.tmp");
        std::os::unix::fs::symlink(&victim, &planted).unwrap();
        let fresh = dir.path().join(".service.pid.fresh.tmp");

        write_inner(&path, 42, [planted.clone(), fresh.clone()].into_iter()).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious\n");
        assert!(
            fs::symlink_metadata(&planted)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(!fresh.exists(), "renamed over the PID file");
        assert_eq!(read(&path), Some(42));

        let err = write_inner(&path, 43, [planted.clone()].into_iter()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(read(&path), Some(42));
    }

    #[test]
    fn a_directory_anyone_may_write_without_the_sticky_bit_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let open = dir.path().join("open");
        fs::create_dir(&open).unwrap();
        fs::set_permissions(&open, fs::Permissions::from_mode(0o777)).unwrap();
        let path = open.join("service.pid");
        let err = write(&path, 7).unwrap_err();
        assert_eq!(err.reason(), "pid_file");
        let message = err.to_string();
        assert!(
            message.contains(&path.display().to_string()) && message.contains("sticky"),
            "{message}"
        );
        assert!(!path.exists());

        // Sticky, as /tmp is: nobody can replace another's file there.
        fs::set_permissions(&open, fs::Permissions::from_mode(0o1777)).unwrap();
        write(&path, 7).unwrap();
        assert_eq!(read(&path), Some(7));
    }
}
