//! Runs one scenario: the subject under load, the steps in order, then the
//! checks on what is left (one process, no zombie, the same descriptors, the
//! PID file and the Unix path), into a [`ScenarioReport`].

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::load::{Clients, Load, LoadPlan, LoadReport, Mode, Target, TlsTarget};
use crate::process::{Event, Subject, SubjectConfig, read_pid_file};
use crate::report::{ScenarioReport, UpgradeRecord};
use crate::scenario::{Action, Scenario, faults_text};
use crate::tls::Trust;

/// How many of the subject's last stderr lines a failed scenario reports.
const STDERR_LINES: usize = 12;

/// How to run scenarios.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The subject binary.
    pub subject: PathBuf,
    /// Words before the subject's flags (`subject` for the harness binary).
    pub subject_args: Vec<String>,
    /// Print a live progress line on stderr.
    pub progress: bool,
    /// Judge the scenarios' timing expectations (`p99_ratio_max`,
    /// `tls_rate_within_pct`) too. The CLI does; the test suite does not:
    /// a test asserts counts and states, and on a machine loaded by other
    /// work a rate or a p99 moves (a fresh-clone run saw TLS handshakes/s
    /// at -28.6% with the gate at 25%). `cargo bench` and `handover-harness
    /// run` are where those figures are judged.
    pub timing_gates: bool,
}

/// What the steps share while they run.
struct Run<'a> {
    /// See [`RunOptions::timing_gates`].
    timing_gates: bool,
    scenario: &'a Scenario,
    subject: Subject,
    dir: tempfile::TempDir,
    /// The subject as built; `executable` is the copy upgrades start.
    original: PathBuf,
    executable: PathBuf,
    faults_file: PathBuf,
    /// The faults as last written to `faults_file`.
    faults: std::collections::BTreeMap<String, String>,
    /// The FIFO a `gate-before-ready` generation waits on.
    gate: crate::fault::Gate,
    started: Instant,
    upgrades: Vec<UpgradeRecord>,
    problems: Vec<String>,
    pending_upgrade: Option<(u32, JoinHandle<String>)>,
    slow_requests: Vec<JoinHandle<std::io::Result<(u16, String)>>>,
    generation: Arc<AtomicU64>,
}

/// Runs `scenario` and reports what happened; never panics on a failed
/// expectation (it becomes a problem in the report).
pub fn run(scenario: &Scenario, options: &RunOptions) -> ScenarioReport {
    match start(scenario, options) {
        Ok(run) => run.execute(options),
        Err(problem) => ScenarioReport::failed_to_start(scenario, problem),
    }
}

