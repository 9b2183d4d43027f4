//! Watching a server that says nothing about itself: its process tree, its
//! PID file, its descriptors, seen from outside.
//!
//! A black-box server prints no `event=` lines, so its generations are
//! followed from the process table: every descendant of the process the
//! harness started is a member of the server, and so is every process
//! re-parented to the harness (a child subreaper on Linux) that is not one
//! of the harness's own helper commands. A watcher thread scans the table
//! every [`SCAN_PERIOD`], records when each member appeared and when it
//! exited or became a zombie, and when the PID file changed; it reaps the
//! members that are the harness's own children. Waiting is on its condition
//! variable: a change wakes every waiter.
//!
//! Only processes seen as members are ever signalled, by pid.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitPidFlag, waitpid};
use nix::unistd::Pid;

use crate::process::read_pid_file;

/// How often the watcher scans the process table.
pub const SCAN_PERIOD: Duration = Duration::from_millis(2);

/// One process of the server, as the watcher saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    /// Its parent when last seen.
    pub ppid: i32,
    /// When it was first seen, from the watcher's start.
    pub seen: Duration,
    /// When it was seen gone (exited, or a zombie).
    pub gone: Option<Duration>,
    /// Whether it was last seen a zombie.
    pub zombie: bool,
}

/// What the watcher knows.
#[derive(Debug, Default)]
pub struct State {
    /// Every member ever seen, by pid.
    pub members: BTreeMap<i32, Member>,
    /// The PID file's pid, if it names one.
    pub pid_file: Option<i32>,
    /// When the PID file last changed.
    pub pid_file_changed: Duration,
    /// The harness's own commands (and their children): never members.
    helpers: BTreeSet<i32>,
    /// Scans so far.
    pub scans: u64,
}

impl State {
    /// Members that have not exited, by pid.
    pub fn live(&self) -> BTreeSet<i32> {
        self.members
            .iter()
            .filter(|(_, m)| m.gone.is_none())
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// Members that are zombies whose parent is not the harness: children
    /// a server process failed to reap.
    pub fn zombies(&self) -> Vec<i32> {
        let me = std::process::id() as i32;
        self.members
            .iter()
            .filter(|(_, m)| m.zombie && m.ppid != me)
            .map(|(&pid, _)| pid)
            .collect()
    }

    /// The newest live member (the last to appear).
    pub fn newest(&self) -> Option<i32> {
        self.members
            .iter()
            .filter(|(_, m)| m.gone.is_none())
            .max_by_key(|(pid, m)| (m.seen, **pid))
            .map(|(&pid, _)| pid)
    }
}

/// The watcher of one server's processes.
#[derive(Debug)]
pub struct Watch {
    shared: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    epoch: Instant,
}

impl Watch {
    /// Starts the command `command` (as `sh -c 'exec COMMAND'`, so that a
    /// simple command is itself the server's first process) with its output
    /// appended to `log`, and watches it.
    pub fn start(command: &str, pid_file: Option<PathBuf>, log: &Path) -> io::Result<Watch> {
        crate::process::become_subreaper();
        let epoch = Instant::now();
        let shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        let root = Command::new("sh")
            .arg("-c")
            .arg(format!("exec {command}"))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        let root = root.id() as i32;
        {
            let mut state = lock(&shared);
            state.members.insert(
                root,
                Member {
                    ppid: std::process::id() as i32,
                    seen: Duration::ZERO,
                    gone: None,
                    zombie: false,
                },
            );
        }
        let thread = {
            let shared = Arc::clone(&shared);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || watch(&shared, &stop, pid_file.as_deref(), epoch))
        };
        let watch = Watch {
            shared,
            stop,
            thread: Some(thread),
            epoch,
        };
        // One scan before anyone asks.
        watch.wait_until(Instant::now() + Duration::from_secs(1), |s| {
            (s.scans > 0).then_some(())
        });
        Ok(watch)
    }

    /// Time since the watcher started, the clock of [`Member::seen`].
    pub fn now(&self) -> Duration {
        self.epoch.elapsed()
    }

    /// The watcher's clock at `instant`.
    pub fn at(&self, instant: Instant) -> Duration {
        instant.saturating_duration_since(self.epoch)
    }

