//! `handover`: ask a running service to upgrade, and say whether it worked.
//!
//! ```text
//! handover upgrade --socket /run/api/control.sock [--timeout 90s] [--no-wait]
//! handover status  --socket /run/api/control.sock [--timeout 90s]
//! ```
//!
//! `upgrade` returns once the new generation serves and the old one has
//! exited (so no old code runs any more), or, with `--no-wait`, as soon as
//! the new generation serves. A service with a rollback window is waited
//! for until the window has passed (committed) or the new generation has
//! died in it (rolled back: the old one serves again).
//!
//! Exit status: 0 when the upgrade succeeded (the new generation serves),
//! 1 when it did not happen (it failed, or was refused: `in_progress`, ...;
//! the generation that answered still serves, and the reason is printed),
//! 2 for a mistake on the command line, 3 when the service could not be
//! asked or did not answer in time, 4 when the new generation died within
//! the rollback window (the old one serves again, or, stopped meanwhile,
//! nobody does). An answer `exiting` comes from a
//! generation on its way out; once it has exited, the request is sent
//! again, and the generation serving then answers it. Fit for
//! `ExecReload=` and deploy scripts.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: handover upgrade --socket PATH [--timeout DURATION] [--no-wait]
       handover status --socket PATH [--timeout DURATION]

Asks the service listening on the control socket PATH to upgrade itself
(Upgrader::control_socket in the service), and says whether it worked.

options:
  --socket PATH        the service's control socket
  --timeout DURATION   how long to wait in all, e.g. 60s, 1m30s, 500ms (default
                       90s, longer than the library's 60 s for a successor's
                       init); with a rollback window, at least until the
                       window's verdict is due (the window and 10 s)
  --no-wait            return once the new generation serves, without waiting
                       for the old one to finish its requests and exit (nor
                       for the end of its rollback window)
  -h, --help           this text
  -V, --version        the version

exit status: 0 upgraded (or status answered), 1 the upgrade did not happen
(the reason is printed; the service serves on), 2 a usage mistake,
3 the service could not be asked or did not answer in time, 4 rolled back:
the new generation died within the rollback window, the old one serves again
(or, stopped meanwhile, nobody serves: said on stdout)";

/// Exit status when the new generation died within the rollback window.
const ROLLED_BACK: u8 = 4;

/// `--timeout`'s default: longer than the library's default grace period
/// for a successor's init (60 s), so that a successor that hangs is the
/// service's `timeout` (exit 1), not this command's (exit 3).
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(90);

/// How many times a request answered `exiting` is sent again.
const RETRIES_WHEN_EXITING: usize = 3;

#[derive(Debug)]
enum Request {
    Upgrade,
    Status,
}

impl Request {
    fn line(&self) -> &'static str {
        match self {
            Request::Upgrade => "upgrade",
            Request::Status => "status",
        }
    }
}

#[derive(Debug)]
struct Args {
    request: Request,
    socket: PathBuf,
    timeout: Duration,
    wait_for_exit: bool,
}

/// What ends the command early: help or version (printed, exit 0), or a
/// usage mistake (exit 2).
enum Early {
    Print(String),
    Usage(String),
}

fn parse_args(args: impl IntoIterator<Item = std::ffi::OsString>) -> Result<Args, Early> {
    use lexopt::prelude::*;
    let usage = |problem: String| Early::Usage(problem);
    let mut parser = lexopt::Parser::from_args(args);
    let mut request = None;
    let mut socket = None;
    let mut timeout = DEFAULT_TIMEOUT;
    let mut wait_for_exit = true;
    while let Some(arg) = parser.next().map_err(|e| usage(e.to_string()))? {
        match arg {
            Short('h') | Long("help") => return Err(Early::Print(USAGE.to_owned())),
            Short('V') | Long("version") => {
                return Err(Early::Print(format!(
                    "handover {}",
                    env!("CARGO_PKG_VERSION")
                )));
            }
            Long("socket") => {
                socket = Some(PathBuf::from(
                    parser.value().map_err(|e| usage(e.to_string()))?,
                ))
            }
            Long("timeout") => {
                let value = parser.value().map_err(|e| usage(e.to_string()))?;
                timeout = parse_timeout(&value.string().map_err(|e| usage(e.to_string()))?)
                    .map_err(usage)?;
            }
            Long("no-wait") => wait_for_exit = false,
            Value(word) if request.is_none() => {
                request = Some(match word.to_str() {
                    Some("upgrade") => Request::Upgrade,
                    Some("status") => Request::Status,
                    _ => {
                        return Err(usage(format!("unknown request {word:?} (upgrade, status)")));
                    }
                })
            }
            other => return Err(usage(other.unexpected().to_string())),
        }
    }
    let request = request.ok_or_else(|| usage("no request given (upgrade, status)".into()))?;
    let socket = socket.ok_or_else(|| usage("--socket PATH is required".into()))?;
    Ok(Args {
        request,
        socket,
        timeout,
        wait_for_exit,
    })
}

