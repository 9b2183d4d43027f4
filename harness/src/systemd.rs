//! The example service under a real systemd: a private `systemd --user`
//! manager (its own mount namespace and cgroup, `XDG_RUNTIME_DIR` in a
//! temporary folder; PID 1 need not be systemd) runs the unit files of
//! `examples/systemd/`, reloads each one under strict HTTP load and stops
//! it, and `systemd-socket-activate` runs the example in front of a socket
//! it made.
//!
//! A case passes when every reload moved MainPID to the new generation (and
//! the PID file and `GET /` agree), no request of the load failed (it keeps
//! idle keep-alive connections, so each drain lasts the example's quiet
//! period), systemd never said "Supervising process N which is not our
//! child", every successor was started as systemd's child (the service's
//! log says 'successor named the main process'), and `systemctl stop` ended
//! it by SIGTERM with `Result=success`. Variants of the example units
//! (without `PIDFile=`, with `KillMode=process`, ...) run as *findings*:
//! they record what this systemd does and never fail the suite.
//!
//! Only the privileged bootstrap is a shell script, `ci/systemd-bootstrap.sh`
//! (installing packages, unpacking bookworm-backports' systemd 254, and
//! starting a manager in a mount namespace); everything else is here, and
//! the load is this crate's own strict clients ([`crate::load`]), the ones
//! `handover-harness load` runs, so one place counts failed requests.
//!
//! Every wait is for a state (MainPID, a cgroup's processes, a log line, a
//! pid) and bounded. systemd announces MainPID changes only on D-Bus, which
//! this crate does not speak, so those states are polled: every
//! [`POLL`] until the bound, in [`until`] alone.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::load::{HttpCheck, Identity, Load, LoadPlan};

/// How often a polled state is looked at.
pub const POLL: Duration = Duration::from_millis(20);
/// The bound of a wait for a reload, a drain or a start.
const SETTLE: Duration = Duration::from_secs(30);
/// Answers the load must have had from each generation before the next
/// reload (a few hundred milliseconds of load).
const ANSWERS_PER_GENERATION: u64 = 200;
/// The fewest answers a case's load must have had in all.
const FEWEST_ANSWERS: u64 = 50;

/// Which systemd runs the manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suite {
    /// The installed systemd (252 on Debian 12).
    System,
    /// Debian bookworm-backports' systemd (254), unpacked under
    /// `target/systemd-backports/`, for `Type=notify-reload`.
    Backports,
}

impl Suite {
    /// Its name in `SYSTEMD_SUITES`.
    pub fn name(self) -> &'static str {
        match self {
            Suite::System => "system",
            Suite::Backports => "backports",
        }
    }
}

/// What to run, and with what.
#[derive(Debug, Clone)]
pub struct Config {
    /// The repository: `examples/systemd/` and `ci/systemd-bootstrap.sh`.
    pub repo: PathBuf,
    /// Where bookworm-backports' systemd is unpacked (shared between runs).
    pub backports_dir: PathBuf,
    /// The example server (`examples/http_server.rs`, built).
    pub example: PathBuf,
    /// The `handover` client.
    pub cli: PathBuf,
    /// The manager to run.
    pub suite: Suite,
    /// Suites run at the same time elsewhere: a case they cover is not
    /// reported skipped here.
    pub elsewhere: Vec<Suite>,
    /// Only these groups of cases (`None`: all): `pidfile`, `notify`,
    /// `notify-reload`, `socket-activation` (each with its variants and
    /// findings) and `systemd-socket-activate`.
    pub cases: Option<Vec<String>>,
    /// Reloads per case (back-to-back: this many pairs' worth, in pairs).
    pub reloads: usize,
    /// Reloads per finding.
    pub finding_reloads: usize,
    /// More `Environment=` for every unit (`K=V K=V`).
    pub service_env: String,
    /// The successors are the old generation's children on purpose
    /// (`HANDOVER_SUCCESSOR_PARENT=own` in `service_env`): no case fails for
    /// want of 'successor named the main process'.
    pub own_children: bool,
    /// Keep the work folder (logs) even when every case passed.
    pub keep: bool,
}

/// A case's verdict.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It ran and held.
    Pass,
    /// It ran and did not.
    Fail,
    /// It cannot run here, and why.
    Skipped(String),
}

/// One case's line: `systemd: <case> (systemd <version>): PASS`.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// The case, with its variant (`pidfile, back-to-back reloads`).
    pub name: String,
    /// The manager's version.
    pub version: String,
    /// How it went.
    pub verdict: Verdict,
}

impl fmt::Display for CaseResult {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "systemd: {} (systemd {}): ", self.name, self.version)?;
        match &self.verdict {
            Verdict::Pass => write!(f, "PASS"),
            Verdict::Fail => write!(f, "FAIL"),
            Verdict::Skipped(why) => write!(f, "SKIPPED ({why})"),
        }
    }
}

/// What a suite did: every case's verdict, and everything it said (case
/// lines, findings, details).
#[derive(Debug, Default)]
pub struct Report {
    /// The cases, in order.
    pub results: Vec<CaseResult>,
    /// Every line, in order.
    pub output: Vec<String>,
    /// The work folder, when kept.
    pub kept: Option<PathBuf>,
}

impl Report {
    fn say(&mut self, line: impl Into<String>) {
        self.output.push(line.into());
    }

    fn detail(&mut self, line: impl AsRef<str>) {
        for part in line.as_ref().lines() {
            self.output.push(format!("    {part}"));
        }
    }

    fn report(&mut self, name: &str, version: &str, verdict: Verdict) {
        let result = CaseResult {
            name: name.to_owned(),
            version: version.to_owned(),
            verdict,
        };
        self.output.push(result.to_string());
        self.results.push(result);
    }

    /// The cases that failed.
    pub fn failed(&self) -> Vec<&CaseResult> {
        self.results
            .iter()
            .filter(|r| r.verdict == Verdict::Fail)
            .collect()
    }
}

/// Polls `probe` every [`POLL`] until it gives a value or `within` has
/// passed; then one last look.
pub fn until<T>(within: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + within;
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if Instant::now() >= end {
            return probe();
        }
        std::thread::sleep(POLL);
    }
}

/// Runs every case of one suite and reports them.
pub fn run(config: &Config) -> Report {
    let mut report = Report::default();
    let work = match tempfile::Builder::new()
        .prefix("handover-systemd.")
        .tempdir()
    {
        Ok(work) => work,
        Err(e) => {
            report.report(
                "every case",
                "?",
                Verdict::Skipped(format!("no work folder: {e}")),
            );
            return report;
        }
    };
    let mut run = Run {
        config,
        work: work.path().to_owned(),
        outside: Vec::new(),
        ports: Ports::for_suite(config.suite),
    };
    run.suite(&mut report);
    run.kill_outside();
    if config.keep || !report.failed().is_empty() {
        let kept = work.keep();
        report.say(format!("systemd: logs kept in {}", kept.display()));
        report.kept = Some(kept);
    }
    report
}

/// One suite's run: its work folder, its ports, and the generations it
/// started outside a manager (to be killed by pid at the end).
struct Run<'a> {
    config: &'a Config,
    work: PathBuf,
    outside: Vec<i32>,
    ports: Ports,
}

/// The systemd programs of a suite.
struct Systemd {
    exec: PathBuf,
    ctl: PathBuf,
    lib: Option<PathBuf>,
    units: PathBuf,
    version: String,
}