    /// The state now.
    pub fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.shared)
    }

    /// Waits until `check` returns `Some` (tried now and after every change
    /// the watcher sees), or `deadline`.
    pub fn wait_until<T>(
        &self,
        deadline: Instant,
        mut check: impl FnMut(&State) -> Option<T>,
    ) -> Option<T> {
        let (state, changed) = &*self.shared;
        let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(found) = check(&state) {
                return Some(found);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            state = changed
                .wait_timeout(state, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs `command` (through `sh -c`) as a helper of the harness, never
    /// mistaken for a server process.
    pub fn helper(&self, command: &str, log: &Path) -> io::Result<Child> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)?;
        // Held while spawning: the watcher must not see the helper before
        // it is known as one.
        let mut state = lock(&self.shared);
        let child = Command::new("sh")
            .arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()?;
        state.helpers.insert(child.id() as i32);
        Ok(child)
    }

    /// Sends `signal` to `pid` if it is a live member.
    pub fn signal(&self, pid: i32, signal: Signal) -> Result<(), String> {
        if !self.state().live().contains(&pid) {
            return Err(format!("pid {pid} is not a live process of the server"));
        }
        kill(Pid::from_raw(pid), signal).map_err(|e| format!("{signal} to {pid}: {e}"))
    }

    /// Stops the server: SIGTERM to every live member, SIGKILL to what is
    /// left after `grace`; waits until every member is gone.
    pub fn stop(mut self, grace: Duration) -> Vec<i32> {
        let live = self.state().live();
        for &pid in &live {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let gone = |s: &State| s.live().is_empty().then_some(());
        let mut killed = Vec::new();
        if self.wait_until(Instant::now() + grace, gone).is_none() {
            for pid in self.state().live() {
                killed.push(pid);
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            self.wait_until(Instant::now() + Duration::from_secs(5), gone);
        }
        self.finish();
        killed
    }

    fn finish(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.1.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if self.thread.is_some() {
            for pid in self.state().live() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            self.finish();
        }
        // Whatever is still ours to reap.
        for (&pid, member) in &self.state().members {
            if member.ppid == std::process::id() as i32 {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
        }
    }
}

fn lock(shared: &(Mutex<State>, Condvar)) -> MutexGuard<'_, State> {
    shared.0.lock().unwrap_or_else(|e| e.into_inner())
}

/// What the process table says about one process.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// Its parent.
    pub ppid: i32,
    /// Whether it is a zombie.
    pub zombie: bool,
}

/// How a pid seen in a scan was classified (once: membership follows the
/// parent at first sight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Member,
    Helper,
    Other,
}

fn watch(
    shared: &(Mutex<State>, Condvar),
    stop: &AtomicBool,
    pid_file: Option<&Path>,
    epoch: Instant,
) {
    let me = std::process::id() as i32;
    let mut classes: HashMap<i32, Class> = HashMap::new();
    {
        let state = lock(shared);
        for &pid in state.members.keys() {
            classes.insert(pid, Class::Member);
        }
    }
    while !stop.load(Ordering::Relaxed) {
        let listed = list_pids();
        let now = epoch.elapsed();
        let mut state = lock(shared);
        for &pid in &state.helpers {
            classes.insert(pid, Class::Helper);
        }
        classes.retain(|pid, class| listed.contains(pid) || *class == Class::Member);
        // Rows of new pids (to classify), of members and of helpers (whose
        // orphans come to the harness).
        let rows: BTreeMap<i32, Row> = listed
            .iter()
            .filter(|pid| classes.get(pid).is_none_or(|c| *c != Class::Other))
            .filter_map(|&pid| row(pid).map(|r| (pid, r)))
            .collect();
        // Parents before children, whatever the pid order: until nothing moves.
        loop {
            let mut moved = false;
            for (&pid, row) in &rows {
                if classes.contains_key(&pid) {
                    continue;
                }
                // A child of the harness that is not a helper: the server's
                // first process, or one re-parented to the harness.
                let class = match classes.get(&row.ppid) {
                    _ if row.ppid == me => Class::Member,
                    Some(Class::Member) => Class::Member,
                    Some(Class::Helper) => Class::Helper,
                    Some(Class::Other) => Class::Other,
                    None if rows.contains_key(&row.ppid) => continue,
                    None => Class::Other,
                };
                classes.insert(pid, class);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        for (&pid, class) in &classes {
            if *class != Class::Member {
                continue;
            }
            let current = rows.get(&pid);
            let member = state.members.entry(pid).or_insert_with(|| Member {
                ppid: current.map_or(0, |r| r.ppid),
                seen: now,
                gone: None,
                zombie: false,
            });
            match current {
                Some(row) => {
                    member.ppid = row.ppid;
                    if row.zombie && !member.zombie {
                        member.zombie = true;
                        member.gone.get_or_insert(now);
                    }
                    if row.zombie && row.ppid == me {
                        let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
                    }
                }
                None => {
                    member.gone.get_or_insert(now);
                    member.zombie = false;
                }
            }
        }
        // Helpers that ended are the harness's to reap, by their owner
        // (`Child::wait`); orphans of helpers are ours.
        for (&pid, row) in &rows {
            if classes.get(&pid) == Some(&Class::Helper)
                && row.zombie
                && row.ppid == me
                && !state.helpers.contains(&pid)
            {
                let _ = waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG));
            }
        }
        if let Some(path) = pid_file {
            let named = read_pid_file(path);
            if named != state.pid_file {
                state.pid_file = named;
                state.pid_file_changed = now;
            }
        }
        state.scans += 1;
        // Every scan wakes the waiters: some wait for a number of scans.
        shared.1.notify_all();
        // The scan's pace; a stop wakes it early.
        let _ = shared.1.wait_timeout(state, SCAN_PERIOD);
    }
}

