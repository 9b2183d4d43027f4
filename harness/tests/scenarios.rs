//! Every scenario in `scenarios/`, on real processes under load: part of
//! `cargo test --features chaos`. A failing scenario prints the harness's
//! table, with what did not hold.
#![cfg(feature = "chaos")]

use std::path::{Path, PathBuf};

use handover_harness::report::table;
use handover_harness::runner::{RunOptions, run};
use handover_harness::scenario::Scenario;

#[test]
fn every_scenario_passes() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scenarios");
    let scenarios = Scenario::load_dir(&dir).expect("readable scenarios");
    assert!(
        scenarios.len() >= 19,
        "the scenarios of the contract are all there"
    );
    let options = RunOptions {
        subject: PathBuf::from(env!("CARGO_BIN_EXE_handover-subject")),
        subject_args: Vec::new(),
        progress: false,
        // Counts and states only: timings are judged by `handover-harness
        // run` and the benches.
        timing_gates: false,
    };
    let reports: Vec<_> = scenarios
        .iter()
        .map(|scenario| run(scenario, &options))
        .collect();
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.passed)
        .map(|r| r.name.as_str())
        .collect();
    assert!(failed.is_empty(), "failed: {failed:?}\n{}", table(&reports));
    // Zero, but for a scenario that shows an outage on purpose (its
    // description says why, and it passes only if the loss is seen).
    for (scenario, report) in scenarios.iter().zip(&reports) {
        if scenario.expect.min_dropped == 0 {
            assert_eq!(report.dropped(), 0, "{}", report.name);
        } else {
            assert!(
                report.dropped() >= scenario.expect.min_dropped,
                "{}",
                report.name
            );
        }
    }
}

/// A scenario file with a mistake is refused with the file and the field.
#[test]
fn a_scenario_with_an_unknown_field_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(&path, "description = \"x\"\n[load]\nhttp_keepalive = 3\n").unwrap();
    let problem = Scenario::load(&path).unwrap_err();
    assert!(
        problem.contains("typo.toml") && problem.contains("http_keepalive"),
        "{problem}"
    );
}

/// A generation's stderr (here a panic's message) is not printed across the
/// table: a scenario that fails carries its last lines in the report.
#[test]
fn a_failing_scenario_reports_the_subjects_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("panics-and-fails.toml");
    std::fs::write(
        &path,
        "description = \"generation 1 panics in init; expecting it to serve fails the scenario\"\n\
         [subject.faults]\n1 = \"panic\"\n[load]\nduration_ms = 600\n\
         [[step]]\nat_ms = 100\naction = \"upgrade\"\nexpect = \"successor_exited\"\n\
         [expect]\ngeneration = 1\n",
    )
    .unwrap();
    let scenario = Scenario::load(&path).unwrap();
    let options = RunOptions {
        subject: PathBuf::from(env!("CARGO_BIN_EXE_handover-subject")),
        subject_args: Vec::new(),
        progress: false,
        // Counts and states only: timings are judged by `handover-harness
        // run` and the benches.
        timing_gates: false,
    };
    let report = run(&scenario, &options);
    assert!(!report.passed);
    assert!(
        report
            .stderr_tail
            .iter()
            .any(|line| line.contains("fault: panic during init")),
        "problems {:?}, stderr tail {:?}",
        report.problems,
        report.stderr_tail
    );
    assert!(table(&[report]).contains("| "), "the table shows it");
}