fn parse_timeout(text: &str) -> Result<Duration, String> {
    // A bare number is seconds, as `sleep` and systemd read it.
    let parsed = match text.parse::<u64>() {
        Ok(seconds) => Ok(Duration::from_secs(seconds)),
        Err(_) => humantime::parse_duration(text).map_err(|e| e.to_string()),
    };
    match parsed {
        Ok(duration) if duration.is_zero() => {
            Err(format!("--timeout {text}: must be longer than zero"))
        }
        // Past this, a deadline would overflow the clock: more than a century.
        Ok(duration) if duration > Duration::from_secs(100 * 365 * 24 * 3600) => {
            Err(format!("--timeout {text}: longer than a century"))
        }
        Ok(duration) => Ok(duration),
        Err(problem) => Err(format!(
            "--timeout {text:?}: {problem} (for example 60s, 1m30s, 500ms)"
        )),
    }
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(Early::Print(text)) => {
            println!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(Early::Usage(problem)) => {
            eprintln!("handover: {problem}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(code) => code,
        Err(problem) => {
            eprintln!("handover: {problem}");
            ExitCode::from(3)
        }
    }
}

/// One request on one connection.
struct Exchange {
    answer: String,
    /// The rest of the connection: the old generation keeps it open until
    /// its process exits.
    stream: BufReader<UnixStream>,
}

fn run(args: &Args) -> Result<ExitCode, String> {
    let deadline = Instant::now()
        .checked_add(args.timeout)
        .ok_or("--timeout is too long")?;
    let socket = args.socket.display().to_string();
    let mut exchange =
        ask(&socket, args.request.line(), deadline).map_err(Unasked::into_message)?;
    // A generation on its way out did nothing: once it has exited, its
    // successor (which serves the same socket) answers.
    for _ in 0..RETRIES_WHEN_EXITING {
        if !exchange.answer.contains("reason=exiting") {
            break;
        }
        // Still there at the deadline: nothing more is sent (a request
        // sent then would run, unreported). Its answer is the outcome.
        if !wait_for_close(&mut exchange.stream, deadline) {
            break;
        }
        match ask(&socket, args.request.line(), deadline) {
            Ok(next) => exchange = next,
            // Nobody took the request (no successor: a final stop; or no
            // time left to send it): the exiting answer is the outcome.
            Err(Unasked::NotSent(_)) => break,
            // Sent, and not answered: it may be running.
            Err(Unasked::NotAnswered(problem)) => return Err(problem),
        }
    }
    let answer = exchange.answer.as_str();
    let field = |key: &str| {
        answer
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
            .unwrap_or("?")
            .to_owned()
    };
    if !answer.starts_with("ok") {
        let message = answer.split_once("message=").map_or(answer, |(_, m)| m);
        println!(
            "{} failed ({}): {message}",
            args.request.line(),
            field("reason")
        );
        return Ok(ExitCode::FAILURE);
    }
    match args.request {
        Request::Status => println!(
            "serving: generation {} (pid {})",
            field("generation"),
            field("pid")
        ),
        Request::Upgrade => {
            let micros: f64 = field("duration_us").parse().unwrap_or(f64::NAN);
            let mut serving = format!(
                "upgraded: generation {} (pid {}) is serving, ready in {:.1} ms",
                field("generation"),
                field("pid"),
                micros / 1000.0
            );
            let old = field("old_pid");
            // A window longer than milliseconds fit in (Duration::MAX): as
            // long as the clock counts.
            let window = match field("window_ms") {
                none if none == "?" => None,
                ms => Some(ms.parse::<u64>().unwrap_or(u64::MAX)),
            };
            if !args.wait_for_exit {
                println!("{serving}");
                return Ok(ExitCode::SUCCESS);
            }
            let mut deadline = deadline;
            if let Some(window) = window {
                // The service said how long the verdict takes: wait for it
                // even past --timeout, which counts the rest.
                let window = Duration::from_millis(window);
                let verdict_due = Instant::now()
                    .checked_add(window + VERDICT_GRACE)
                    .unwrap_or(deadline);
                deadline = deadline.max(verdict_due);
                let verdict = read_line(&mut exchange.stream, deadline).ok_or_else(|| {
                    format!(
                        "{serving}, but no verdict came within its {} ms rollback window",
                        window.as_millis()
                    )
                })?;
                let message = verdict.split_once("message=").map_or("", |(_, m)| m);
                match verdict.split_whitespace().next() {
                    Some("committed") => {}
                    Some("rolled_back") => {
                        println!(
                            "rolled back: {message}; the old generation (pid {old}) serves again"
                        );
                        return Ok(ExitCode::from(ROLLED_BACK));
                    }
                    Some("stopped") => {
                        println!(
                            "rolled back, then stopped: generation {} (pid {}) died within the rollback window while the service stopped; nobody serves",
                            field("generation"),
                            field("pid")
                        );
                        return Ok(ExitCode::from(ROLLED_BACK));
                    }
                    _ => {
                        return Err(format!(
                            "{serving}, but no verdict on its rollback window came (the service said {verdict:?})"
                        ));
                    }
                }
                serving.push_str(&format!(
                    "; committed after its {} ms rollback window",
                    window.as_millis()
                ));
            }
            {
                let waited = Instant::now();
                let new = field("pid");
                let closed = wait_for_close(&mut exchange.stream, deadline)
                    && old
                        .parse()
                        .is_ok_and(|pid| wait_for_exit(pid, &new, deadline));
                if closed {
                    println!(
                        "{serving}; the old generation (pid {old}) exited {:.1} ms later",
                        waited.elapsed().as_secs_f64() * 1000.0
                    );
                } else {
                    println!("{serving}");
                    eprintln!(
                        "handover: the old generation (pid {old}) was still finishing its requests when --timeout ran out"
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long past the end of a rollback window its verdict may take.
const VERDICT_GRACE: Duration = Duration::from_secs(10);

/// One more line of the answer, trimmed; `None` at EOF or the deadline.
fn read_line(stream: &mut BufReader<UnixStream>, deadline: Instant) -> Option<String> {
    let left = remaining(deadline)?;
    stream.get_ref().set_read_timeout(Some(left)).ok()?;
    let mut line = String::new();
    match stream.read_line(&mut line) {
        Ok(n) if n > 0 => Some(line.trim().to_owned()),
        _ => None,
    }
}

/// Why [`ask`] has no answer.
enum Unasked {
    /// The request did not reach the service: nothing was done.
    NotSent(String),
    /// It was sent, and no answer came: it may be running.
    NotAnswered(String),
}

impl Unasked {
    fn into_message(self) -> String {
        match self {
            Unasked::NotSent(problem) | Unasked::NotAnswered(problem) => problem,
        }
    }
}

/// Sends one request and reads its one-line answer. Nothing is sent once
/// the deadline has passed.
fn ask(socket: &str, request: &str, deadline: Instant) -> Result<Exchange, Unasked> {
    let Some(timeout) = remaining(deadline) else {
        return Err(Unasked::NotSent(format!(
            "no time left to ask {socket} (--timeout)"
        )));
    };
    let mut stream = UnixStream::connect(socket)
        .map_err(|e| Unasked::NotSent(format!("cannot reach {socket}: {e}")))?;
    // A service that refuses at once answers and closes before reading: the
    // write then fails, but its answer is there to read.
    let sent = stream.write_all(format!("{request}\n").as_bytes());
    let mut stream = BufReader::new(stream);
    let mut answer = String::new();
    let unanswered = |problem: String| match &sent {
        Ok(()) => Unasked::NotAnswered(problem),
        Err(e) => Unasked::NotSent(format!("cannot ask {socket}: {e}")),
    };
    stream
        .get_ref()
        .set_read_timeout(Some(timeout))
        .map_err(|e| unanswered(e.to_string()))?;
    stream.read_line(&mut answer).map_err(|e| {
        unanswered(
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!(
                    "no answer from {socket} within {timeout:?} (the upgrade may still be running)"
                )
            } else {
                format!("no answer from {socket}: {e}")
            },
        )
    })?;
    let answer = answer.trim().to_owned();
    if answer.is_empty() {
        return Err(unanswered(format!(
            "{socket} closed the connection without an answer"
        )));
    }
    Ok(Exchange { answer, stream })
}

/// Time left before `deadline`, if any.
fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|left| !left.is_zero())
}

/// Reads the connection to its end (the answering process closes it only
/// by exiting). `false` if the deadline came first.
fn wait_for_close(stream: &mut BufReader<UnixStream>, deadline: Instant) -> bool {
    let mut buffer = [0u8; 256];
    loop {
        let Some(left) = remaining(deadline) else {
            return false;
        };
        if stream.get_ref().set_read_timeout(Some(left)).is_err() {
            return false;
        }
        match stream.read(&mut buffer) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // A reset is a close too; a timeout is not.
            Err(e) => {
                return !matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                );
            }
        }
    }
}

/// The connection closes as the old process exits, a moment before the
/// kernel hands its children (the new generation) to the service manager:
/// the last of its threads closes the connection, then re-parents them. On
/// Linux, waits until that is done too, so that a manager which reads the
/// PID file when this command ends (systemd, after `ExecReload=`) finds its
/// own child there: until `/proc/NEW/stat` names another parent than the
/// old generation. Elsewhere no service manager reads a PID file then.
#[cfg(target_os = "linux")]
fn wait_for_exit(old: u32, new: &str, deadline: Instant) -> bool {
    let mut pause = Duration::from_micros(50);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{new}/stat")).ok();
        // The parent is the second field after the command name, which is
        // in parentheses and may hold anything.
        let parent = stat
            .as_deref()
            .and_then(|stat| stat.rsplit_once(") "))
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|parent| parent.parse::<u32>().ok());
        if parent != Some(old) {
            return true;
        }
        if remaining(deadline).is_none() {
            return false;
        }
        // Microseconds, usually: the old process is past closing its files.
        std::thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(5));
    }
}