impl Run<'_> {
    fn wanted(&self, case: &str) -> bool {
        self.config
            .cases
            .as_ref()
            .is_none_or(|cases| cases.iter().any(|c| c == case))
    }

    fn bootstrap(&self, args: &[&str]) -> Result<String, String> {
        let output = Command::new("bash")
            .arg(self.config.repo.join("ci/systemd-bootstrap.sh"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("bash ci/systemd-bootstrap.sh: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let last = stdout.lines().last().unwrap_or("").to_owned();
        if last == "ok" {
            Ok(String::new())
        } else if let Some(rest) = last.strip_prefix("ok ") {
            Ok(rest.to_owned())
        } else if let Some(why) = last.strip_prefix("skip ") {
            Err(why.to_owned())
        } else {
            Err(format!(
                "ci/systemd-bootstrap.sh {}: {} {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    /// Why no manager can run here, if none can.
    fn cannot_run(&self) -> Option<String> {
        if !cfg!(target_os = "linux") {
            return Some("systemd runs on Linux only".into());
        }
        if !nix::unistd::geteuid().is_root() {
            return Some("not root: a private manager needs a mount namespace and cgroups".into());
        }
        if let Err(why) = self.bootstrap(&["needs"]) {
            return Some(why);
        }
        match Command::new("unshare")
            .args(["--mount", "true"])
            .stdin(Stdio::null())
            .output()
        {
            Ok(output) if output.status.success() => None,
            Ok(output) => Some(format!(
                "cannot make a mount namespace: {}",
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Err(e) => Some(format!("cannot run unshare: {e}")),
        }
    }

    fn systemd(&self) -> Result<Systemd, String> {
        match self.config.suite {
            Suite::System => {
                let exec = first_executable(["/lib/systemd/systemd", "/usr/lib/systemd/systemd"])
                    .ok_or("no /lib/systemd/systemd")?;
                let ctl = first_executable(["/bin/systemctl", "/usr/bin/systemctl"])
                    .ok_or("no systemctl")?;
                let version = version_of(&ctl, None);
                Ok(Systemd {
                    exec,
                    ctl,
                    lib: None,
                    units: "/usr/lib/systemd/user".into(),
                    version,
                })
            }
            Suite::Backports => {
                let dir = self.config.backports_dir.to_string_lossy().into_owned();
                let root = PathBuf::from(self.bootstrap(&["backports", &dir])?);
                let under = |paths: [&str; 2]| first_executable(paths.map(|p| root.join(p)));
                let exec = under(["lib/systemd/systemd", "usr/lib/systemd/systemd"])
                    .ok_or("no systemd in the unpacked bookworm-backports")?;
                let ctl = under(["bin/systemctl", "usr/bin/systemctl"])
                    .ok_or("no systemctl in the unpacked bookworm-backports")?;
                // libsystemd-shared, under the architecture's folder
                // (usr/lib/x86_64-linux-gnu/systemd on amd64).
                let lib = fs::read_dir(root.join("usr/lib"))
                    .map_err(|e| format!("{}: {e}", root.join("usr/lib").display()))?
                    .flatten()
                    .map(|entry| entry.path().join("systemd"))
                    .find(|dir| {
                        fs::read_dir(dir).is_ok_and(|mut files| {
                            files.any(|f| {
                                f.is_ok_and(|f| {
                                    f.file_name()
                                        .to_string_lossy()
                                        .starts_with("libsystemd-shared")
                                })
                            })
                        })
                    })
                    .ok_or("no libsystemd-shared in the unpacked bookworm-backports")?;
                let version = version_of(&ctl, Some(&lib));
                Ok(Systemd {
                    exec,
                    ctl,
                    lib: Some(lib),
                    units: root.join("usr/lib/systemd/user"),
                    version,
                })
            }
        }
    }

    fn suite(&mut self, report: &mut Report) {
        let suite = self.config.suite;
        let every = [
            "pidfile",
            "notify",
            "notify-reload",
            "socket-activation",
            "systemd-socket-activate",
        ];
        if let Some(why) = self.cannot_run() {
            for case in every {
                if self.wanted(case) {
                    report.report(case, "?", Verdict::Skipped(why.clone()));
                }
            }
            return;
        }
        let systemd = match self.systemd() {
            Ok(systemd) => systemd,
            Err(why) => {
                // Only the backports suite can miss its systemd; it is
                // there for notify-reload.
                if self.wanted("notify-reload") {
                    report.report("notify-reload", "253+", Verdict::Skipped(why));
                }
                return;
            }
        };
        let version = systemd.version.clone();
        let major: u32 = version
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let backports_elsewhere = self.config.elsewhere.contains(&Suite::Backports);
        match Manager::start(self, suite.name(), &systemd) {
            Err(why) => {
                report.say(format!(
                    "systemd: WARNING: no systemd {version} manager can run here, so its cases are SKIPPED: {why}"
                ));
                for case in ["pidfile", "notify", "notify-reload", "socket-activation"] {
                    if case == "notify-reload" && major < 253 && backports_elsewhere {
                        continue;
                    }
                    if self.wanted(case) {
                        report.report(case, &version, Verdict::Skipped(why.clone()));
                    }
                }
            }
            Ok(manager) => {
                report.say(format!(
                    "systemd: systemd {version} --user manager running (pid {}, logs in {})",
                    manager.pid.unwrap_or(0),
                    manager.dir.display()
                ));
                self.managed_cases(&manager, major, backports_elsewhere, report);
                drop(manager);
            }
        }
        if suite == Suite::System && self.wanted("systemd-socket-activate") {
            self.socket_activate(report, &version, "systemd-socket-activate", Some("http"));
            self.socket_activate(
                report,
                &version,
                "systemd-socket-activate, no --fdname",
                None,
            );
        }
    }

    fn managed_cases(
        &mut self,
        manager: &Manager,
        major: u32,
        backports_elsewhere: bool,
        report: &mut Report,
    ) {
        if self.wanted("notify-reload") && major < 253 && !backports_elsewhere {
            report.report(
                "notify-reload",
                &manager.version,
                Verdict::Skipped(
                    "Type=notify-reload needs systemd >= 253; the backports suite was not asked for"
                        .into(),
                ),
            );
        }
        let specs: Vec<&Spec> = CASES
            .iter()
            .filter(|spec| self.wanted(spec.group) && major >= spec.needs)
            .collect();
        for spec in specs {
            let port = self.ports.free();
            let installed = manager
                .install(self.config, spec.source, spec.unit, port, &spec.edit)
                .and_then(|()| match &spec.socket {
                    Some((socket, edit)) => {
                        manager.install(self.config, "http-server.socket", socket, port, edit)
                    }
                    None => Ok(()),
                });
            if let Err(e) = installed {
                report.report(spec.name, &manager.version, Verdict::Fail);
                report.detail(format!("install {}: {e}", spec.unit));
                continue;
            }
            let outcome = ManagedCase::new(self, manager, spec, port).run();
            outcome.report(spec, manager, report);
            if spec.name == "notify, RestrictNamespaces=yes" {
                let log = manager.dir.join("notify-restrict-namespaces.log");
                if !read(&log).contains("successor started with clone(2)") {
                    report.say(
                        "systemd: note: no \"successor started with clone(2)\" in the RestrictNamespaces=yes case's log: clone3 was not refused here (no seccomp in this manager?), or the fallback did not run",
                    );
                }
            }
        }
    }

    /// systemd-socket-activate (no manager): it makes the socket and, on
    /// the first connection, execs the example with `LISTEN_FDS=1` (and
    /// `LISTEN_FDNAMES=http` with `--fdname=http`; without it the socket
    /// has no name the example asks for, and must be taken all the same).
    /// That first connection must be answered, not reset; then SIGHUP, GET
    /// again, SIGTERM.
    fn socket_activate(
        &mut self,
        report: &mut Report,
        version: &str,
        name: &str,
        fdname: Option<&str>,
    ) {
        let Some(tool) = first_executable([
            "/usr/bin/systemd-socket-activate",
            "/bin/systemd-socket-activate",
            "/lib/systemd/systemd-socket-activate",
            "/usr/lib/systemd/systemd-socket-activate",
        ]) else {
            report.report(
                name,
                version,
                Verdict::Skipped("no systemd-socket-activate".into()),
            );
            return;
        };
        let port = self.ports.free();
        let dir = self.work.join(format!(
            "socket-activate{}",
            fdname.map(|n| format!("-{n}")).unwrap_or_default()
        ));
        let pid_file = dir.join("svc.pid");
        let log = dir.join("svc.log");
        let spawned = fs::create_dir_all(&dir)
            .and_then(|()| fs::File::create(&log))
            .and_then(|file| Ok((file.try_clone()?, file)))
            .and_then(|(out, err)| {
                let mut command = Command::new(&tool);
                command.arg("-l").arg(format!("127.0.0.1:{port}"));
                if let Some(fdname) = fdname {
                    command.arg(format!("--fdname={fdname}"));
                }
                // It passes the program only the variables named with -E.
                // The example's own address (--listen) is elsewhere: the
                // activated socket must win.
                command
                    .args(["-E", "NO_COLOR=1", "-E", "RUST_LOG=info"])
                    .arg(&self.config.example)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{}", self.ports.free()))
                    .arg("--pid-file")
                    .arg(&pid_file)
                    .stdin(Stdio::null())
                    .stdout(out)
                    .stderr(err)
                    .spawn()
            });
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                report.report(name, version, Verdict::Fail);
                report.detail(format!("why: cannot start {}: {e}", tool.display()));
                return;
            }
        };
        let pid = child.id() as i32;
        self.outside.push(pid);
        let mut new = None;
        let why = (|| -> Result<(), String> {
            // The first connection starts the example; tried again only
            // while the tool does not listen yet.
            let first = until(Duration::from_secs(10), || {
                match get(port, Duration::from_secs(10)) {
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => None,
                    other => Some(other),
                }
            });
            let body = match first {
                Some(Ok(body)) => body,
                Some(Err(e)) => {
                    return Err(format!(
                        "the connection that activated the example failed: {e}"
                    ));
                }
                None => return Err("systemd-socket-activate did not listen within 10 s".into()),
            };
            if !body.starts_with(&format!("pid={pid} ")) {
                return Err(format!(
                    "the connection that activated the example got '{body}' (want pid={pid})"
                ));
            }
            kill(Pid::from_raw(pid), Signal::SIGHUP).map_err(|e| format!("SIGHUP {pid}: {e}"))?;
            let successor = until(SETTLE, || {
                let named = read_pid(&pid_file).filter(|&p| p != pid)?;
                // The first generation is this process's child: gone once
                // reaped.
                matches!(child.try_wait(), Ok(Some(_))).then_some(named)
            });
            let Some(successor) = successor else {
                let alive = matches!(child.try_wait(), Ok(None));
                return Err(format!(
                    "after SIGHUP: the PID file says {:?}, the first generation {pid} {}",
                    read_pid(&pid_file),
                    if alive { "still alive" } else { "gone" }
                ));
            };
            new = Some(successor);
            self.outside.push(successor);
            let body = get_from(port, successor);
            if !body.starts_with(&format!("pid={successor} ")) {
                return Err(format!(
                    "after SIGHUP the PID file names {successor} but GET / answered '{body}'"
                ));
            }
            kill(Pid::from_raw(successor), Signal::SIGTERM)
                .map_err(|e| format!("SIGTERM {successor}: {e}"))?;
            if until(Duration::from_secs(10), || {
                (!crate::process::is_running(successor)).then_some(())
            })
            .is_none()
            {
                return Err(format!("pid {successor} still alive 10 s after SIGTERM"));
            }
            if !read(&log).contains("stopping") {
                return Err("no 'stopping' in its log after SIGTERM".into());
            }
            Ok(())
        })();
        // Whatever of it still runs (after a failure), by pid.
        for p in std::iter::once(pid).chain(new) {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
        }
        let _ = child.wait();
        match why {
            Ok(()) => {
                report.report(name, version, Verdict::Pass);
                report.detail(format!(
                    "generation 0 pid {pid} answered the activating connection, after SIGHUP pid {}: both served GET /; SIGTERM stopped it",
                    new.unwrap_or(0)
                ));
            }
            Err(why) => {
                report.report(name, version, Verdict::Fail);
                report.detail(format!("why: {why}"));
                report.detail("its log, last lines:");
                report.detail(indent(&tail_lines(&read(&log), 8)));
            }
        }
    }

    /// Kills, by pid, what this run started outside a manager and still
    /// runs the example.
    fn kill_outside(&self) {
        let example = self.config.example.to_string_lossy().into_owned();
        for &pid in &self.outside {
            let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&example) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Whether a case decides the suite, or records what systemd does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Case,
    Finding,
}

/// A managed case.
#[derive(Debug, Clone)]
struct Spec {
    /// The name `SYSTEMD_CASES` selects it by.
    group: &'static str,
    kind: Kind,
    name: &'static str,
    /// The unit installed, made from `source` with `edit`.
    unit: &'static str,
    source: &'static str,
    edit: Edit,
    /// The socket unit that activates it, and its variant.
    socket: Option<(&'static str, Edit)>,
    /// Reloads in pairs, the second while the old generation drains.
    back_to_back: bool,
    /// [`Config::reloads`] reloads, or [`Config::finding_reloads`].
    all_reloads: bool,
    /// The oldest systemd that has what it needs.
    needs: u32,
}

impl Spec {
    const fn new(group: &'static str, kind: Kind, name: &'static str) -> Spec {
        Spec {
            group,
            kind,
            name,
            unit: "",
            source: "",
            edit: Edit::None,
            socket: None,
            back_to_back: false,
            all_reloads: matches!(kind, Kind::Case),
            needs: 0,
        }
    }

    /// The example unit `source` as is, under its own name.
    const fn of(self, source: &'static str) -> Spec {
        Spec {
            source,
            unit: source,
            ..self
        }
    }

    /// A variant of `source`, installed as `unit`.
    const fn variant(self, source: &'static str, unit: &'static str, edit: Edit) -> Spec {
        Spec {
            source,
            unit,
            edit,
            ..self
        }
    }

    const fn back_to_back(self) -> Spec {
        Spec {
            back_to_back: true,
            ..self
        }
    }

    const fn few_reloads(self) -> Spec {
        Spec {
            all_reloads: false,
            ..self
        }
    }

    const fn socket(self, socket: &'static str, edit: Edit) -> Spec {
        Spec {
            socket: Some((socket, edit)),
            ..self
        }
    }

    const fn needs(self, version: u32) -> Spec {
        Spec {
            needs: version,
            ..self
        }
    }
}

const PIDFILE: &str = "http-server-pidfile.service";
const NOTIFY: &str = "http-server-notify.service";
const NOTIFY_RELOAD: &str = "http-server-notify-reload.service";
const SOCKET_SERVICE: &str = "http-server-socket.service";

/// Every managed case and finding, in the order they run.
const CASES: &[Spec] = {
    use Edit::{HandoverUpgrade, KillModeProcess, RestrictNamespaces, Without};
    use Kind::{Case, Finding};
    &[
        Spec::new("pidfile", Case, "pidfile").of(PIDFILE),
        Spec::new("pidfile", Finding, "pidfile, KillMode=process").variant(
            PIDFILE,
            "pidfile-killmode-process.service",
            KillModeProcess,
        ),
        // The second reload of each pair while the first one's old
        // generation drains: MainPID moved to the successor when it served
        // (MAINPID=, which NotifyAccess= lets the old generation send), so
        // the second `kill -HUP $MAINPID` reaches the serving generation.
        Spec::new("pidfile", Case, "pidfile, back-to-back reloads")
            .variant(PIDFILE, "pidfile-back-to-back.service", Edit::None)
            .back_to_back(),
        // Without NotifyAccess=, systemd learns of the new main process only
        // when a reload command ends or the old one exits: a second reload
        // can signal a generation that is exiting (and be lost). Recorded.
        Spec::new(
            "pidfile",
            Finding,
            "pidfile without NotifyAccess=, back-to-back reloads",
        )
        .variant(
            PIDFILE,
            "pidfile-no-notify-back-to-back.service",
            Without("NotifyAccess="),
        )
        .back_to_back(),
        Spec::new("notify", Case, "notify").of(NOTIFY),
        // `systemctl reload` that reports the upgrade's outcome.
        Spec::new("notify", Case, "notify, ExecReload=handover upgrade").variant(
            NOTIFY,
            "notify-handover-upgrade.service",
            HandoverUpgrade,
        ),
        Spec::new("notify", Case, "notify, back-to-back reloads")
            .variant(NOTIFY, "notify-back-to-back.service", Edit::None)
            .back_to_back(),
        // A hardened unit: RestrictNamespaces= makes clone3 fail with ENOSYS
        // (seccomp cannot look into its arguments), and successors are
        // started with clone(2) instead, still as systemd's children.
        Spec::new("notify", Case, "notify, RestrictNamespaces=yes")
            .variant(
                NOTIFY,
                "notify-restrict-namespaces.service",
                RestrictNamespaces,
            )
            .few_reloads(),
        Spec::new("notify", Finding, "notify, KillMode=process").variant(
            NOTIFY,
            "notify-killmode-process.service",
            KillModeProcess,
        ),
        // systemd learns the new main process from MAINPID= alone.
        Spec::new("notify", Finding, "notify, MAINPID= only (no PIDFile=)").variant(
            NOTIFY,
            "notify-mainpid.service",
            Without("PIDFile="),
        ),
        Spec::new("notify-reload", Case, "notify-reload")
            .of(NOTIFY_RELOAD)
            .needs(253),
        Spec::new("notify-reload", Case, "notify-reload, back-to-back reloads")
            .variant(
                NOTIFY_RELOAD,
                "notify-reload-back-to-back.service",
                Edit::None,
            )
            .back_to_back()
            .needs(253),
        Spec::new("notify-reload", Finding, "notify-reload, KillMode=process")
            .variant(
                NOTIFY_RELOAD,
                "notify-reload-killmode-process.service",
                KillModeProcess,
            )
            .needs(253),
        Spec::new(
            "notify-reload",
            Finding,
            "notify-reload, MAINPID= only (no PIDFile=)",
        )
        .variant(
            NOTIFY_RELOAD,
            "notify-reload-mainpid.service",
            Without("PIDFile="),
        )
        .needs(253),
        Spec::new("socket-activation", Case, "socket-activation")
            .of(SOCKET_SERVICE)
            .socket("http-server.socket", Edit::None),
        // The same socket unit without FileDescriptorName=: systemd names
        // the socket after the unit, and the example must still take it.
        Spec::new(
            "socket-activation",
            Case,
            "socket-activation, no FileDescriptorName=",
        )
        .variant(
            SOCKET_SERVICE,
            "unnamed-socket.service",
            Edit::UnnamedSocketService,
        )
        .socket("unnamed.socket", Edit::UnnamedSocket)
        .few_reloads(),
    ]
};

/// A change to an example unit for a variant.
#[derive(Debug, Clone, Copy)]
enum Edit {
    None,
    KillModeProcess,
    RestrictNamespaces,
    Without(&'static str),
    /// `ExecReload=handover upgrade --socket`, and the example's control
    /// socket there.
    HandoverUpgrade,
    /// The socket unit without `FileDescriptorName=`, for
    /// `unnamed-socket.service`.
    UnnamedSocket,
    /// The service of that socket.
    UnnamedSocketService,
}

impl Edit {
    /// The unit file `text` with this change (`cli`: the `handover`
    /// client, for [`Edit::HandoverUpgrade`]).
    fn apply(self, text: &str, cli: &Path) -> String {
        let edit = |line: &str| -> Vec<String> {
            match self {
                Edit::KillModeProcess if line == "[Service]" => {
                    vec![line.into(), "KillMode=process".into()]
                }
                Edit::RestrictNamespaces if line == "[Service]" => {
                    vec![line.into(), "RestrictNamespaces=yes".into()]
                }
                Edit::Without(key) if line.starts_with(key) => Vec::new(),
                Edit::UnnamedSocket if line.starts_with("FileDescriptorName=") => Vec::new(),
                Edit::UnnamedSocket if line.starts_with("Service=") => {
                    vec!["Service=unnamed-socket.service".into()]
                }
                Edit::UnnamedSocketService => {
                    vec![line.replace("http-server.socket", "unnamed.socket")]
                }
                Edit::HandoverUpgrade if line.starts_with("ExecStart=") => {
                    vec![format!("{line} --control-socket %t/%N.sock")]
                }
                Edit::HandoverUpgrade if line.starts_with("ExecReload=") => {
                    vec![format!(
                        "ExecReload={} upgrade --socket %t/%N.sock",
                        cli.display()
                    )]
                }
                _ => vec![line.into()],
            }
        };
        text.lines()
            .flat_map(edit)
            .map(|line| line + "\n")
            .collect()
    }
}

/// A private `systemd --user` manager, torn down on drop: SIGTERM (it
/// stops its units), then SIGKILL; whatever is left in its cgroups is
/// killed by pid and the cgroups removed.
struct Manager {
    dir: PathBuf,
    ctl: PathBuf,
    lib: Option<PathBuf>,
    version: String,
    script: Option<Child>,
    pid: Option<i32>,
    cgroups: Vec<PathBuf>,
}

impl Manager {
    fn start(run: &Run<'_>, label: &str, systemd: &Systemd) -> Result<Manager, String> {
        let dir = run.work.join(label);
        let rt = dir.join("rt");
        let units = dir.join("units");
        fs::create_dir_all(&units)
            .and_then(|()| fs::create_dir_all(&rt))
            .map_err(|e| format!("{}: {e}", dir.display()))?;
        set_mode(&rt, 0o700).map_err(|e| format!("{}: {e}", rt.display()))?;
        for unit in [
            "default.target",
            "basic.target",
            "exit.target",
            "shutdown.target",
            "systemd-exit.service",
        ] {
            fs::copy(systemd.units.join(unit), units.join(unit))
                .map_err(|e| format!("no {}: {e}", systemd.units.join(unit).display()))?;
        }
        let name = format!("handover-systemd-{label}-{}", std::process::id());
        let root = Path::new("/sys/fs/cgroup");
        let hierarchies: Vec<PathBuf> = if root.join("cgroup.controllers").exists() {
            vec![root.to_owned()]
        } else {
            ["unified", "systemd"]
                .iter()
                .map(|h| root.join(h))
                .filter(|h| h.is_dir())
                .collect()
        };
        if hierarchies.is_empty() {
            return Err("no cgroup hierarchy for systemd under /sys/fs/cgroup".into());
        }
        let mut manager = Manager {
            dir: dir.clone(),
            ctl: systemd.ctl.clone(),
            lib: systemd.lib.clone(),
            version: systemd.version.clone(),
            script: None,
            pid: None,
            cgroups: Vec::new(),
        };
        for hierarchy in hierarchies {
            let cgroup = hierarchy.join(&name);
            fs::create_dir(&cgroup)
                .map_err(|e| format!("cannot create the cgroup {}: {e}", cgroup.display()))?;
            manager.cgroups.push(cgroup);
        }
        let log = fs::File::create(dir.join("manager.log"))
            .map_err(|e| format!("{}: {e}", dir.join("manager.log").display()))?;
        let mut command = Command::new("bash");
        command
            .arg(run.config.repo.join("ci/systemd-bootstrap.sh"))
            .arg("manager")
            .arg(&dir)
            .arg(&systemd.exec)
            .arg(systemd.lib.as_deref().unwrap_or(Path::new("")))
            .args(&manager.cgroups)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        manager.script = Some(command.spawn().map_err(|e| format!("bash: {e}"))?);
        let private = rt.join("systemd/private");
        let running = until(Duration::from_secs(15), || {
            if manager.pid.is_none() {
                manager.pid = read_pid(&dir.join("manager.pid"));
            }
            if let Some(Ok(Some(status))) = manager.script.as_mut().map(Child::try_wait) {
                return Some(Err(format!("the manager exited ({status})")));
            }
            if !private.exists() {
                return None;
            }
            let state = manager.property_of_manager("SystemState");
            matches!(state.as_str(), "running" | "degraded").then_some(Ok(()))
        });
        match running {
            Some(Ok(())) => Ok(manager),
            Some(Err(why)) => Err(format!("{why}: {}", manager.log_tail())),
            None => Err(format!(
                "the manager did not start within 15 s (state '{}'): {}",
                manager.property_of_manager("SystemState"),
                manager.log_tail()
            )),
        }
    }

    fn log_tail(&self) -> String {
        let log = read(&self.dir.join("manager.log"));
        log.lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim()
            .to_owned()
    }

    /// `systemctl --user ARGS`, bounded: 60 s.
    fn ctl(&self, args: &[&str]) -> Result<String, String> {
        let mut command = Command::new("timeout");
        command
            .arg("60")
            .arg(&self.ctl)
            .arg("--user")
            .args(args)
            .env("XDG_RUNTIME_DIR", self.dir.join("rt"))
            .stdin(Stdio::null());
        if let Some(lib) = &self.lib {
            command.env("LD_LIBRARY_PATH", lib);
        }
        let output = command
            .output()
            .map_err(|e| format!("{}: {e}", self.ctl.display()))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(format!(
                "systemctl {}: {} {}",
                args.join(" "),
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        }
    }

    fn property_of_manager(&self, name: &str) -> String {
        self.ctl(&["show", "-p", name, "--value"])
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    }

    /// The unit's properties asked for.
    fn show(&self, unit: &str, names: &[&str]) -> HashMap<String, String> {
        let mut args = vec!["show"];
        let flags: Vec<String> = names.iter().map(|n| format!("-p{n}")).collect();
        args.extend(flags.iter().map(String::as_str));
        args.push(unit);
        self.ctl(&args)
            .unwrap_or_default()
            .lines()
            .filter_map(|line| line.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect()
    }

    fn property(&self, unit: &str, name: &str) -> String {
        self.show(unit, &[name]).remove(name).unwrap_or_default()
    }

    fn log_size(&self) -> u64 {
        fs::metadata(self.dir.join("manager.log")).map_or(0, |m| m.len())
    }

    /// The manager's log from byte `offset` on, without the pty's `\r`.
    fn log_since(&self, offset: u64) -> String {
        let mut text = Vec::new();
        if let Ok(mut file) = fs::File::open(self.dir.join("manager.log")) {
            use std::io::Seek;
            let _ = file.seek(io::SeekFrom::Start(offset));
            let _ = file.read_to_end(&mut text);
        }
        String::from_utf8_lossy(&text).replace('\r', "")
    }

    /// Installs an example unit for this manager: the binary and port
    /// substituted, the variant's edit applied, and (for a service) a
    /// drop-in that sends its output to `<dir>/<unit stem>.log`.
    fn install(
        &self,
        config: &Config,
        source: &str,
        name: &str,
        port: u16,
        edit: &Edit,
    ) -> io::Result<()> {
        let text = fs::read_to_string(config.repo.join("examples/systemd").join(source))?
            .replace(
                "/usr/local/bin/http_server",
                &config.example.to_string_lossy(),
            )
            .replace("/usr/local/bin/handover", &config.cli.to_string_lossy())
            .replace("127.0.0.1:8080", &format!("127.0.0.1:{port}"));
        let units = self.dir.join("units");
        fs::write(units.join(name), edit.apply(&text, &config.cli))?;
        if let Some(stem) = name.strip_suffix(".service") {
            let dropins = units.join(format!("{name}.d"));
            fs::create_dir_all(&dropins)?;
            let log = self.dir.join(format!("{stem}.log"));
            fs::write(
                dropins.join("ci.conf"),
                format!(
                    "[Service]\nEnvironment=NO_COLOR=1 RUST_LOG=info {}\nStandardOutput=append:{}\nStandardError=append:{}\nTimeoutStopSec=20\n",
                    config.service_env,
                    log.display(),
                    log.display()
                ),
            )?;
        }
        Ok(())
    }

    /// The pids in a unit's cgroup (`ControlGroup=` is the path from the
    /// root of the hierarchy), from the first hierarchy that has it.
    fn cgroup_procs(&self, control_group: &str) -> Vec<i32> {
        if control_group.is_empty() {
            return Vec::new();
        }
        for cgroup in &self.cgroups {
            let Some(hierarchy) = cgroup.parent() else {
                continue;
            };
            let procs = hierarchy
                .join(control_group.trim_start_matches('/'))
                .join("cgroup.procs");
            if let Ok(text) = fs::read_to_string(procs) {
                return text.lines().filter_map(|l| l.trim().parse().ok()).collect();
            }
        }
        Vec::new()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            let pid = Pid::from_raw(pid);
            if kill(pid, Signal::SIGTERM).is_ok()
                && until(Duration::from_secs(15), || {
                    kill(pid, None).is_err().then_some(())
                })
                .is_none()
            {
                let _ = kill(pid, Signal::SIGKILL);
            }
        }
        if let Some(mut script) = self.script.take() {
            if until(Duration::from_secs(5), || script.try_wait().ok().flatten()).is_none() {
                let _ = script.kill();
            }
            let _ = script.wait();
        }
        // Whatever is left in its cgroups is ours: kill it by pid, then
        // remove the cgroups, deepest first.
        for cgroup in &self.cgroups {
            for pid in procs_under(cgroup) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            let _ = until(Duration::from_secs(5), || {
                remove_cgroups(cgroup);
                (!cgroup.exists()).then_some(())
            });
        }
    }
}

/// Every pid in the cgroup `dir` and below it.
fn procs_under(dir: &Path) -> Vec<i32> {
    let mut pids: Vec<i32> = fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            pids.extend(procs_under(&entry.path()));
        }
    }
    pids
}

/// Removes the cgroup `dir` and those below it, deepest first (what is
/// still busy stays).
fn remove_cgroups(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroups(&entry.path());
        }
    }
    let _ = fs::remove_dir(dir);
}

/// How the unit's last main process was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopHow {
    NotStopped,
    Sigterm,
    Sigkill,
    Unknown,
}

impl fmt::Display for StopHow {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopHow::NotStopped => "not stopped",
            StopHow::Sigterm => "sigterm",
            StopHow::Sigkill => "sigkill",
            StopHow::Unknown => "unknown",
        })
    }
}

/// What a managed case saw.
#[derive(Debug)]
struct Outcome {
    /// Start, reloads, load: empty when clean.
    reload_fail: Vec<String>,
    /// Empty when SIGTERM stopped it cleanly.
    stop_fail: Vec<String>,
    stop_how: StopHow,
    /// The manager's lines about the stop.
    stop_lines: Vec<String>,
    /// A one-line summary.
    info: String,
    /// "not our child" lines.
    alien: usize,
}

impl Outcome {
    fn report(&self, spec: &Spec, manager: &Manager, report: &mut Report) {
        let clean = self.reload_fail.is_empty() && self.stop_fail.is_empty();
        match spec.kind {
            Kind::Finding => report.say(format!(
                "systemd: finding: {} (systemd {}): reload {}; stop {}",
                spec.name,
                manager.version,
                if self.reload_fail.is_empty() {
                    "clean"
                } else {
                    "NOT clean"
                },
                self.stop_how
            )),
            Kind::Case => report.report(
                spec.name,
                &manager.version,
                if clean { Verdict::Pass } else { Verdict::Fail },
            ),
        }
        report.detail(&self.info);
        if clean {
            return;
        }
        if !self.reload_fail.is_empty() {
            report.detail(format!("reload: {}", self.reload_fail.join("; ")));
        }
        if !self.stop_fail.is_empty() {
            report.detail(format!("stop: {}", self.stop_fail.join("; ")));
        }
        if self.stop_how == StopHow::Sigkill && self.alien > 0 {
            report.detail(
                "hint: systemd took MAINPID= from a process that was not its child (a successor is the old generation's child): it marks that main process alien and, on stop, sends SIGKILL right after SIGTERM. With PIDFile=, a successor must not send MAINPID=: systemd reads the PID file when the old process exits, and the new one is its child by then.",
            );
        }
        if !self.stop_lines.is_empty() {
            report.detail("manager, about the stop:");
            report.detail(indent(&self.stop_lines.join("\n")));
        }
        let log = manager.dir.join(format!("{}.log", stem(spec.unit)));
        report.detail(format!("service log ({}), last lines:", log.display()));
        report.detail(indent(&tail_lines(&read(&log), 8)));
    }
}

/// The unit's main process and state, from `systemctl show`.
#[derive(Debug, Default)]
struct Main {
    pid: i32,
    active: String,
    sub: String,
}

impl fmt::Display for Main {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MainPID={} {}/{}", self.pid, self.active, self.sub)
    }
}

/// One managed case: start, reload under load, check, stop.
struct ManagedCase<'a> {
    manager: &'a Manager,
    spec: &'a Spec,
    port: u16,
    /// Reloads to make.
    count: usize,
    own_children: bool,
    pid_file: PathBuf,
    service_log: PathBuf,
    /// Every reload: `old->new(gen N, T ms)`.
    reloads: Vec<String>,
    /// The main process, as last seen.
    main: Main,
    /// The generation serving now.
    generation: u64,
    /// The load's one-line summary.
    load_line: String,
}