/// Every pid in the process table.
fn list_pids() -> BTreeSet<i32> {
    match std::fs::read_dir("/proc") {
        Ok(entries) if Path::new("/proc/self/stat").exists() => entries
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        // No /proc (macOS): the portable, slower way.
        _ => ps_table().into_keys().collect(),
    }
}

/// One process's parent and state.
pub fn row(pid: i32) -> Option<Row> {
    if Path::new("/proc/self/stat").exists() {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // `pid (comm) S ppid ...`: the command may hold spaces and parentheses.
        let mut rest = stat.get(stat.rfind(')')? + 1..)?.split_whitespace();
        let state = rest.next()?;
        let ppid = rest.next()?.parse().ok()?;
        Some(Row {
            ppid,
            zombie: state == "Z" || state == "X",
        })
    } else {
        ps_table().get(&pid).copied()
    }
}

fn ps_table() -> BTreeMap<i32, Row> {
    let Ok(ps) = Command::new("ps")
        .args(["-A", "-o", "pid=,ppid=,stat="])
        .stdout(Stdio::piped())
        .spawn()
    else {
        return BTreeMap::new();
    };
    // `ps` lists itself, a child of the harness: not a server process.
    let itself = ps.id() as i32;
    let Ok(output) = ps.wait_with_output() else {
        return BTreeMap::new();
    };
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            let pid = words.next()?.parse().ok()?;
            let ppid = words.next()?.parse().ok()?;
            let zombie = words.next()?.starts_with('Z');
            Some((pid, Row { ppid, zombie }))
        })
        .filter(|(pid, _)| *pid != itself)
        .collect()
}

/// How many descriptors `pid` has open, TCP connections left out (they
/// come and go with the clients; a leak is in the rest): Linux's
/// `/proc/PID/fd` and `/proc/net/tcp*`; `None` where the system does not
/// show another process's descriptors.
pub fn descriptors(pid: i32) -> Option<usize> {
    let connections = tcp_connection_inodes();
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
    Some(
        fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| {
                let target = target.to_string_lossy();
                !target
                    .strip_prefix("socket:[")
                    .and_then(|rest| rest.strip_suffix(']'))
                    .is_some_and(|inode| connections.contains(inode))
            })
            .count(),
    )
}

/// The inodes of TCP sockets that are not listening.
fn tcp_connection_inodes() -> BTreeSet<String> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // `sl local rem st ... uid timeout inode`; 0A is LISTEN.
            if let (Some(state), Some(inode)) = (fields.get(3), fields.get(9))
                && *state != "0A"
            {
                inodes.insert((*inode).to_owned());
            }
        }
    }
    inodes
}