#[cfg(not(target_os = "linux"))]
fn wait_for_exit(_old: u32, _new: &str, _deadline: Instant) -> bool {
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(words: &[&str]) -> Result<Args, String> {
        parse_args(words.iter().map(Into::into)).map_err(|early| match early {
            Early::Print(text) => format!("print: {text}"),
            Early::Usage(problem) => format!("usage: {problem}"),
        })
    }

    /// A service played by this test on a Unix socket in a temp dir: for
    /// each connection in turn, `script` gets the request line it read and
    /// the stream, and returns whether to keep the stream open (until the
    /// fake service ends). It ends at the request `end`; returns the
    /// requests it read, `end` left out.
    fn fake_service(
        dir: &std::path::Path,
        mut script: impl FnMut(usize, &str, &mut UnixStream) -> bool + Send + 'static,
    ) -> (PathBuf, std::thread::JoinHandle<Vec<String>>) {
        let path = dir.join("control.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let service = std::thread::spawn(move || {
            let (mut requests, mut kept) = (Vec::new(), Vec::new());
            for (n, stream) in listener.incoming().enumerate() {
                let mut stream = stream.unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                let line = line.trim().to_owned();
                if line == "end" {
                    break;
                }
                if script(n, &line, &mut stream) {
                    kept.push(stream);
                }
                requests.push(line);
            }
            requests
        });
        (path, service)
    }

    /// Ends a fake service: its connections are taken in order, so every
    /// request made before this one has been read.
    fn end(path: &std::path::Path, service: std::thread::JoinHandle<Vec<String>>) -> Vec<String> {
        UnixStream::connect(path)
            .unwrap()
            .write_all(b"end\n")
            .unwrap();
        service.join().unwrap()
    }

    fn upgrade(socket: &std::path::Path, timeout: Duration) -> Args {
        Args {
            request: Request::Upgrade,
            socket: socket.to_path_buf(),
            timeout,
            wait_for_exit: true,
        }
    }

    /// An `exiting` answer from a generation still there when --timeout
    /// runs out: reported as it is (exit 1), and nothing more is sent. (The
    /// request was sent again after the deadline, and ran unreported.)
    #[test]
    fn nothing_is_sent_again_once_the_timeout_has_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let (path, service) = fake_service(dir.path(), |_, _, stream| {
            stream
                .write_all(b"error reason=exiting message=this generation is exiting\n")
                .unwrap();
            true // and it stays, past the client's deadline
        });
        let code = run(&upgrade(&path, Duration::from_millis(300))).unwrap();
        assert_eq!(code, ExitCode::FAILURE);
        assert_eq!(end(&path, service), ["upgrade"]);
    }

    /// The request sent again once the exiting generation is gone, and not
    /// answered in time: it may be running, so the outcome is unknown
    /// (exit 3), not the exiting answer's "did not happen" (exit 1).
    #[test]
    fn a_request_sent_again_and_not_answered_in_time_is_not_a_failure() {
        let dir = tempfile::tempdir().unwrap();
        let (path, service) = fake_service(dir.path(), |n, _, stream| {
            if n == 0 {
                stream
                    .write_all(b"error reason=exiting message=this generation is exiting\n")
                    .unwrap();
                return false; // it exits: the connection closes
            }
            true // its successor: the upgrade runs, no answer yet
        });
        let outcome = run(&upgrade(&path, Duration::from_millis(500)));
        assert!(outcome.is_err(), "{outcome:?}");
        assert_eq!(end(&path, service), ["upgrade", "upgrade"]);
    }

    /// The verdict on a rollback window: `stopped` (the new generation died
    /// in it while the service stopped: nobody serves) is a rollback for
    /// the exit status, and a line this command does not know is no
    /// verdict (exit 3), not `committed`.
    #[test]
    fn window_verdicts_other_than_committed_are_not_success() {
        for (verdict, expected) in [
            (
                "stopped pid=7 generation=2 message=nobody serves",
                Ok(ExitCode::from(ROLLED_BACK)),
            ),
            (
                "rolled_back pid=7 generation=2 served_ms=5 message=died",
                Ok(ExitCode::from(ROLLED_BACK)),
            ),
            ("unknown message=no verdict", Err(())),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let (path, service) = fake_service(dir.path(), move |_, _, stream| {
                let answer = format!(
                    "ok pid=7 generation=2 duration_us=5 old_pid={} window_ms=10\n{verdict}\n",
                    std::process::id()
                );
                stream.write_all(answer.as_bytes()).unwrap();
                false
            });
            let outcome = run(&upgrade(&path, Duration::from_secs(20))).map_err(drop);
            assert_eq!(outcome, expected, "{verdict}");
            end(&path, service);
        }
    }

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(parse_timeout("60s"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_timeout("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_timeout("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_timeout("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_timeout("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_timeout("30"), Ok(Duration::from_secs(30)));
        assert!(parse_timeout("soon").is_err());
    }

    #[test]
    fn absurd_timeouts_are_usage_mistakes_not_panics() {
        for text in ["0", "0s", "307445734561825861m", "18446744073709551615"] {
            let problem = parse_timeout(text).unwrap_err();
            assert!(problem.contains(text), "{problem}");
        }
    }

    #[test]
    fn flags_take_values_either_way_and_unknown_ones_are_named() {
        let args = parse(&["upgrade", "--socket=/run/x.sock", "--timeout", "5s"]).unwrap();
        assert_eq!(args.socket, PathBuf::from("/run/x.sock"));
        assert_eq!(args.timeout, Duration::from_secs(5));
        assert!(args.wait_for_exit);
        assert!(
            !parse(&["upgrade", "--socket", "s", "--no-wait"])
                .unwrap()
                .wait_for_exit
        );
        assert!(parse(&["--help"]).unwrap_err().starts_with("print: usage:"));
        assert!(
            parse(&["upgrade", "--help"])
                .unwrap_err()
                .starts_with("print: usage:")
        );
        assert!(parse(&["-V"]).unwrap_err().starts_with("print: handover "));
        let problem = parse(&["upgrade", "--socket", "s", "--bogus"]).unwrap_err();
        assert!(problem.contains("--bogus"), "{problem}");
        let problem = parse(&["reload", "--socket", "s"]).unwrap_err();
        assert!(problem.contains("reload"), "{problem}");
        let problem = parse(&["upgrade"]).unwrap_err();
        assert!(problem.contains("--socket"), "{problem}");
        let problem = parse(&["upgrade", "--socket"]).unwrap_err();
        assert!(problem.contains("--socket"), "{problem}");
    }
}
