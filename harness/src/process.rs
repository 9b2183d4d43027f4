//! Driving the subject as real processes.
//!
//! [`Subject::start`] runs generation 0 with its stdout on a pipe, from
//! which every generation's `event=` lines arrive. The handle remembers every
//! pid it sees and, when dropped, kills and reaps each of them by pid: never
//! by name. On Linux the calling process becomes a child subreaper, so that
//! generations orphaned by their parent's exit are reaped here too.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

/// One `event=` line of the subject.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// What happened: `started`, `ready`, `exiting`, `exited`, `parent-gone`.
    pub kind: String,
    /// The process that said it.
    pub pid: i32,
    /// The generation that said it.
    pub generation: u64,
    /// Every `key=value` field of the line.
    pub fields: BTreeMap<String, String>,
}

impl Event {
    /// Parses a line; `None` for a line that is not an event.
    pub fn parse(line: &str) -> Option<Event> {
        let fields: BTreeMap<String, String> = line
            .split_whitespace()
            .filter_map(|word| word.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        Some(Event {
            kind: fields.get("event")?.clone(),
            pid: fields.get("pid")?.parse().ok()?,
            generation: fields.get("gen")?.parse().ok()?,
            fields,
        })
    }

    /// Whether this is a `kind` event of generation `generation`.
    pub fn is(&self, kind: &str, generation: u64) -> bool {
        self.kind == kind && self.generation == generation
    }

    fn addr(&self, key: &str) -> io::Result<SocketAddr> {
        self.fields
            .get(key)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| io::Error::other(format!("event without {key}: {self:?}")))
    }
}

/// How to start the subject.
#[derive(Debug, Clone, Default)]
pub struct SubjectConfig {
    /// The subject binary.
    pub binary: PathBuf,
    /// Extra command-line flags (`--upgrade-timeout-ms 500`, ...).
    pub args: Vec<String>,
    /// `SUBJECT_FAULTS`, read by every generation.
    pub faults: Option<String>,
    /// Serve a Unix listener at this path.
    pub unix: Option<PathBuf>,
    /// Keep a PID file at this path.
    pub pid_file: Option<PathBuf>,
    /// `SUBJECT_FAULTS_FILE`: a file each generation reads when it starts.
    pub faults_file: Option<PathBuf>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Where every generation's stderr goes (appended); `None`: inherited.
    pub stderr: Option<PathBuf>,
}

/// The serving addresses, the same in every generation.
#[derive(Debug, Clone, Copy)]
pub struct Addresses {
    /// HTTP/1.1.
    pub http: SocketAddr,
    /// TCP echo.
    pub tcp: SocketAddr,
    /// UDP echo.
    pub udp: SocketAddr,
    /// The control port.
    pub control: SocketAddr,
    /// HTTP/1.1 and HTTP/2 over TLS, when the subject serves it.
    pub tls: Option<SocketAddr>,
    /// gRPC (h2c), when the subject serves it.
    pub grpc: Option<SocketAddr>,
    /// WebSocket echo, when the subject serves it.
    pub websocket: Option<SocketAddr>,
}

/// A running subject and every generation it has had.
#[derive(Debug)]
pub struct Subject {
    first: Child,
    events: mpsc::Receiver<Event>,
    /// Every event so far, in order.
    pub history: Vec<Event>,
    pids: BTreeSet<i32>,
    /// Where it serves.
    pub addresses: Addresses,
}

/// How long a test waits for an event before it calls it missing.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(20);

