//! `handover-harness load` against the real example server, through its
//! command line: no request fails across SIGHUP upgrades, and every
//! request fails, counted by class, once the server is SIGKILLed (a load
//! generator that never reports a failure would pass the first test alone).

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use handover_harness::process::{become_subreaper, read_pid_file};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

const HARNESS: &str = env!("CARGO_BIN_EXE_handover-harness");
/// Every wait of these tests is bounded by this.
const DEADLINE: Duration = Duration::from_secs(60);

/// The example server, built in release once per run of these tests
/// (cargo does nothing when it is up to date); its path from cargo's own
/// report.
fn example_server() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(build_example)
}

fn build_example() -> PathBuf {
    let output = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "build",
            "--release",
            "--example",
            "http_server",
            "-q",
            "--message-format=json",
        ])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."))
        .stderr(Stdio::inherit())
        .output()
        .expect("cargo runs");
    assert!(output.status.success(), "the example builds");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| message["target"]["name"] == "http_server")
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo names the example's executable")
}

/// The lines a process writes to a pipe, as they come.
struct Lines {
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Lines {
    fn of(pipe: impl Read + Send + 'static) -> Lines {
        let (send, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        Lines {
            lines,
            seen: Vec::new(),
        }
    }

    /// The next line that `wanted` accepts, within [`DEADLINE`].
    fn wait(&mut self, what: &str, wanted: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if wanted(&line) {
                        return line;
                    }
                }
                Err(e) => panic!("no line {what} ({e}); seen:\n{}", self.seen.join("\n")),
            }
        }
    }
}

/// The example on a port of its own choosing, and what it writes.
struct Server {
    first: Child,
    log: Lines,
    addr: String,
    pid_file: PathBuf,
    /// Every generation seen, killed at the end if still there.
    pids: Vec<i32>,
    /// Those reaped already (their pids may be reused: never killed).
    gone: Vec<i32>,
    _dir: tempfile::TempDir,
}

impl Server {
    fn start() -> Server {
        // Generations whose parent exited come back to this process.
        become_subreaper();
        let dir = tempfile::tempdir().unwrap();
        let pid_file = dir.path().join("http.pid");
        // A port below the ephemeral ones: once the server is killed, no
        // client's connection can be given it and connect to itself.
        let listen = handover_harness::check::free_addr().unwrap().to_string();
        let mut first = Command::new(example_server())
            .args(["--listen", &listen, "--pid-file"])
            .arg(&pid_file)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the example starts");
        let mut log = Lines::of(first.stderr.take().unwrap());
        let serving = log.wait("serving generation=0", |line| {
            line.contains("serving") && line.contains("generation=0")
        });
        let addr = serving
            .split_whitespace()
            .find_map(|word| word.strip_prefix("addr="))
            .expect("the serving line names the address")
            .to_owned();
        Server {
            pids: vec![first.id() as i32],
            gone: Vec::new(),
            first,
            log,
            addr,
            pid_file,
            _dir: dir,
        }
    }

    fn serving_pid(&self) -> i32 {
        read_pid_file(&self.pid_file).expect("the PID file names the serving generation")
    }

    /// SIGHUP to generation `generation`; returns once its successor serves
    /// and it has drained and exited (it names its successor in the PID
    /// file as it exits).
    fn upgrade(&mut self, generation: u64) {
        let pid = self.serving_pid();
        kill(Pid::from_raw(pid), Signal::SIGHUP).unwrap();
        let next = generation + 1;
        self.log.wait("the successor serving", |line| {
            line.contains("serving") && line.contains(&format!("generation={next}"))
        });
        wait_exit(pid);
        self.gone.push(pid);
        let new = self.serving_pid();
        assert_ne!(new, pid, "the PID file names the successor");
        self.pids.push(new);
    }
}