fn start<'a>(scenario: &'a Scenario, options: &RunOptions) -> Result<Run<'a>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
    // Upgrades start a copy that a step may replace, never the build output.
    let executable = dir.path().join("subject");
    crate::process::copy_executable(&options.subject, &executable)
        .map_err(|e| format!("copy subject: {e}"))?;
    let faults_file = dir.path().join("faults");
    std::fs::write(&faults_file, faults_text(&scenario.subject.faults))
        .map_err(|e| e.to_string())?;
    let gate = crate::fault::Gate::new(dir.path()).map_err(|e| format!("the gate FIFO: {e}"))?;
    let settings = &scenario.subject;
    let mut args = options.subject_args.clone();
    args.extend([
        "--upgrade-timeout-ms".into(),
        settings.upgrade_timeout_ms.to_string(),
        "--quiet-period-ms".into(),
        settings.quiet_period_ms.to_string(),
        "--rollback-window-ms".into(),
        settings.rollback_window_ms.to_string(),
        "--executable".into(),
        executable.display().to_string(),
        "--http-server".into(),
        settings.http.clone(),
    ]);
    if settings.tls {
        let (cert, key) = crate::tls::write_test_certificate(dir.path())?;
        args.extend([
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
    }
    if settings.grpc {
        args.extend(["--grpc".into(), "true".into()]);
    }
    if settings.websocket {
        args.extend(["--websocket".into(), "true".into()]);
    }
    let config = SubjectConfig {
        binary: executable.clone(),
        args,
        faults_file: Some(faults_file.clone()),
        unix: settings.unix.then(|| dir.path().join("subject.sock")),
        pid_file: Some(dir.path().join("subject.pid")),
        // The report says what failed; the subject's own log would only
        // repeat it (and a scenario's faults make it log errors on purpose,
        // such as a rollback). SUBJECT_LOG=warn shows it.
        env: vec![
            (
                "SUBJECT_LOG".into(),
                std::env::var("SUBJECT_LOG").unwrap_or_else(|_| "off".into()),
            ),
            gate.env(),
        ],
        // A generation's stderr (a panic's message, a log line) belongs in
        // the report of a scenario that fails, not across the table.
        stderr: Some(dir.path().join("subject.stderr")),
        ..SubjectConfig::default()
    };
    let subject = Subject::start(&config).map_err(|e| format!("start subject: {e}"))?;
    Ok(Run {
        scenario,
        subject,
        dir,
        original: options.subject.clone(),
        executable,
        faults_file,
        faults: scenario.subject.faults.clone(),
        gate,
        started: Instant::now(),
        upgrades: Vec::new(),
        problems: Vec::new(),
        pending_upgrade: None,
        slow_requests: Vec::new(),
        generation: Arc::new(AtomicU64::new(0)),
        timing_gates: options.timing_gates,
    })
}

impl Run<'_> {
    fn execute(mut self, options: &RunOptions) -> ScenarioReport {
        let first_descriptors = self.descriptors();
        let settings = &self.scenario.load;
        let addresses = self.subject.addresses;
        let plan = LoadPlan {
            http: Some(addresses.http),
            keep_alive: settings.http_keep_alive,
            new_connection: settings.http_new_connection,
            idle: (settings.http_idle > 0)
                .then(|| (settings.http_idle, Duration::from_millis(settings.idle_ms)))
                .into_iter()
                .collect(),
            pace: None,
            tcp: (settings.tcp > 0).then_some((addresses.tcp, settings.tcp)),
            unix: (settings.unix > 0 && self.scenario.subject.unix)
                .then(|| (self.dir.path().join("subject.sock"), settings.unix)),
            connection_life: Duration::from_millis(settings.connection_ms),
            udp: (settings.udp > 0).then_some((addresses.udp, settings.udp)),
            http_check: None,
            clients: match self.protocol_clients() {
                Ok(clients) => clients,
                Err(problem) => {
                    let problem = format!("clients: {problem}");
                    return ScenarioReport::failed_to_start(self.scenario, problem);
                }
            },
        };
        self.started = Instant::now();
        let load = Load::run(plan);
        let progress = options.progress.then(|| self.progress_line(&load));

        let steps = self.scenario.steps.clone();
        for (index, step) in steps.iter().enumerate() {
            let due = self.started + Duration::from_millis(step.at_ms);
            // The scenario's shape: the load runs on meanwhile.
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if let Err(problem) = self.step(&step.action) {
                self.problems.push(format!(
                    "step {} ({}): {problem}",
                    index + 1,
                    action_name(&step.action)
                ));
                break;
            }
        }
        let end = self.started + Duration::from_millis(self.scenario.load.duration_ms);
        std::thread::sleep(end.saturating_duration_since(Instant::now()));
        let load_report = load.finish();
        if let Some((stop, thread)) = progress {
            stop.store(1, Ordering::Relaxed);
            let _ = thread.join();
        }
        let slow_failures = self.collect_slow_requests();
        if self.pending_upgrade.is_some() {
            self.problems
                .push("a start-upgrade step was never awaited".into());
        }
        self.finish(load_report, slow_failures, first_descriptors)
    }

    /// The HTTP/2, TLS, gRPC and WebSocket clients the scenario asks for.
    fn protocol_clients(&self) -> Result<Vec<Clients>, String> {
        let load = &self.scenario.load;
        let addresses = self.subject.addresses;
        let mut clients = Vec::new();
        let http = Target::plain(addresses.http);
        let streams = load.h2_streams;
        let mut add = |count: usize, make: &dyn Fn(usize) -> Clients| {
            if count > 0 {
                clients.push(make(count));
            }
        };
        add(load.h2c, &|count| Clients::Http2 {
            target: http.clone(),
            mode: Mode::KeepAlive,
            streams,
            count,
        });
        add(load.h2c_new_connection, &|count| Clients::Http2 {
            target: http.clone(),
            mode: Mode::NewConnection,
            streams,
            count,
        });
        if let Some(addr) = addresses.tls {
            let trust = Trust::CaFile(self.dir.path().join("cert.pem"));
            let target = Target {
                addr,
                tls: Some(TlsTarget {
                    config: Arc::new(crate::tls::client_config(&trust, &[b"http/1.1"])?),
                    name: crate::tls::server_name("localhost")?,
                }),
            };
            for (count, http2, mode) in [
                (load.tls_http1, false, Mode::KeepAlive),
                (load.tls_http1_new_connection, false, Mode::NewConnection),
                (load.tls_h2, true, Mode::KeepAlive),
                (load.tls_h2_new_connection, true, Mode::NewConnection),
            ] {
                add(count, &|count| {
                    let target = target.clone();
                    if http2 {
                        Clients::Http2 {
                            target,
                            mode,
                            streams,
                            count,
                        }
                    } else {
                        Clients::Http1 {
                            target,
                            mode,
                            count,
                        }
                    }
                });
            }
        }
        if let Some(addr) = addresses.grpc {
            add(load.grpc_unary, &|count| Clients::GrpcUnary { addr, count });
            add(load.grpc_streaming, &|count| Clients::GrpcStream {
                addr,
                count,
                replies: load.grpc_stream_replies,
                interval: Duration::from_millis(load.grpc_stream_interval_ms),
            });
        }
        if let Some(addr) = addresses.websocket {
            add(load.websocket, &|count| Clients::WebSocket { addr, count });
        }
        Ok(clients)
    }

    fn step(&mut self, action: &Action) -> Result<(), String> {
        match action {
            Action::Upgrade {
                expect,
                count,
                every_ms,
                settle,
            } => {
                for i in 0..*count {
                    if i > 0 {
                        std::thread::sleep(Duration::from_millis(*every_ms));
                    }
                    let at = self.elapsed_ms();
                    let answer = self.subject.control("upgrade").map_err(|e| e.to_string())?;
                    self.check_upgrade(at, &answer, expect)?;
                    if *settle && answer.starts_with("ok ") {
                        self.settle(&answer)?;
                    }
                }
            }
            Action::StartUpgrade => {
                let control = self.subject.addresses.control;
                let at = self.elapsed_ms();
                let ask = std::thread::spawn(move || {
                    ask(control, "upgrade").unwrap_or_else(|e| format!("err reason=io {e}"))
                });
                self.pending_upgrade = Some((at, ask));
            }
            Action::AwaitUpgrade { expect } => {
                let (at, ask) = self
                    .pending_upgrade
                    .take()
                    .ok_or("no upgrade was started")?;
                let answer = ask.join().map_err(|_| "the asking thread panicked")?;
                self.check_upgrade(at, &answer, expect)?;
                if answer.starts_with("ok ") {
                    self.settle(&answer)?;
                }
            }
            Action::ConcurrentUpgrades { count } => self.concurrent_upgrades(*count)?,
            Action::Storm {
                every_ms,
                duration_ms,
            } => self.storm(*every_ms, *duration_ms)?,
            Action::Signal { signal, target } => {
                let signal: Signal = signal
                    .parse()
                    .map_err(|_| format!("unknown signal {signal}"))?;
                let pid = match target.as_str() {
                    "serving" => self.serving()?.pid,
                    "starting" => self.starting().ok_or("no generation is starting")?.pid,
                    // A generation whose successor is ready and which has
                    // not exited: in its drain or rollback window.
                    "leaving" => self.leaving().ok_or("no generation is leaving")?.pid,
                    other => return Err(format!("unknown target {other}")),
                };
                self.subject
                    .signal(pid, signal)
                    .map_err(|e| e.to_string())?;
            }
            Action::Wait { event, generation } => {
                self.subject
                    .wait_for(|e| e.is(event, *generation))
                    .map_err(|e| e.to_string())?;
            }
            Action::SetFaults { faults } => {
                std::fs::write(&self.faults_file, faults_text(faults))
                    .map_err(|e| e.to_string())?;
                self.faults = faults.clone();
            }
            Action::ReplaceBinary { with } => self.replace_binary(with)?,
            Action::SlowRequests { count, ms } => {
                let http = self.subject.addresses.http;
                let generation = self.serving()?.generation;
                for _ in 0..*count {
                    let path = format!("/slow?ms={ms}");
                    self.slow_requests.push(std::thread::spawn(move || {
                        crate::process::http_get(http, &path)
                    }));
                }
                // In flight before the next step: each announces itself.
                let before = self
                    .subject
                    .history
                    .iter()
                    .filter(|e| e.is("slow-request", generation))
                    .count();
                self.subject
                    .wait_count(|e| e.is("slow-request", generation), before + count)
                    .map_err(|e| e.to_string())?;
            }
            Action::Pause { ms } => std::thread::sleep(Duration::from_millis(*ms)),
        }
        Ok(())
    }

    fn elapsed_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    /// Records an upgrade's answer; returns its outcome.
    fn record_upgrade(&mut self, at_ms: u32, answer: &str) -> String {
        let outcome = outcome(answer);
        let latency_us = answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix("us="))
            .and_then(|us| us.parse().ok());
        self.upgrades.push(UpgradeRecord {
            at_ms,
            outcome: outcome.clone(),
            latency_us,
            answer: answer.to_owned(),
        });
        outcome
    }

    /// Records an upgrade's answer and checks it against the expectation.
    fn check_upgrade(&mut self, at_ms: u32, answer: &str, expect: &str) -> Result<(), String> {
        let outcome = self.record_upgrade(at_ms, answer);
        if outcome != expect {
            return Err(format!("expected {expect}, got {answer:?}"));
        }
        Ok(())
    }

    /// After a successful upgrade: the new generation is ready and its
    /// parent gone, so that it may upgrade in turn.
    fn settle(&mut self, answer: &str) -> Result<(), String> {
        let generation: u64 = answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix("gen="))
            .and_then(|g| g.parse().ok())
            .ok_or_else(|| format!("no generation in {answer:?}"))?;
        self.generation.store(generation, Ordering::Relaxed);
        self.subject
            .wait_for(|e| e.is("parent-gone", generation))
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    fn concurrent_upgrades(&mut self, count: usize) -> Result<(), String> {
        let control = self.subject.addresses.control;
        // Connected first, so that the serving generation alone accepts them.
        let streams: Vec<TcpStream> = (0..count)
            .map(|_| TcpStream::connect(control))
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        let at = self.elapsed_ms();
        // A successor held at the gate keeps the upgrade under way until
        // every other request has been answered; it is let go then.
        let next = self.generation.load(Ordering::Relaxed) + 1;
        let gated = self
            .faults
            .get(&next.to_string())
            .is_some_and(|fault| fault == "gate-before-ready");
        let (sender, arriving) = std::sync::mpsc::channel();
        let answers: Result<Vec<String>, String> = std::thread::scope(|scope| {
            for stream in streams {
                let sender = sender.clone();
                scope.spawn(move || {
                    let answer = answer_on(stream, "upgrade")
                        .unwrap_or_else(|e| format!("err reason=io {e}"));
                    let _ = sender.send(answer);
                });
            }
            drop(sender);
            let mut answers = Vec::with_capacity(count);
            if gated {
                answers.extend(
                    (1..count)
                        .map_while(|_| arriving.recv_timeout(crate::process::EVENT_TIMEOUT).ok()),
                );
                self.subject
                    .wait_for(|e| e.is("init-gated", next))
                    .map_err(|e| e.to_string())?;
                self.gate
                    .open()
                    .map_err(|e| format!("opening the gate: {e}"))?;
            }
            answers.extend(arriving.iter());
            Ok(answers)
        });
        let answers = answers?;
        let ok: Vec<&String> = answers.iter().filter(|a| a.starts_with("ok ")).collect();
        let refused = answers
            .iter()
            .filter(|a| outcome(a) == "in_progress")
            .count();
        for answer in &answers {
            self.record_upgrade(at, answer);
        }
        if ok.len() != 1 || refused != count - 1 {
            return Err(format!(
                "expected 1 ok and {} in_progress, got {answers:?}",
                count - 1
            ));
        }
        let answer = ok[0].clone();
        self.settle(&answer)
    }

    /// SIGHUP at the serving generation and at any starting one, then one
    /// explicit upgrade to reach a known end: a ready generation whose
    /// parent is gone.
    fn storm(&mut self, every_ms: u64, duration_ms: u64) -> Result<(), String> {
        let until = Instant::now() + Duration::from_millis(duration_ms);
        let mut sent = 0u64;
        while Instant::now() < until {
            self.subject.collect_events();
            // Between a parent's `exiting` and its successor's `ready` line,
            // the events name no serving generation: signal the starting one.
            let mut targets: Vec<i32> = self.serving().map(|e| e.pid).into_iter().collect();
            if let Some(starting) = self.starting() {
                targets.push(starting.pid);
            }
            for pid in targets {
                // A generation may just have exited: that is not a failure.
                if self.subject.signal(pid, Signal::SIGHUP).is_ok() {
                    sent += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(every_ms));
        }
        if sent == 0 {
            return Err("no signal could be sent".into());
        }
        // Held signals may start more upgrades: ask until one is ours.
        for _ in 0..50 {
            self.subject.collect_events();
            let at = self.elapsed_ms();
            let answer = self.subject.control("upgrade").map_err(|e| e.to_string())?;
            match outcome(&answer).as_str() {
                "ok" => {
                    self.check_upgrade(at, &answer, "ok")?;
                    return self.settle(&answer);
                }
                // Another generation is starting, draining or holding its
                // rollback window: wait for its next step.
                "in_progress" | "parent_alive" | "exiting" | "window_open" => {
                    self.subject
                        .wait_new(|e| matches!(e.kind.as_str(), "ready" | "parent-gone" | "exited"))
                        .map_err(|e| e.to_string())?;
                }
                _ => return Err(format!("upgrade after the storm: {answer:?}")),
            }
        }
        Err("no upgrade went through after the storm".into())
    }

    fn replace_binary(&mut self, with: &str) -> Result<(), String> {
        let _ = std::fs::remove_file(&self.executable);
        match with {
            "broken" => {
                crate::process::write_executable(&self.executable, b"#!/nonexistent/interpreter\n")
                    .map_err(|e| e.to_string())?
            }
            "good" => {
                crate::process::copy_executable(&self.original, &self.executable)
                    .map_err(|e| e.to_string())?;
            }
            other => return Err(format!("unknown binary {other:?}")),
        }
        std::fs::set_permissions(&self.executable, std::fs::Permissions::from_mode(0o755))
            .map_err(|e| e.to_string())
    }

    /// The generation that serves: the one that most recently became ready
    /// or took back over (a rollback), and has not since begun to leave,
    /// crashed or exited.
    fn serving(&self) -> Result<Event, String> {
        let mut serving: Option<&Event> = None;
        for event in &self.subject.history {
            match event.kind.as_str() {
                "ready" | "rolled-back" => serving = Some(event),
                "exiting" | "crashing" | "exited"
                    if serving.is_some_and(|s| s.pid == event.pid) =>
                {
                    // The one before it, if it is still there, serves again
                    // only by a `rolled-back` event of its own.
                    serving = None;
                }
                _ => {}
            }
        }
        serving
            .cloned()
            .ok_or_else(|| "no generation is serving".into())
    }

    /// The newest generation that has begun to leave and has not exited
    /// nor taken back over.
    fn leaving(&self) -> Option<Event> {
        let history = &self.subject.history;
        history
            .iter()
            .enumerate()
            .rev()
            .find(|(at, e)| {
                e.kind == "exiting"
                    && !history[*at..].iter().any(|x| {
                        x.pid == e.pid && matches!(x.kind.as_str(), "exited" | "rolled-back")
                    })
            })
            .map(|(_, e)| e.clone())
    }

    /// The newest generation that has started and is not ready yet.
    fn starting(&self) -> Option<Event> {
        let history = &self.subject.history;
        history
            .iter()
            .rev()
            .find(|e| {
                e.kind == "started" && !history.iter().any(|x| x.kind == "ready" && x.pid == e.pid)
            })
            .cloned()
    }

    fn descriptors(&self) -> Option<usize> {
        let info = self.subject.control("info").ok()?;
        info.split_whitespace()
            .find_map(|w| w.strip_prefix("fds="))?
            .parse()
            .ok()
    }

    fn collect_slow_requests(&mut self) -> u64 {
        let mut failures = 0;
        for request in self.slow_requests.drain(..) {
            match request.join() {
                Ok(Ok((200, _))) => {}
                Ok(Ok((status, body))) => {
                    failures += 1;
                    self.problems
                        .push(format!("a slow request got {status} {body:?}"));
                }
                Ok(Err(e)) => {
                    failures += 1;
                    self.problems.push(format!("a slow request failed: {e}"));
                }
                Err(_) => failures += 1,
            }
        }
        failures
    }

    fn finish(
        mut self,
        mut load: LoadReport,
        slow_failures: u64,
        first_descriptors: Option<usize>,
    ) -> ScenarioReport {
        let expect = self.scenario.expect.clone();
        self.subject.collect_events();
        // A generation that crashed could fail the connections it held,
        // and only those: they are counted apart, and must be no more than
        // it held.
        // Client port -> connections on it (one port may be in two at once).
        let mut held = std::collections::BTreeMap::<u16, u64>::new();
        let mut held_unix = 0u64;
        let mut crashes = 0;
        for crash in self.subject.history.iter().filter(|e| e.kind == "crashing") {
            crashes += 1;
            held_unix += crash
                .fields
                .get("held_unix")
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
            for port in crash
                .fields
                .get("held")
                .map_or("", String::as_str)
                .split(',')
                .filter_map(|port| port.parse::<u16>().ok())
            {
                *held.entry(port).or_default() += 1;
            }
        }
        let held_total = held.values().sum::<u64>() + held_unix;
        let mut with_crashed = 0u64;
        let mut unix_left = held_unix;
        for (class, port) in std::mem::take(&mut load.failed_ports) {
            let crashed = if port == crate::load::UNIX_PORT {
                // Unix connections have no port: as many as it held.
                let crashed = unix_left > 0;
                unix_left = unix_left.saturating_sub(1);
                crashed
            } else {
                // Each held connection explains one failure, at most.
                match held.get_mut(&port) {
                    Some(left) if *left > 0 => {
                        *left -= 1;
                        true
                    }
                    _ => false,
                }
            };
            if crashed {
                with_crashed += 1;
                if let Some(n) = load.failures.get_mut(&class) {
                    *n -= 1;
                }
            }
        }
        load.failures.retain(|_, n| *n > 0);
        if with_crashed > held_total {
            self.problems.push(format!(
                "{with_crashed} failures on connections the crashed generations held, which held {held_total}"
            ));
        }
        let dropped = load.failed() + slow_failures;
        if dropped > expect.dropped {
            self.problems.push(format!(
                "{dropped} dropped (allowed {}{}): {:?}",
                expect.dropped,
                if crashes > 0 {
                    format!("; {with_crashed} more on connections a crashed generation held")
                } else {
                    String::new()
                },
                load.examples
            ));
        }
        if dropped < expect.min_dropped {
            self.problems.push(format!(
                "{dropped} dropped, expected at least {}: the harness did not see the loss",
                expect.min_dropped
            ));
        }
        let rolled_back = self
            .subject
            .history
            .iter()
            .filter(|e| e.kind == "rolled-back")
            .count();
        if let Some(expected) = expect.rolled_back
            && rolled_back != expected
        {
            self.problems
                .push(format!("{rolled_back} rollbacks, expected {expected}"));
        }
        let serving = self.serving().ok();
        let live = self.subject.live_pids();
        let expected_live = usize::from(expect.serves_at_end);
        if live.len() != expected_live {
            self.problems
                .push(format!("{} subject processes left: {live:?}", live.len()));
        }
        match self.subject.zombie_children() {
            Ok(zombies) if zombies.is_empty() => {}
            Ok(zombies) => self.problems.push(format!("zombies: {zombies:?}")),
            Err(e) => self.problems.push(format!("cannot list processes: {e}")),
        }
        let last_descriptors = self.descriptors();
        // A leak is growth. Fewer is not: the first generation may hold
        // descriptors its launcher (a shell, the test runner) left open
        // without close-on-exec, which no successor inherits from it.
        let grew = matches!(
            (first_descriptors, last_descriptors),
            (Some(first), Some(last)) if last > first
        );
        if expect.same_descriptors
            && (grew || last_descriptors.is_none() != first_descriptors.is_none())
        {
            self.problems.push(format!(
                "descriptors: first generation {first_descriptors:?}, last {last_descriptors:?}"
            ));
        }
        let pid_file = read_pid_file(&self.dir.path().join("subject.pid"));
        if let Some(serving) = &serving {
            if pid_file != Some(serving.pid) {
                self.problems.push(format!(
                    "PID file names {pid_file:?}, serving is {}",
                    serving.pid
                ));
            }
            if let Some(generation) = expect.generation
                && serving.generation != generation
            {
                self.problems.push(format!(
                    "generation {} serves, expected {generation}",
                    serving.generation
                ));
            }
        } else if expect.serves_at_end {
            self.problems.push("no generation serves at the end".into());
        }
        let ok = self.upgrades.iter().filter(|u| u.outcome == "ok").count();
        if let Some(expected) = expect.upgrades_ok
            && ok != expected
        {
            self.problems
                .push(format!("{ok} upgrades succeeded, expected {expected}"));
        }
        if self.scenario.subject.unix && !self.dir.path().join("subject.sock").exists() {
            self.problems.push("the Unix socket path is gone".into());
        }
        let generations = self
            .subject
            .history
            .iter()
            .map(|e| e.generation)
            .max()
            .unwrap_or(0);
        // What the subject said, for a scenario that failed.
        let stderr_tail = if self.problems.is_empty() {
            Vec::new()
        } else {
            let text =
                std::fs::read_to_string(self.dir.path().join("subject.stderr")).unwrap_or_default();
            let lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines[lines.len().saturating_sub(STDERR_LINES)..].to_vec()
        };
        let mut report = ScenarioReport::new(
            self.scenario,
            load,
            slow_failures,
            std::mem::take(&mut self.upgrades),
            std::mem::take(&mut self.problems),
            serving.map(|e| e.generation),
            generations,
            (first_descriptors, last_descriptors),
            self.started.elapsed(),
        );
        report.with_crashed = with_crashed;
        report.stderr_tail = stderr_tail;
        if let Some(most) = expect.tls_full_after_first_max {
            let later = report.tls_later;
            let problem = if later.handshakes == 0 {
                Some(
                    "no TLS handshake with a later generation to tell whether sessions resume"
                        .into(),
                )
            } else if later.full() > most {
                Some(format!(
                    "{} of {} TLS handshakes with later generations were full, at most {most} expected: sessions did not resume across upgrades",
                    later.full(),
                    later.handshakes
                ))
            } else {
                None
            };
            if let Some(problem) = problem {
                report.problems.push(problem);
                report.passed = false;
            }
        }
        let mut late = Vec::new();
        let p99_ratio_max = expect.p99_ratio_max.filter(|_| self.timing_gates);
        let tls_rate_within_pct = expect.tls_rate_within_pct.filter(|_| self.timing_gates);
        if let Some(most) = p99_ratio_max {
            for protocol in ["h2c", "tls-http1", "tls-h2"] {
                let ratio = report.protocols.get(protocol).and_then(|p| p.p99_ratio());
                if let Some(ratio) = ratio.filter(|ratio| *ratio > most) {
                    late.push(format!(
                        "{protocol}: p99 near upgrades {ratio:.2}x steady (at most {most}x)"
                    ));
                }
            }
        }
        if let Some(within) = tls_rate_within_pct {
            late.extend(tls_rate_problem(report.handshake_rate_ratio(), within));
        }
        if !late.is_empty() {
            report.problems.extend(late);
            report.passed = false;
        }
        report
    }

    /// A thread that rewrites one status line until told to stop.
    fn progress_line(&self, load: &Load) -> (Arc<AtomicU64>, JoinHandle<()>) {
        let stop = Arc::new(AtomicU64::new(0));
        let live = load.live();
        let name = self.scenario.name.clone();
        let started = self.started;
        let generation = Arc::clone(&self.generation);
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut err = std::io::stderr();
                while stop.load(Ordering::Relaxed) == 0 {
                    let _ = write!(
                        err,
                        "\r  {name:<28} {:>5.1}s  ok {:>8}  failed {:>4}  generation {:>4}   ",
                        started.elapsed().as_secs_f64(),
                        live.ok.load(Ordering::Relaxed),
                        live.failed.load(Ordering::Relaxed),
                        generation.load(Ordering::Relaxed),
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                let _ = write!(err, "\r{:100}\r", "");
            })
        };
        (stop, thread)
    }
}