impl Subject {
    /// Starts generation 0 and waits until it is ready.
    pub fn start(config: &SubjectConfig) -> io::Result<Subject> {
        become_subreaper();
        let mut command = Command::new(&config.binary);
        command
            .args(&config.args)
            .stdout(Stdio::piped())
            .stdin(Stdio::null());
        if let Some(path) = &config.stderr {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            command.stderr(file);
        }
        if let Some(path) = &config.unix {
            command.arg("--unix").arg(path);
        }
        if let Some(path) = &config.pid_file {
            command.arg("--pid-file").arg(path);
        }
        if let Some(faults) = &config.faults {
            command.env(crate::fault::VAR, faults);
        }
        if let Some(path) = &config.faults_file {
            command.env(crate::fault::FILE_VAR, path);
        }
        // A `panic` fault would print a backtrace where RUST_BACKTRACE=1 is
        // set, which takes longer than a short upgrade timeout on a busy
        // machine: the subject's panics are faults, not bugs to debug.
        command.env("RUST_BACKTRACE", "0");
        // The subject is no systemd service, even where the tests run in
        // one (a CI runner's unit): what a unit's environment tells the
        // library (whose child successors are, when the PID file changes,
        // where READY=1 goes) is set by a test that means it.
        for var in [
            "INVOCATION_ID",
            "MANAGERPID",
            "NOTIFY_SOCKET",
            "LISTEN_FDS",
            "LISTEN_PID",
            "LISTEN_FDNAMES",
        ] {
            command.env_remove(var);
        }
        command.envs(config.env.iter().map(|(k, v)| (k, v)));
        let mut first = command.spawn()?;
        let stdout = first
            .stdout
            .take()
            .ok_or_else(|| io::Error::other("no stdout"))?;
        let (sender, events) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if let Some(event) = Event::parse(&line)
                    && sender.send(event).is_err()
                {
                    return;
                }
            }
        });
        let mut subject = Subject {
            first,
            events,
            history: Vec::new(),
            pids: BTreeSet::new(),
            addresses: Addresses {
                http: ([127, 0, 0, 1], 0).into(),
                tcp: ([127, 0, 0, 1], 0).into(),
                udp: ([127, 0, 0, 1], 0).into(),
                control: ([127, 0, 0, 1], 0).into(),
                tls: None,
                grpc: None,
                websocket: None,
            },
        };
        subject.pids.insert(subject.first.id() as i32);
        let ready = subject.wait_for(|e| e.is("ready", 0))?;
        subject.addresses = Addresses {
            http: ready.addr("http")?,
            tcp: ready.addr("tcp")?,
            udp: ready.addr("udp")?,
            control: ready.addr("control")?,
            tls: ready.addr("tls").ok(),
            grpc: ready.addr("grpc").ok(),
            websocket: ready.addr("ws").ok(),
        };
        Ok(subject)
    }

    /// The pid of generation 0.
    pub fn first_pid(&self) -> i32 {
        self.first.id() as i32
    }

    /// Waits for the first event, seen before or arriving now, that matches.
    pub fn wait_for(&mut self, matches: impl Fn(&Event) -> bool) -> io::Result<Event> {
        if let Some(event) = self.history.iter().find(|e| matches(e)) {
            return Ok(event.clone());
        }
        let deadline = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.events.recv_timeout(left).map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "no such event within {EVENT_TIMEOUT:?}; saw {:#?}",
                        self.history
                    ),
                )
            })?;
            self.pids.insert(event.pid);
            self.history.push(event.clone());
            if matches(&event) {
                return Ok(event);
            }
        }
    }

    /// Like [`wait_for`](Self::wait_for), but gives up after `within`:
    /// `None` if no such event came by then. For what must NOT happen
    /// while a known condition holds (a process that must wait for another).
    pub fn wait_for_within(
        &mut self,
        matches: impl Fn(&Event) -> bool,
        within: Duration,
    ) -> Option<Event> {
        if let Some(event) = self.history.iter().find(|e| matches(e)) {
            return Some(event.clone());
        }
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let event = self.events.recv_timeout(left).ok()?;
            self.pids.insert(event.pid);
            self.history.push(event.clone());
            if matches(&event) {
                return Some(event);
            }
        }
    }

    /// Waits until at least `count` events, seen before or arriving now, match.
    pub fn wait_count(&mut self, matches: impl Fn(&Event) -> bool, count: usize) -> io::Result<()> {
        while self.history.iter().filter(|e| matches(e)).count() < count {
            self.next_event()?;
        }
        Ok(())
    }

    /// Waits for an event that arrives from now on and matches.
    pub fn wait_new(&mut self, matches: impl Fn(&Event) -> bool) -> io::Result<Event> {
        loop {
            let event = self.next_event()?;
            if matches(&event) {
                return Ok(event);
            }
        }
    }

    fn next_event(&mut self) -> io::Result<Event> {
        let event = self.events.recv_timeout(EVENT_TIMEOUT).map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no event within {EVENT_TIMEOUT:?}; saw {:#?}", self.history),
            )
        })?;
        self.pids.insert(event.pid);
        self.history.push(event.clone());
        Ok(event)
    }

    /// How many events of `kind` have arrived so far (taking in those that
    /// came without waiting), e.g. how many generations `started`.
    pub fn count(&mut self, kind: &str) -> usize {
        self.collect_events();
        self.history.iter().filter(|e| e.kind == kind).count()
    }

    /// Takes in the events that have arrived, without waiting.
    pub fn collect_events(&mut self) {
        while let Ok(event) = self.events.try_recv() {
            self.pids.insert(event.pid);
            self.history.push(event);
        }
    }

    /// The pid of generation `generation`'s latest `ready` event.
    pub fn pid_of(&mut self, generation: u64) -> io::Result<i32> {
        Ok(self.wait_for(|e| e.is("ready", generation))?.pid)
    }

    /// Sends one control command on a new connection and returns the answer.
    pub fn control(&self, command: &str) -> io::Result<String> {
        let mut stream = TcpStream::connect(self.addresses.control)?;
        stream.set_read_timeout(Some(EVENT_TIMEOUT))?;
        stream.write_all(format!("{command}\n").as_bytes())?;
        let mut answer = String::new();
        BufReader::new(stream).read_line(&mut answer)?;
        Ok(answer.trim().to_owned())
    }

    /// Asks for an upgrade through the control port; `Ok(answer)` on `ok ...`.
    pub fn upgrade(&self) -> Result<String, String> {
        let answer = self.control("upgrade").map_err(|e| e.to_string())?;
        if answer.starts_with("ok ") {
            Ok(answer)
        } else {
            Err(answer)
        }
    }

    /// Upgrades generation `from` to `from + 1` and waits until `from` has
    /// exited and its successor knows it (so that it may upgrade in turn).
    pub fn upgrade_and_settle(&mut self, from: u64) -> io::Result<i32> {
        let answer = self.upgrade().map_err(io::Error::other)?;
        let pid = self.wait_for(|e| e.is("parent-gone", from + 1))?.pid;
        debug_assert!(answer.contains(&format!("pid={pid}")));
        Ok(pid)
    }

    /// `GET path` on a new connection: the status and the body.
    pub fn http_get(&self, path: &str) -> io::Result<(u16, String)> {
        http_get(self.addresses.http, path)
    }

    /// Sends a signal to a process of this subject.
    pub fn signal(&self, pid: i32, signal: Signal) -> io::Result<()> {
        kill(Pid::from_raw(pid), signal).map_err(io::Error::from)
    }

    /// Waits until process `pid` (one of this subject's) has exited, and
    /// reaps it if it was this process's child.
    pub fn wait_exit(&self, pid: i32) -> io::Result<()> {
        match waitpid(Pid::from_raw(pid), None) {
            Ok(_) => Ok(()),
            // Not ours to reap (its parent generation reaped it, or no subreaper).
            Err(Errno::ECHILD) => wait_gone_unparented(pid),
            Err(e) => Err(e.into()),
        }
    }

    /// Processes of this subject that are still running, after reaping the
    /// ones that have ended.
    pub fn live_pids(&self) -> Vec<i32> {
        self.pids
            .iter()
            .copied()
            .filter(|&pid| {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
                is_running(pid)
            })
            .collect()
    }

    /// Zombies whose parent is one of this subject's live processes: a
    /// successor the library failed to reap.
    pub fn zombie_children(&self) -> io::Result<Vec<i32>> {
        let live: BTreeSet<i32> = self.live_pids().into_iter().collect();
        Ok(process_table()?
            .into_iter()
            .filter(|p| p.zombie && live.contains(&p.ppid))
            .map(|p| p.pid)
            .collect())
    }

    /// Stops the subject with SIGTERM and waits for every process to end.
    pub fn terminate(mut self) -> io::Result<()> {
        self.collect_events();
        for pid in self.live_pids() {
            match kill(Pid::from_raw(pid), Signal::SIGTERM) {
                // Ended (and reaped, by another waiter) since it was seen.
                Ok(()) | Err(Errno::ESRCH) => {}
                Err(e) => return Err(e.into()),
            }
        }
        for pid in self.pids.clone() {
            self.wait_exit(pid)?;
        }
        Ok(())
    }
}