/// Waits for the exit of `pid`, a child of this process (the first
/// generation, or a later one re-parented here when its parent exited).
fn wait_exit(pid: i32) {
    let (done, exited) = channel();
    std::thread::spawn(move || {
        let _ = done.send(nix::sys::wait::waitpid(Pid::from_raw(pid), None));
    });
    match exited.recv_timeout(DEADLINE) {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => panic!("waitpid {pid}: {e}"),
        Err(_) => panic!("pid {pid} still runs {DEADLINE:?} later"),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let left: Vec<i32> = self
            .pids
            .iter()
            .copied()
            .filter(|pid| !self.gone.contains(pid))
            .collect();
        for &pid in &left {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for &pid in &left {
            let _ = nix::sys::wait::waitpid(Pid::from_raw(pid), None);
        }
    }
}

/// `handover-harness load` running against an address.
struct LoadRun {
    child: Child,
    out: Lines,
    json: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoadRun {
    fn start(addr: &str, extra: &[&str]) -> LoadRun {
        let dir = tempfile::tempdir().unwrap();
        let json = dir.path().join("load.json");
        let mut child = Command::new(HARNESS)
            .args(["load", addr, "--json"])
            .arg(&json)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the harness runs");
        let out = Lines::of(child.stdout.take().unwrap());
        LoadRun {
            child,
            out,
            json,
            _dir: dir,
        }
    }

    /// SIGTERM; returns its exit status, its last line and its JSON summary.
    fn stop(mut self) -> (ExitStatus, String, Value) {
        kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM).unwrap();
        let summary = self
            .out
            .wait("the summary", |line| line.contains("(stopped by SIGTERM)"));
        // The summary is its last act: the exit follows.
        let status = self.child.wait().unwrap();
        let json = std::fs::read_to_string(&self.json).expect("the JSON summary");
        (status, summary, serde_json::from_str(&json).expect("JSON"))
    }
}

impl Drop for LoadRun {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn no_request_fails_across_sighup_upgrades_of_the_example() {
    let mut server = Server::start();
    let load = LoadRun::start(&server.addr, &[]);
    let mut load = load;
    load.out.wait("every client answered", |line| {
        line == "load: every client answered (10 clients)"
    });
    for generation in 0..2 {
        server.upgrade(generation);
    }
    let (status, summary, json) = load.stop();
    assert!(json["ok"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(json["failed"], 0, "{summary}");
    for class in ["refused", "reset", "timeout", "wrong", "other"] {
        assert_eq!(json[class], 0, "{class}: {summary}");
    }
    // Every generation answered (the identities are the pids).
    let identities: Vec<i64> = json["identities"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_i64)
        .collect();
    for pid in &server.pids {
        assert!(identities.contains(&i64::from(*pid)), "{pid}: {summary}");
    }
    assert!(status.success(), "{status}: {summary}");
    assert!(summary.starts_with("load: "), "{summary}");
    assert!(summary.contains(" 0 failed"), "{summary}");
}

/// The server is killed before the load starts, so that every request
/// meets a closed port. (Killed under load, the first failures are resets
/// or refusals in whatever order the clients meet the closing port, and a
/// load stopped at its first failure may have seen no refusal yet: a
/// fresh-clone run failed that way with `1 failed (reset=1)`.)
#[test]
fn every_request_to_a_killed_server_fails_and_is_counted() {
    let mut server = Server::start();
    kill(Pid::from_raw(server.pids[0]), Signal::SIGKILL).unwrap();
    server.first.wait().unwrap();
    server.gone.push(server.pids[0]);
    let mut load = LoadRun::start(&server.addr, &[]);
    load.out
        .wait("a failure", |line| line == "load: a request failed");
    let (status, summary, json) = load.stop();
    assert!(json["failed"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(json["ok"].as_u64(), Some(0), "{summary}");
    // Its port is closed: connections are refused.
    assert!(json["refused"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(
        json["failed"].as_u64().unwrap(),
        ["refused", "reset", "timeout", "wrong", "other"]
            .iter()
            .map(|class| json[class].as_u64().unwrap())
            .sum::<u64>(),
        "{summary}"
    );
    assert!(
        !json["examples"].as_array().unwrap().is_empty(),
        "{summary}"
    );
    assert_eq!(status.code(), Some(1), "{summary}");
    assert!(summary.contains("refused="), "{summary}");
}

#[test]
fn an_answer_without_the_expected_body_is_wrong() {
    let server = Server::start();
    let mut load = LoadRun::start(
        &server.addr,
        &[
            "--expect-body",
            "not in the example's answer",
            "--idle",
            "0:1s",
        ],
    );
    load.out
        .wait("a failure", |line| line == "load: a request failed");
    let (status, summary, json) = load.stop();
    assert_eq!(json["ok"], 0, "{summary}");
    assert!(json["wrong"].as_u64().unwrap() > 0, "{summary}");
    assert_eq!(json["failed"], json["wrong"], "{summary}");
    assert_eq!(status.code(), Some(1), "{summary}");
}

#[test]
fn the_load_command_explains_itself() {
    let help = Command::new(HARNESS)
        .args(["load", "--help"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(help.status.success(), "{text}");
    for flag in [
        "--keep-alive",
        "--new-connection",
        "--idle",
        "--json",
        "--stop-file",
    ] {
        assert!(text.contains(flag), "{flag}: {text}");
    }
    let bad = Command::new(HARNESS)
        .args(["load", "127.0.0.1:1", "--idle", "four"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let text = String::from_utf8_lossy(&bad.stderr);
    assert!(text.contains("N:PAUSE"), "{text}");
}

#[test]
fn the_load_stops_at_its_stop_file_and_after_its_duration() {
    let server = Server::start();
    let dir = tempfile::tempdir().unwrap();
    let stop = dir.path().join("stop");
    let mut load = LoadRun::start(&server.addr, &["--stop-file", stop.to_str().unwrap()]);
    load.out.wait("every client answered", |line| {
        line.contains("every client answered")
    });
    std::fs::write(&stop, "").unwrap();
    load.out.wait("the summary", |line| {
        line.contains("(stopped by --stop-file)")
    });
    assert!(load.child.wait().unwrap().success());

    let mut load = LoadRun::start(&server.addr, &["--duration", "300ms"]);
    load.out.wait("the summary", |line| {
        line.contains("(stopped by --duration)")
    });
    assert!(load.child.wait().unwrap().success());
}
