//! What the in-process test files share: a successor as a shell script,
//! and checks on the generation that started it.

#![allow(dead_code)] // each test file uses its own part

use std::future::Future;
use std::path::{Path, PathBuf};

use handover::Upgrader;

/// A successor, as a shell script in `dir`: it notes each start in
/// `dir/starts`, then exits 3 if `dir/fail` exists, else says it is ready and
/// lives until its parent closes the handshake link.
pub fn successor_script(dir: &Path) -> PathBuf {
    let path = dir.join("successor");
    let dir = dir.display();
    write_executable(
        &path,
        &format!(
            "#!/bin/sh\necho started >> '{dir}/starts'\n\
             [ -e '{dir}/fail' ] && exit 3\n\
             printf R >&3\nexec cat <&3 >/dev/null\n"
        ),
    );
    path
}

/// How many times the script in `dir` started.
pub fn starts(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("starts"))
        .map(|text| text.lines().count())
        .unwrap_or(0)
}

/// Checks that `exit()` has not resolved: the generation serves on.
pub fn assert_serving(upgrader: &Upgrader) {
    let exit = std::pin::pin!(upgrader.exit());
    let mut context = std::task::Context::from_waker(std::task::Waker::noop());
    assert!(
        exit.poll(&mut context).is_pending(),
        "exit() resolved: this generation would stop serving"
    );
}

/// Ends the test's upgrader and the successor it made ready. The successor
/// would exit once its handshake link closes, but the link closes only when
/// this process exits (as a real old generation's does): it is killed. The
/// dropped upgrader's supervisor stays until the process exits, and may
/// reap it first (ECHILD here).
pub fn finish(upgrader: Upgrader, successor: i32) {
    drop(upgrader);
    let successor = nix::unistd::Pid::from_raw(successor);
    match nix::sys::signal::kill(successor, nix::sys::signal::Signal::SIGKILL) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
        Err(e) => panic!("cannot kill the successor: {e}"),
    }
    match nix::sys::wait::waitpid(successor, None) {
        Ok(_) | Err(nix::errno::Errno::ECHILD) => {}
        Err(e) => panic!("cannot reap the successor: {e}"),
    }
}

/// Writes a script and makes it executable, in a `sh` process rather than
/// in this one: a descriptor open for writing here would be inherited by a
/// process that another test's thread forks in that moment, and executing
/// the script would then fail with ETXTBSY until that process execs.
pub fn write_executable(path: &std::path::Path, text: &str) {
    use std::io::Write;
    let mut writer = std::process::Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    writer
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    assert!(
        writer.wait().unwrap().success(),
        "writing {}",
        path.display()
    );
}

/// Serves `control` on a thread of its own (a current-thread runtime), and
/// says on the returned channel when `serve` has returned. Were it to spin,
/// it would spin there, and the test would still see that it never
/// returned.
pub fn serve_on_its_own_thread(control: handover::ControlSocket) -> std::sync::mpsc::Receiver<()> {
    let (returned, serve_returned) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(control.serve());
        let _ = returned.send(());
    });
    serve_returned
}