impl Drop for Subject {
    fn drop(&mut self) {
        self.collect_events();
        for &pid in &self.pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        for &pid in &self.pids {
            let _ = waitpid(Pid::from_raw(pid), None);
        }
    }
}

/// `GET path` on a new connection to `addr`.
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(EVENT_TIMEOUT))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: subject\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::other(format!("not an HTTP response: {response:?}")))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Whether `pid` runs (a zombie does not).
pub fn is_running(pid: i32) -> bool {
    if kill(Pid::from_raw(pid), None).is_err() {
        return false;
    }
    !process_table()
        .map(|table| table.iter().any(|p| p.pid == pid && p.zombie))
        .unwrap_or(false)
}

struct ProcessRow {
    pid: i32,
    ppid: i32,
    zombie: bool,
}

/// The process table, portably, from `ps`.
fn process_table() -> io::Result<Vec<ProcessRow>> {
    let output = Command::new("ps")
        .args(["-A", "-o", "pid=,ppid=,stat="])
        .output()?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            Some(ProcessRow {
                pid: words.next()?.parse().ok()?,
                ppid: words.next()?.parse().ok()?,
                zombie: words.next()?.starts_with('Z'),
            })
        })
        .collect())
}

/// A process that is not our child can only be watched from outside: wait
/// for its exit with `kill(pid, 0)`, backing off, for a bounded time. Used
/// only where no subreaper is available (macOS).
fn wait_gone_unparented(pid: i32) -> io::Result<()> {
    let deadline = Instant::now() + EVENT_TIMEOUT;
    let mut pause = Duration::from_millis(1);
    while is_running(pid) {
        if Instant::now() > deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("pid {pid} still runs"),
            ));
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
    Ok(())
}

