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

use crate::error::{Error, Result};

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