impl<'a> ManagedCase<'a> {
    fn new(run: &Run<'_>, manager: &'a Manager, spec: &'a Spec, port: u16) -> ManagedCase<'a> {
        let stem = stem(spec.unit);
        ManagedCase {
            manager,
            spec,
            port,
            count: if spec.all_reloads {
                run.config.reloads
            } else {
                run.config.finding_reloads
            },
            own_children: run.config.own_children,
            pid_file: manager.dir.join("rt").join(format!("{stem}.pid")),
            service_log: manager.dir.join(format!("{stem}.log")),
            reloads: Vec::new(),
            main: Main::default(),
            generation: 0,
            load_line: "none".into(),
        }
    }

    fn main_now(&self) -> Main {
        let mut props = self
            .manager
            .show(self.spec.unit, &["MainPID", "ActiveState", "SubState"]);
        Main {
            pid: props
                .get("MainPID")
                .and_then(|p| p.parse().ok())
                .unwrap_or(0),
            active: props.remove("ActiveState").unwrap_or_default(),
            sub: props.remove("SubState").unwrap_or_default(),
        }
    }

    /// Waits until MainPID is neither `old` nor 0 and the unit is
    /// active/running. Bounded: 30 s.
    fn wait_new_main(&mut self, old: i32) -> Result<(), String> {
        let found = until(SETTLE, || {
            let main = self.main_now();
            (main.pid != old && main.pid != 0 && main.active == "active" && main.sub == "running")
                .then_some(main)
        });
        match found {
            Some(main) => {
                self.main = main;
                Ok(())
            }
            None => {
                self.main = self.main_now();
                Err(format!("30 s later {} (was {old})", self.main))
            }
        }
    }

    /// Waits until the unit's cgroup holds only the main process (the old
    /// generation has drained and left). Bounded: 30 s.
    fn wait_one_process(&self) -> Result<(), String> {
        let control_group = self.manager.property(self.spec.unit, "ControlGroup");
        until(SETTLE, || {
            (self.manager.cgroup_procs(&control_group).len() <= 1).then_some(())
        })
        .ok_or_else(|| {
            format!(
                "the unit's cgroup still holds {} processes 30 s later",
                self.manager.cgroup_procs(&control_group).len()
            )
        })
    }

    fn check_pid_file(&self) -> Result<(), String> {
        match read_pid(&self.pid_file) {
            Some(pid) if pid == self.main.pid => Ok(()),
            other => Err(format!(
                "MainPID={} but the PID file says {other:?}",
                self.main.pid
            )),
        }
    }

    fn run(mut self) -> Outcome {
        let manager = self.manager;
        let unit = self.spec.unit;
        let case_offset = manager.log_size();
        let mut reload_fail = Vec::new();
        if let Err(e) = manager.ctl(&["daemon-reload"]) {
            reload_fail.push(e);
        }
        let started = match self.spec.socket.map(|(socket, _)| socket) {
            Some(socket) => manager.ctl(&["start", socket]).and_then(|_| {
                // The first connection activates the service.
                let body = get(self.port, Duration::from_secs(5)).unwrap_or_default();
                if body.starts_with("pid=") {
                    Ok(())
                } else {
                    Err(format!("the first GET through {socket} answered '{body}'"))
                }
            }),
            None => manager.ctl(&["start", unit]).map(drop),
        }
        .and_then(|()| {
            self.wait_new_main(0)
                .map_err(|e| format!("not active/running after start: {e}"))
        });
        if let Err(e) = started {
            let mut why = e;
            let log = tail_lines(&read(&self.service_log), 5);
            if !log.is_empty() {
                why += &format!("\nservice log: {log}");
            }
            reload_fail.push(why);
            let mut stop = vec!["stop", unit];
            stop.extend(self.spec.socket.map(|(socket, _)| socket));
            let _ = manager.ctl(&stop);
            return Outcome {
                reload_fail,
                stop_fail: Vec::new(),
                stop_how: StopHow::NotStopped,
                stop_lines: Vec::new(),
                info: format!("reloads: none; load: {}", self.load_line),
                alien: 0,
            };
        }
        if let Err(e) = self.under_load() {
            reload_fail.push(e);
        }

        // Stop: SIGTERM, and the service drains and exits; not SIGKILL.
        let mut stop_fail = Vec::new();
        let last = self.main.pid;
        let control_group = manager.property(unit, "ControlGroup");
        let offset = manager.log_size();
        let t0 = Instant::now();
        if let Err(e) = manager.ctl(&["stop", unit]) {
            stop_fail.push(e);
        }
        let stop_ms = t0.elapsed().as_millis();
        if last != 0
            && until(Duration::from_secs(10), || {
                kill(Pid::from_raw(last), None).is_err().then_some(())
            })
            .is_none()
        {
            stop_fail.push(format!("pid {last} still alive 10 s after the stop"));
        }
        let result = manager.property(unit, "Result");
        // The manager's lines about the stop reach its log through a pty:
        // wait for its last one (the unit's state change to dead/failed).
        let state_line = format!("{unit}: Changed ");
        let _ = until(Duration::from_secs(5), || {
            manager
                .log_since(offset)
                .lines()
                .any(|l| {
                    l.contains(&state_line) && (l.ends_with("-> dead") || l.ends_with("-> failed"))
                })
                .then_some(())
        });
        let (stop_how, stop_lines) = self.stop_evidence(offset);
        // (Connections still queued on the socket would start the service again.)
        if let Some((socket, _)) = &self.spec.socket {
            let _ = manager.ctl(&["stop", socket, unit]);
        }
        // Nothing of the service may outlive its stop (an untracked
        // generation would, with KillMode=process): kill what is left, by
        // pid, and say so.
        let left = manager.cgroup_procs(&control_group);
        if !left.is_empty() {
            stop_fail.push(format!(
                "processes left in the unit's cgroup after the stop: {left:?}"
            ));
            for pid in left {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        if stop_how != StopHow::Sigterm {
            stop_fail.push(format!("stopped by {stop_how}, not SIGTERM"));
        }
        if result != "success" {
            stop_fail.push(format!("Result={result}, not success"));
        }
        let drains = drain_times(&read(&self.service_log));
        let alien = manager
            .log_since(case_offset)
            .lines()
            .filter(|l| l.contains(unit) && l.contains("which is not our child"))
            .count();
        if alien > 0 {
            reload_fail.push(format!(
                "systemd said 'Supervising process N which is not our child' {alien} times"
            ));
        }
        // Under systemd the library starts every successor as systemd's own
        // child and names it when it serves; a case in which no generation
        // did ran the other design (its successors the old generation's
        // children), which this suite must not take for a pass.
        let named = read(&self.service_log)
            .matches("successor named the main process")
            .count();
        if !self.reloads.is_empty() && named == 0 && !self.own_children {
            reload_fail.push("no generation started its successor as systemd's child (no 'successor named the main process' in the service's log)".into());
        }
        let reloads = if self.reloads.is_empty() {
            "none".to_owned()
        } else {
            self.reloads.join(" ")
        };
        Outcome {
            info: format!(
                "reloads: {reloads}; load: {}; drains: {drains}; stop: {stop_how} in {stop_ms}ms, Result={result}; systemd said 'not our child' {alien} times; successors named at commit: {named}",
                self.load_line
            ),
            reload_fail,
            stop_fail,
            stop_how,
            stop_lines,
            alien,
        }
    }

    /// The reloads, under load; then the load's verdict.
    fn under_load(&mut self) -> Result<(), String> {
        let body = get_from(self.port, self.main.pid);
        if !body.starts_with(&format!("pid={} ", self.main.pid)) {
            return Err(format!(
                "after start MainPID={} but GET / answered '{body}'",
                self.main.pid
            ));
        }
        let load = start_load(self.port);
        let reloaded = if self.spec.back_to_back {
            self.back_to_back(&load)
        } else {
            self.reload_one_by_one(&load)
        };
        let report = load.finish();
        self.load_line = report.summary_line();
        reloaded?;
        if report.failed() > 0 {
            return Err(format!("failed requests under load: {}", self.load_line));
        }
        if report.ok < FEWEST_ANSWERS {
            return Err(format!(
                "the load made only {} requests: {}",
                report.ok, self.load_line
            ));
        }
        Ok(())
    }

    fn reload_one_by_one(&mut self, load: &Load) -> Result<(), String> {
        let unit = self.spec.unit;
        for i in 1..=self.count {
            let old = self.main.pid;
            let t0 = Instant::now();
            self.manager
                .ctl(&["reload", unit])
                .map_err(|e| format!("reload {i}: {e}"))?;
            self.wait_new_main(old)
                .map_err(|e| format!("reload {i}: {e}"))?;
            let elapsed = t0.elapsed().as_millis();
            self.check_pid_file()
                .map_err(|e| format!("reload {i}: {e}"))?;
            let body = get_from(self.port, self.main.pid);
            if !body.starts_with(&format!("pid={} ", self.main.pid)) {
                return Err(format!(
                    "reload {i}: MainPID={} but GET / answered '{body}'",
                    self.main.pid
                ));
            }
            self.generation = generation_of(&body).unwrap_or(0);
            self.reloads.push(format!(
                "{old}->{}(gen {}, {elapsed}ms)",
                self.main.pid, self.generation
            ));
            // The next reload once the old generation has left: a
            // generation refuses to upgrade while its parent still drains.
            self.wait_one_process()
                .map_err(|e| format!("reload {i}: {e}"))?;
            // Each generation serves the load for a while.
            serve_a_while(load);
        }
        Ok(())
    }

    /// Reloads in pairs, the second of each pair as soon as the first
    /// one's new generation serves, while the old one still drains (the
    /// load's idle connections keep it draining for the quiet period). The
    /// second reload's signal reaches the old generation (systemd's main
    /// process until it exits), which passes it on; the pair must end two
    /// generations later with MainPID, the PID file and GET / agreeing. On
    /// a loaded machine the old generation may be gone by the second
    /// reload (its drain ends with its last idle connection): that pair is
    /// checked all the same but does not count, and another is tried, up
    /// to twice as many pairs in all.
    fn back_to_back(&mut self, load: &Load) -> Result<(), String> {
        let unit = self.spec.unit;
        let pairs = (self.count / 2).max(1);
        let mut done = 0;
        let mut tried = 0;
        while done < pairs {
            tried += 1;
            if tried > pairs * 2 {
                return Err(format!(
                    "only {done} of {} pairs were back to back (the old generation had left before the second reload); {pairs} wanted",
                    tried - 1
                ));
            }
            let old = self.main.pid;
            let body = get_from(self.port, old);
            let generation = generation_of(&body)
                .ok_or_else(|| format!("pair {tried}: GET / answered '{body}', no generation"))?;
            let t0 = Instant::now();
            self.manager
                .ctl(&["reload", unit])
                .map_err(|e| format!("pair {tried}: first reload: {e}"))?;
            let body = get_generation(self.port, generation + 1);
            if generation_of(&body) != Some(generation + 1) {
                return Err(format!(
                    "pair {tried}: generation {} did not serve after the first reload ('{body}')",
                    generation + 1
                ));
            }
            let back_to_back = kill(Pid::from_raw(old), None).is_ok();
            self.manager.ctl(&["reload", unit]).map_err(|e| {
                format!(
                    "pair {tried}: second reload ({}): {e}",
                    if back_to_back {
                        format!("while {old} drains")
                    } else {
                        format!("{old} gone already")
                    }
                )
            })?;
            let body = get_generation(self.port, generation + 2);
            if generation_of(&body) != Some(generation + 2) {
                return Err(format!(
                    "pair {tried}: the second reload was lost: generation {} never served ('{body}')",
                    generation + 2
                ));
            }
            self.wait_one_process()
                .map_err(|e| format!("pair {tried}: {e}"))?;
            self.wait_new_main(old)
                .map_err(|e| format!("pair {tried}: {e}"))?;
            let elapsed = t0.elapsed().as_millis();
            let body = get_from(self.port, self.main.pid);
            let want = format!("pid={} generation={}", self.main.pid, generation + 2);
            if body.trim() != want {
                return Err(format!(
                    "pair {tried}: MainPID={} but GET / answered '{body}' (want generation {})",
                    self.main.pid,
                    generation + 2
                ));
            }
            self.check_pid_file()
                .map_err(|e| format!("pair {tried}: {e}"))?;
            self.generation = generation + 2;
            if back_to_back {
                done += 1;
                self.reloads.push(format!(
                    "{old}=>{}(gen {}, {elapsed}ms)",
                    self.main.pid, self.generation
                ));
            } else {
                self.reloads.push(format!(
                    "{old}=>{}(gen {}, {elapsed}ms, not back to back: not counted)",
                    self.main.pid, self.generation
                ));
            }
            serve_a_while(load);
        }
        Ok(())
    }

    /// How the unit's last main process was stopped, from the service's
    /// own log (the example logs "stopping" when SIGTERM asks it to stop,
    /// then "exiting") and the manager's debug log from byte `offset` on.
    fn stop_evidence(&self, offset: u64) -> (StopHow, Vec<String>) {
        let unit = self.spec.unit;
        let log = self.manager.log_since(offset);
        let about: Vec<&str> = log.lines().filter(|l| l.contains(unit)).collect();
        let killed = about.iter().any(|l| {
            [
                "SIGKILL",
                "status=9/KILL",
                "signal=KILL",
                "code=killed",
                "-> stop-sigkill",
                "-> final-sigkill",
            ]
            .iter()
            .any(|p| l.contains(p))
        });
        let lines = about
            .iter()
            .filter(|l| {
                [
                    "Supervising",
                    "Changed",
                    "Killing",
                    "exited",
                    "Main process",
                    "Failed with",
                    "Deactivated",
                ]
                .iter()
                .any(|p| l.contains(p))
            })
            .take(8)
            .map(|l| (*l).to_owned())
            .collect();
        let service = read(&self.service_log);
        let generation = format!("generation={}", self.generation);
        let said = |word: &str| {
            service
                .lines()
                .any(|l| l.contains(word) && l.split_whitespace().any(|w| w == generation))
        };
        let how = if killed {
            StopHow::Sigkill
        } else if said("stopping") && said("exiting") {
            StopHow::Sigterm
        } else {
            StopHow::Unknown
        };
        (how, lines)
    }
}

/// The strict HTTP/1.1 load of `handover-harness load`'s defaults: busy
/// new-connection and keep-alive clients, and keep-alive clients idle for
/// 0.6 s and 2.5 s between requests, so that a drain waits for their next
/// request or its quiet period. Returns once every client has had an
/// answer (the idle ones then hold connections that a drain must wait
/// for), or after 30 s.
fn start_load(port: u16) -> Load {
    let plan = LoadPlan {
        http: Some(SocketAddr::from((Ipv4Addr::LOCALHOST, port))),
        keep_alive: 2,
        new_connection: 2,
        idle: vec![
            (4, Duration::from_millis(600)),
            (2, Duration::from_millis(2500)),
        ],
        pace: Some(Duration::from_millis(2)),
        http_check: Some(HttpCheck {
            body_contains: Some("generation=".into()),
            identity: Identity::BodyPrefix("pid=".into()),
            ..HttpCheck::default()
        }),
        ..LoadPlan::default()
    };
    let clients = plan.http_clients();
    let load = Load::run(plan);
    let live = load.live();
    let _ = until(SETTLE, || (live.answered() >= clients).then_some(()));
    load
}

/// Waits until the load has had [`ANSWERS_PER_GENERATION`] more answers
/// (or a failure, or 10 s).
fn serve_a_while(load: &Load) {
    use std::sync::atomic::Ordering;
    let live = load.live();
    let from = live.ok.load(Ordering::SeqCst);
    let _ = until(Duration::from_secs(10), || {
        (live.ok.load(Ordering::SeqCst) >= from + ANSWERS_PER_GENERATION
            || live.failed.load(Ordering::SeqCst) > 0)
            .then_some(())
    });
}

/// `GET /` on a new connection to 127.0.0.1:`port`: the body of a 200.
fn get(port: u16, within: Duration) -> io::Result<String> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut stream = TcpStream::connect_timeout(&addr, within)?;
    stream.set_read_timeout(Some(within))?;
    stream.set_write_timeout(Some(within))?;
    stream.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    match response.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.1 200") => Ok(body.trim().to_owned()),
        _ => Err(io::Error::other(format!("not a 200: {response:?}"))),
    }
}

/// Polls `GET /` until it answers from `pid` (a generation that has handed
/// over stops accepting only once told): the last body, empty on failure.
/// Bounded: 5 s.
fn get_from(port: u16, pid: i32) -> String {
    let want = format!("pid={pid} ");
    let mut last = String::new();
    until(Duration::from_secs(5), || {
        last = get(port, Duration::from_secs(1)).unwrap_or_default();
        last.starts_with(&want).then_some(())
    });
    last
}

/// Polls `GET /` until it answers from `generation`: the last body.
/// Bounded: 30 s.
fn get_generation(port: u16, generation: u64) -> String {
    let mut last = String::new();
    until(SETTLE, || {
        last = get(port, Duration::from_secs(1)).unwrap_or_default();
        (generation_of(&last) == Some(generation)).then_some(())
    });
    last
}

/// `pid=12 generation=3` -> 3.
fn generation_of(body: &str) -> Option<u64> {
    body.split_whitespace()
        .find_map(|w| w.strip_prefix("generation="))?
        .parse()
        .ok()
}

/// How long each generation drained, from the example's own log lines
/// (`draining generation=N` to `exiting generation=N`): count and median.
fn drain_times(log: &str) -> String {
    let mut started: HashMap<String, std::time::SystemTime> = HashMap::new();
    let mut took: Vec<Duration> = Vec::new();
    for line in log.lines() {
        let mut words = line.split_whitespace();
        let (Some(at), Some("INFO"), Some("http_server:"), Some(what)) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            continue;
        };
        let Some(generation) = words.find_map(|w| w.strip_prefix("generation=")) else {
            continue;
        };
        let Ok(at) = humantime::parse_rfc3339_weak(at) else {
            continue;
        };
        match what {
            "draining" => {
                started.insert(generation.to_owned(), at);
            }
            "exiting" => {
                if let Some(from) = started.remove(generation) {
                    took.extend(at.duration_since(from).ok());
                }
            }
            _ => {}
        }
    }
    took.sort();
    match (took.first(), took.get(took.len() / 2)) {
        (Some(min), Some(median)) => format!(
            "{}, median {} ms, min {} ms",
            took.len(),
            median.as_millis(),
            min.as_millis()
        ),
        _ => "none".into(),
    }
}

