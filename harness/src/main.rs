//! `handover-harness`: runs chaos scenarios against the subject service.
//!
//! ```text
//! handover-harness run [--scenarios DIR] [--out DIR] [--quiet] [NAME...]
//! handover-harness list [--scenarios DIR]
//! handover-harness subject [FLAGS]      # the subject service itself
//! ```
//!
//! `run` runs the named scenarios (all of them by default), prints a live
//! progress line and a table, and writes `report.json` and `report.html`
//! (the table and a picture per scenario) into the output directory. It
//! exits 0 only if every scenario passed.

use std::path::PathBuf;
use std::process::ExitCode;

use handover_harness::report::{ScenarioReport, html, table};
use handover_harness::runner::{RunOptions, run};
use handover_harness::scenario::Scenario;

fn main() -> ExitCode {
    let mut words = std::env::args().skip(1);
    let command = words.next().unwrap_or_default();
    if command == "subject" {
        return handover_harness::subject::main(words);
    }
    let mut scenarios_dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../scenarios"));
    let mut out = PathBuf::from("target/harness-report");
    let mut quiet = false;
    let mut names = Vec::new();
    while let Some(word) = words.next() {
        match word.as_str() {
            "--scenarios" => {
                scenarios_dir = words.next().map(PathBuf::from).unwrap_or(scenarios_dir)
            }
            "--out" => out = words.next().map(PathBuf::from).unwrap_or(out),
            "--quiet" => quiet = true,
            _ => names.push(word),
        }
    }
    let scenarios = match Scenario::load_dir(&scenarios_dir) {
        Ok(scenarios) => scenarios,
        Err(problem) => {
            eprintln!("handover-harness: {problem}");
            return ExitCode::from(2);
        }
    };
    match command.as_str() {
        "list" => {
            for scenario in &scenarios {
                println!(
                    "{:<30} {}",
                    scenario.name,
                    scenario.description.trim().replace('\n', " ")
                );
            }
            ExitCode::SUCCESS
        }
        "run" => {
            let unknown: Vec<&String> = names
                .iter()
                .filter(|name| !scenarios.iter().any(|s| &s.name == *name))
                .collect();
            if !unknown.is_empty() {
                eprintln!(
                    "handover-harness: no such scenario: {unknown:?} (see `handover-harness list`)"
                );
                return ExitCode::from(2);
            }
            let chosen: Vec<&Scenario> = scenarios
                .iter()
                .filter(|s| names.is_empty() || names.contains(&s.name))
                .collect();
            use std::io::IsTerminal;
            run_all(&chosen, &out, !quiet && std::io::stderr().is_terminal())
        }
        _ => {
            eprintln!(
                "usage: handover-harness run [--scenarios DIR] [--out DIR] [--quiet] [NAME...] | list | subject [FLAGS]"
            );
            ExitCode::from(2)
        }
    }
}

fn run_all(scenarios: &[&Scenario], out: &std::path::Path, progress: bool) -> ExitCode {
    let options = RunOptions {
        subject: std::env::current_exe().expect("this executable"),
        subject_args: vec!["subject".into()],
        progress,
    };
    let mut reports: Vec<ScenarioReport> = Vec::new();
    for scenario in scenarios {
        let report = run(scenario, &options);
        eprintln!(
            "  {:<30} {}",
            report.name,
            if report.passed {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", report.problems.join("; "))
            }
        );
        reports.push(report);
    }
    println!("\n{}", table(&reports));
    let written = std::fs::create_dir_all(out)
        .and_then(|()| {
            std::fs::write(
                out.join("report.json"),
                serde_json::to_string_pretty(&reports).unwrap_or_default(),
            )
        })
        .and_then(|()| std::fs::write(out.join("report.html"), html(&reports)));
    match written {
        Ok(()) => println!(
            "report: {}/report.json, picture: {}/report.html",
            out.display(),
            out.display()
        ),
        Err(e) => eprintln!(
            "handover-harness: cannot write the report to {}: {e}",
            out.display()
        ),
    }
    let passed = reports.iter().filter(|r| r.passed).count();
    println!(
        "scenarios: {passed} passed, {} failed",
        reports.len() - passed
    );
    if passed == reports.len() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