/// Orphaned generations are re-parented to this process, which can then
/// reap them and see their exit. Linux only; elsewhere they go to init.
pub fn become_subreaper() {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    {
        let _ = nix::sys::prctl::set_child_subreaper(true);
    }
}

/// Reads a PID file.
pub fn read_pid_file(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Copies an executable that a test or scenario then runs, in a `cp`
/// process rather than in this one. A copy made here holds a descriptor
/// open for writing while it runs, and a process that another thread forks
/// in that moment inherits it until its own exec: executing the copy then
/// fails with ETXTBSY ("Text file busy"), as a fresh-clone run of the test
/// suite did. `cp`'s descriptor is in no process of ours.
pub fn copy_executable(from: &Path, to: &Path) -> io::Result<()> {
    let status = std::process::Command::new("cp")
        .arg("--")
        .arg(from)
        .arg(to)
        .stdin(std::process::Stdio::null())
        .status()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "cp {} {}: {status}",
            from.display(),
            to.display()
        )))
    }
}

/// Writes `bytes` into a new executable file (mode 0755), in a `sh`
/// process rather than in this one, for the reason given at
/// [`copy_executable`].
pub fn write_executable(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    let mut writer = std::process::Command::new("sh")
        .args(["-c", "cat > \"$1\" && chmod 755 \"$1\"", "sh"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = writer.stdin.take() {
        stdin.write_all(bytes)?;
    }
    let status = writer.wait()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "writing {}: {status}",
            path.display()
        )))
    }
}

impl Subject {
    /// Holds a `GET /hold` in flight on `generation` (the subject answers
    /// it only on SIGUSR1), so that this generation drains, and so lives,
    /// after its successor is ready. The thread's result says whether the
    /// answer came, and came from that generation.
    pub fn hold_request(
        &mut self,
        generation: u64,
    ) -> io::Result<std::thread::JoinHandle<Result<(), String>>> {
        let addr = self.addresses.http;
        let held = std::thread::spawn(move || {
            let (status, body) =
                http_get(addr, "/hold").map_err(|e| format!("no answer to /hold: {e}"))?;
            if status == 200 && body.contains(&format!("gen={generation}")) {
                Ok(())
            } else {
                Err(format!(
                    "/hold answered {status} {body:?}, not by generation {generation}"
                ))
            }
        });
        self.wait_for(|e| e.is("hold-request", generation))?;
        Ok(held)
    }
}

/// Reads `sd_notify` datagrams from `socket` until one contains `needle`
/// (its read timeout bounds the wait), and returns it.
pub fn notification(socket: &std::os::unix::net::UnixDatagram, needle: &str) -> io::Result<String> {
    let mut buffer = [0u8; 4096];
    loop {
        let n = socket.recv(&mut buffer)?;
        let message = String::from_utf8_lossy(&buffer[..n]).into_owned();
        if message.contains(needle) {
            return Ok(message);
        }
    }
}