/// Ports for one suite's services: below the kernel's ephemeral ports, so
/// that no client connection (this run's load, or a parallel run's) takes
/// one between its choice and the service's bind, and apart from the other
/// suite's (ten thousand below the ephemeral range, half for each).
struct Ports {
    range: Option<(u16, u16)>,
    next: u64,
}

impl Ports {
    fn for_suite(suite: Suite) -> Ports {
        let ephemeral = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
            .filter(|&lo| lo > 11_000);
        let range = ephemeral.map(|lo| match suite {
            Suite::System => (lo - 10_000, lo - 5_000),
            Suite::Backports => (lo - 5_000, lo),
        });
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id());
        Ports { range, next: seed }
    }

    /// A port free now (any free port without a range).
    fn free(&mut self) -> u16 {
        for _ in 0..1000 {
            let port = match self.range {
                Some((lo, hi)) => {
                    // xorshift: a different port each time, no dependency.
                    self.next ^= self.next << 13;
                    self.next ^= self.next >> 7;
                    self.next ^= self.next << 17;
                    lo + (self.next % u64::from(hi - lo)) as u16
                }
                None => 0,
            };
            if let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, port))
                && let Ok(addr) = listener.local_addr()
            {
                return addr.port();
            }
        }
        0
    }
}

/// The first of `paths` that is an executable file.
fn first_executable<P: Into<PathBuf>>(paths: impl IntoIterator<Item = P>) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    paths
        .into_iter()
        .map(Into::into)
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