/// `ok` or the reason of an `err reason=...` answer.
fn outcome(answer: &str) -> String {
    if answer.starts_with("ok ") {
        return "ok".into();
    }
    answer
        .split_whitespace()
        .find_map(|w| w.strip_prefix("reason="))
        .unwrap_or("no_answer")
        .to_owned()
}

fn ask(control: std::net::SocketAddr, command: &str) -> std::io::Result<String> {
    answer_on(TcpStream::connect(control)?, command)
}

fn answer_on(mut stream: TcpStream, command: &str) -> std::io::Result<String> {
    stream.set_read_timeout(Some(crate::process::EVENT_TIMEOUT))?;
    stream.write_all(format!("{command}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer)?;
    Ok(answer.trim().to_owned())
}

fn action_name(action: &Action) -> &'static str {
    match action {
        Action::Upgrade { .. } => "upgrade",
        Action::StartUpgrade => "start-upgrade",
        Action::AwaitUpgrade { .. } => "await-upgrade",
        Action::ConcurrentUpgrades { .. } => "concurrent-upgrades",
        Action::Storm { .. } => "storm",
        Action::Signal { .. } => "signal",
        Action::Wait { .. } => "wait",
        Action::SetFaults { .. } => "set-faults",
        Action::ReplaceBinary { .. } => "replace-binary",
        Action::SlowRequests { .. } => "slow-requests",
        Action::Pause { .. } => "pause",
    }
}

/// What is wrong with the last generation's TLS handshake rate, as a
/// `ratio` of the first's: more than `slower_pct` percent slower, or too few
/// handshakes to say. A faster new generation is no regression (the first
/// one's steady state is often the slower: it shares the machine with the
/// clients' start).
fn tls_rate_problem(ratio: Option<f64>, slower_pct: f64) -> Option<String> {
    match ratio {
        Some(ratio) if (1.0 - ratio) * 100.0 <= slower_pct => None,
        Some(ratio) => Some(format!(
            "TLS handshakes/s of the last generation {:+.1}% of the first's (at most {slower_pct}% slower)",
            (ratio - 1.0) * 100.0
        )),
        None => Some("too few TLS handshakes to compare generations".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::tls_rate_problem;

    #[test]
    fn a_new_generation_may_handshake_faster_but_not_much_slower() {
        assert_eq!(tls_rate_problem(Some(1.43), 25.0), None);
        assert_eq!(tls_rate_problem(Some(0.80), 25.0), None);
        assert!(tls_rate_problem(Some(0.70), 25.0).is_some_and(|p| p.contains("-30.0%")));
        assert!(tls_rate_problem(None, 25.0).is_some());
    }
}