fn version_of(ctl: &Path, lib: Option<&Path>) -> String {
    let mut command = Command::new(ctl);
    command.arg("--version").stdin(Stdio::null());
    if let Some(lib) = lib {
        command.env("LD_LIBRARY_PATH", lib);
    }
    command
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .nth(1)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".into())
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

fn read(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn read_pid(path: &Path) -> Option<i32> {
    read(path).trim().parse().ok()
}

/// `http-server.service` -> `http-server`.
fn stem(unit: &str) -> &str {
    unit.rsplit_once('.').map_or(unit, |(stem, _)| stem)
}

fn tail_lines(text: &str, count: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(count)..].join("\n")
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const UNIT: &str = "[Unit]\nDescription=x\n\n[Service]\nType=notify\nNotifyAccess=all\nExecStart=/bin/x --listen 127.0.0.1:1\nPIDFile=%t/%N.pid\nExecReload=/bin/kill -HUP $MAINPID\n";

    #[test]
    fn edits_change_only_their_lines() {
        let cli = Path::new("/opt/handover");
        let killmode = Edit::KillModeProcess.apply(UNIT, cli);
        assert!(killmode.contains("[Service]\nKillMode=process\nType=notify"));
        let without = Edit::Without("PIDFile=").apply(UNIT, cli);
        assert!(!without.contains("PIDFile="));
        assert!(without.contains("NotifyAccess=all"));
        let upgrade = Edit::HandoverUpgrade.apply(UNIT, cli);
        assert!(
            upgrade.contains("ExecStart=/bin/x --listen 127.0.0.1:1 --control-socket %t/%N.sock\n")
        );
        assert!(upgrade.contains("ExecReload=/opt/handover upgrade --socket %t/%N.sock\n"));
        assert_eq!(Edit::None.apply(UNIT, cli), UNIT);
        let socket = "[Socket]\nListenStream=127.0.0.1:1\nFileDescriptorName=http\nService=http-server-socket.service\n";
        assert_eq!(
            Edit::UnnamedSocket.apply(socket, cli),
            "[Socket]\nListenStream=127.0.0.1:1\nService=unnamed-socket.service\n"
        );
    }

    #[test]
    fn drain_times_pair_each_generation() {
        let log = "2026-12-01T05:00:00.100000Z  INFO http_server: draining generation=1 successor=9\n\
                   2026-12-01T05:00:00.200000Z  INFO http_server: draining generation=2 successor=10\n\
                   2026-12-01T05:00:01.150000Z  INFO http_server: exiting generation=1 reason=Upgraded\n\
                   2026-12-01T05:00:01.400000Z  INFO http_server: exiting generation=2 reason=Upgraded\n\
                   2026-12-01T05:00:02.000000Z  INFO http_server: exiting generation=3 reason=Stopped\n";
        assert_eq!(drain_times(log), "2, median 1200 ms, min 1050 ms");
        assert_eq!(drain_times(""), "none");
    }

    #[test]
    fn every_case_has_a_unit_of_its_own_made_from_an_example() {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/systemd");
        let mut units = std::collections::HashSet::new();
        for spec in CASES {
            assert!(
                units.insert(spec.unit),
                "{}: unit {} twice",
                spec.name,
                spec.unit
            );
            assert!(spec.unit.ends_with(".service"), "{}", spec.name);
            assert!(
                examples.join(spec.source).is_file(),
                "{}: no {}",
                spec.name,
                spec.source
            );
            if let Some((socket, _)) = spec.socket {
                assert!(units.insert(socket), "{}: socket {socket} twice", spec.name);
            }
        }
    }

    #[test]
    fn generation_is_read_from_the_body() {
        assert_eq!(generation_of("pid=12 generation=3"), Some(3));
        assert_eq!(generation_of("pid=12"), None);
    }
}
