//! The upgrader's state machine: which upgrade may start, and when.
//!
//! Pure: no clock, no system call. The supervisor feeds it events and does
//! what it decides. Invariants (property-tested below): an upgrade starts
//! only in a ready generation whose parent is gone and that has no upgrade
//! running, so at most two generations ever run at once; an upgrade signal
//! is never lost: it is held until it can run here, or passed on to the
//! successor that serves next, and refused only by a generation that stops.
//! A generation whose successor is ready keeps its rollback window (if it
//! has one) until the window passes or the successor exits: it takes back
//! over only then, so it never accepts while a successor serves.

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Started, `ready()` not called yet.
    Initializing,
    /// Ready and serving; may upgrade once its parent is gone.
    Serving,
    /// A successor is starting.
    Upgrading,
    /// Its successor is ready and serves; this generation accepts nothing,
    /// drains, and takes back over if the successor exits before its
    /// rollback window passes. Upgrade signals go on to the successor.
    Window,
    /// Its successor is ready (and its window, if any, has passed): it
    /// drains and leaves, and passes upgrade signals on to the successor.
    Exiting,
    /// `stop()` was called: a final stop.
    Stopping,
}

/// Who asked for an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A call of `upgrade()`; answered at once.
    Call,
    /// The upgrade signal, or a request the parent passed on; held while it
    /// cannot run yet.
    Signal,
}

/// Why an upgrade request cannot start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotReady,
    ParentAlive,
    InProgress,
    Exiting,
    /// This generation's successor serves in its rollback window.
    WindowOpen,
}

/// What the supervisor must do about an upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start a successor now.
    Start,
    /// Answer the request with this refusal.
    Refuse(Refusal),
    /// Keep the (signal) request; it starts once the generation is ready,
    /// its parent is gone and no upgrade runs, or is passed on if the
    /// running upgrade succeeds.
    Hold,
    /// Pass the (signal) request on to the ready successor, which serves
    /// next: it holds it until this generation is gone.
    Forward,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Machine {
    phase: Phase,
    parent_alive: bool,
    signal_held: bool,
    /// A request was passed on to the successor while its window was open:
    /// if that successor dies within the window, it comes back here.
    forwarded_in_window: bool,
}

impl Machine {
    pub(crate) fn new(has_parent: bool) -> Machine {
        Machine {
            phase: Phase::Initializing,
            parent_alive: has_parent,
            signal_held: false,
            forwarded_in_window: false,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn request_upgrade(&mut self, origin: Origin) -> Decision {
        let refusal = match self.phase {
            Phase::Upgrading => Some(Refusal::InProgress),
            Phase::Window => Some(Refusal::WindowOpen),
            Phase::Exiting | Phase::Stopping => Some(Refusal::Exiting),
            Phase::Initializing => Some(Refusal::NotReady),
            Phase::Serving if self.parent_alive => Some(Refusal::ParentAlive),
            Phase::Serving => None,
        };
        match (refusal, origin) {
            (None, _) => {
                self.phase = Phase::Upgrading;
                Decision::Start
            }
            (Some(refusal), Origin::Call) => Decision::Refuse(refusal),
            (Some(_), Origin::Signal) => match self.phase {
                Phase::Window => {
                    self.forwarded_in_window = true;
                    Decision::Forward
                }
                Phase::Exiting => Decision::Forward,
                Phase::Stopping => Decision::Refuse(Refusal::Exiting),
                // Initializing, a parent still alive, an upgrade running.
                _ => {
                    self.signal_held = true;
                    Decision::Hold
                }
            },
        }
    }

    /// `ready()` was called. `Ok(true)` means a held signal must start an
    /// upgrade now.
    pub(crate) fn ready(&mut self) -> Result<bool, ()> {
        if self.phase != Phase::Initializing {
            return Err(());
        }
        self.phase = Phase::Serving;
        Ok(self.take_held())
    }

    /// The parent has exited. `true` means a held signal must start an
    /// upgrade now.
    pub(crate) fn parent_gone(&mut self) -> bool {
        self.parent_alive = false;
        self.take_held()
    }

    /// The running upgrade ended. A signal held while it ran now starts
    /// another upgrade (`Start`: this one failed) or goes to the successor
    /// (`Forward`: it succeeded). A successful one opens the rollback
    /// window if `window`.
    pub(crate) fn upgrade_finished(&mut self, succeeded: bool, window: bool) -> Option<Decision> {
        if self.phase != Phase::Upgrading {
            return None;
        }
        if succeeded {
            self.phase = if window {
                Phase::Window
            } else {
                Phase::Exiting
            };
            let forward = std::mem::take(&mut self.signal_held);
            self.forwarded_in_window = forward && window;
            forward.then_some(Decision::Forward)
        } else {
            self.phase = Phase::Serving;
            self.take_held().then_some(Decision::Start)
        }
    }

    /// The rollback window closes: it passed, the service stopped this
    /// generation, or dropped its `Upgrader`. The successor keeps serving
    /// for good. `true` if a window was open.
    pub(crate) fn commit(&mut self) -> bool {
        let open = self.phase == Phase::Window;
        if open {
            self.phase = Phase::Exiting;
            // What was passed on stays with the successor, which serves.
            self.forwarded_in_window = false;
        }
        open
    }

    /// The ready successor exited. Within the window, this generation
    /// serves again: `Some(start)`, where `start` says that an upgrade
    /// request passed on to that successor during the window must start an
    /// upgrade here now (it is not lost with the successor). After the
    /// window, nothing changes: `None`.
    pub(crate) fn successor_lost(&mut self) -> Option<bool> {
        if self.phase != Phase::Window {
            return None;
        }
        self.phase = Phase::Serving;
        self.signal_held |= std::mem::take(&mut self.forwarded_in_window);
        Some(self.take_held())
    }

    /// Whether this generation is the one that serves, and so speaks for
    /// the service: to its manager (`STOPPING=1`) and for its Unix socket
    /// paths (a final stop removes them). Not while its parent lives: the
    /// parent still serves while this one starts, and once this one is
    /// ready the parent may be in its rollback window, ready to serve
    /// again if this one ends (a successor stopped then must not take the
    /// paths from under it). Not once its successor is ready.
    pub(crate) fn serves(&self) -> bool {
        match self.phase {
            Phase::Initializing | Phase::Serving | Phase::Upgrading => !self.parent_alive,
            Phase::Window | Phase::Exiting | Phase::Stopping => false,
        }
    }

    /// `stop()` was called. `true` means an upgrade is running and must be
    /// aborted. A generation whose successor is ready is leaving already: a
    /// stop closes its rollback window (so that a successor stopped with it,
    /// as a service manager stops them all, does not bring it back), and
    /// changes nothing else.
    pub(crate) fn stop(&mut self) -> bool {
        if matches!(self.phase, Phase::Window | Phase::Exiting) {
            self.commit();
            return false;
        }
        let was_upgrading = self.phase == Phase::Upgrading;
        self.phase = Phase::Stopping;
        self.signal_held = false;
        was_upgrading
    }

    fn take_held(&mut self) -> bool {
        if self.signal_held && self.phase == Phase::Serving && !self.parent_alive {
            self.signal_held = false;
            self.phase = Phase::Upgrading;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone, Copy)]
    enum Event {
        Call,
        Signal,
        Ready,
        ParentGone,
        /// The running upgrade ended: succeeded, with a rollback window.
        Finished(bool, bool),
        /// The window passed (or the `Upgrader` was dropped).
        Commit,
        /// The ready successor exited.
        SuccessorLost,
        Stop,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Call),
            Just(Event::Signal),
            Just(Event::Ready),
            Just(Event::ParentGone),
            (any::<bool>(), any::<bool>()).prop_map(|(ok, window)| Event::Finished(ok, window)),
            Just(Event::Commit),
            Just(Event::SuccessorLost),
            Just(Event::Stop),
        ]
    }

    proptest! {
        /// Counts live successors as the supervisor would, and checks that
        /// at most one runs, only from a ready generation without a parent,
        /// and that nothing starts after exiting or stopping.
        #[test]
        fn never_two_upgrades_and_never_with_a_parent(
            has_parent in any::<bool>(),
            events in prop::collection::vec(event(), 0..60),
        ) {
            let mut machine = Machine::new(has_parent);
            let mut running = false;
            let mut parent_alive = has_parent;
            for event in events {
                let before = machine.phase();
                let started = match event {
                    Event::Call => machine.request_upgrade(Origin::Call) == Decision::Start,
                    Event::Signal => machine.request_upgrade(Origin::Signal) == Decision::Start,
                    Event::Ready => machine.ready() == Ok(true),
                    Event::ParentGone => { parent_alive = false; machine.parent_gone() }
                    Event::Finished(ok, window) => {
                        let mut again = false;
                        if running {
                            running = false;
                            again = machine.upgrade_finished(ok, window) == Some(Decision::Start);
                        }
                        again
                    }
                    Event::Commit => { machine.commit(); false }
                    Event::SuccessorLost => machine.successor_lost() == Some(true),
                    Event::Stop => { machine.stop(); running = false; false }
                };
                if started {
                    prop_assert!(!running, "a second upgrade started");
                    prop_assert!(!parent_alive, "an upgrade started while the parent lives");
                    // From a serving generation, or from one whose successor
                    // died in its window with a request it had passed on.
                    prop_assert!(
                        matches!(before, Phase::Serving | Phase::Initializing | Phase::Upgrading)
                            || (before == Phase::Window && matches!(event, Event::SuccessorLost))
                    );
                    running = true;
                }
                prop_assert_eq!(running, machine.phase() == Phase::Upgrading);
            }
        }

        /// Every upgrade signal is acted on: it starts an upgrade here (at
        /// once, or once this generation is ready, its parent gone and the
        /// running upgrade failed), or it is passed to the successor that
        /// serves next. Only a generation that stops refuses one.
        #[test]
        fn upgrade_signals_are_never_lost(
            has_parent in any::<bool>(),
            events in prop::collection::vec(event(), 0..60),
        ) {
            let mut machine = Machine::new(has_parent);
            let mut running = false;
            // Signals accepted and not yet acted on.
            let mut pending = 0usize;
            // Signals passed on to a successor in its window: acted on
            // only once the window closes with it serving.
            let mut forwarded_in_window = 0usize;
            for event in events {
                let decision = match event {
                    Event::Call => Some(machine.request_upgrade(Origin::Call)),
                    Event::Signal => {
                        pending += 1;
                        Some(machine.request_upgrade(Origin::Signal))
                    }
                    Event::Ready => (machine.ready() == Ok(true)).then_some(Decision::Start),
                    Event::ParentGone => machine.parent_gone().then_some(Decision::Start),
                    Event::Finished(ok, window) if running => {
                        running = false;
                        machine.upgrade_finished(ok, window)
                    }
                    Event::Finished(..) => None,
                    Event::Commit => {
                        machine.commit();
                        forwarded_in_window = 0;
                        None
                    }
                    Event::SuccessorLost => {
                        // A request passed on in the window comes back.
                        pending += std::mem::take(&mut forwarded_in_window);
                        // (`None`: the window had closed; the successor kept it.)
                        (machine.successor_lost() == Some(true)).then_some(Decision::Start)
                    }
                    Event::Stop => {
                        machine.stop();
                        running = false;
                        // A stop in the window commits it: the successor
                        // keeps what it was passed.
                        forwarded_in_window = 0;
                        if machine.phase() == Phase::Stopping {
                            pending = 0;
                        }
                        None
                    }
                };
                match decision {
                    Some(Decision::Start) => {
                        running = true;
                        pending = 0;
                    }
                    Some(Decision::Forward) if machine.phase() == Phase::Window => {
                        forwarded_in_window += std::mem::take(&mut pending);
                    }
                    Some(Decision::Forward) => pending = 0,
                    Some(Decision::Refuse(_)) if event_is_signal(event) => {
                        prop_assert_eq!(machine.phase(), Phase::Stopping, "a signal refused");
                        pending = 0;
                    }
                    _ => {}
                }
                // Nothing may wait once it could run.
                if machine.phase() == Phase::Serving && !machine.parent_alive {
                    prop_assert_eq!(pending, 0, "a held signal did not start an upgrade");
                }
            }
        }

        /// Never both accepting: this generation accepts (`Serving`,
        /// `Upgrading`) only while no ready successor lives; it takes back
        /// over from one only when that one has exited within the window,
        /// and never once the window is closed.
        #[test]
        fn never_accepting_beside_a_ready_successor(
            events in prop::collection::vec(event(), 0..80),
        ) {
            let mut machine = Machine::new(false);
            let mut running = false;
            // A successor that said it is ready and has not exited.
            let mut successor_serves = false;
            // Whether this generation may still take back over.
            let mut window_open = false;
            for event in events {
                match event {
                    Event::Call => { if machine.request_upgrade(Origin::Call) == Decision::Start { running = true; } }
                    Event::Signal => { if machine.request_upgrade(Origin::Signal) == Decision::Start { running = true; } }
                    Event::Ready => { if machine.ready() == Ok(true) { running = true; } }
                    Event::ParentGone => { if machine.parent_gone() { running = true; } }
                    Event::Finished(ok, window) => {
                        if running {
                            running = false;
                            if machine.upgrade_finished(ok, window) == Some(Decision::Start) {
                                running = true;
                            }
                            if ok && machine.phase() != Phase::Stopping {
                                successor_serves = true;
                                window_open = window;
                            }
                        }
                    }
                    Event::Commit => { machine.commit(); window_open = false; }
                    Event::SuccessorLost => {
                        if successor_serves {
                            successor_serves = false;
                            let back = machine.successor_lost();
                            prop_assert_eq!(back.is_some(), window_open, "took back over iff the window was open");
                            if back == Some(true) {
                                running = true;
                            }
                            window_open = false;
                        }
                    }
                    Event::Stop => { machine.stop(); running = false; window_open = false; }
                }
                let accepting = matches!(machine.phase(), Phase::Serving | Phase::Upgrading);
                prop_assert!(!(accepting && successor_serves), "accepting beside a ready successor");
                prop_assert!(!(machine.serves() && successor_serves), "speaks for the service beside its successor");
                if machine.phase() == Phase::Window {
                    prop_assert!(successor_serves && window_open);
                }
            }
        }

        /// A signal that arrives too early is held, and runs as soon as the
        /// generation is ready and its parent is gone, in either order.
        #[test]
        fn early_signal_is_held_not_lost(ready_first in any::<bool>(), extra_signals in 0..5usize) {
            let mut machine = Machine::new(true);
            prop_assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Hold);
            for _ in 0..extra_signals {
                prop_assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Hold);
            }
            let started = if ready_first {
                prop_assert_eq!(machine.ready(), Ok(false));
                machine.parent_gone()
            } else {
                prop_assert!(!machine.parent_gone());
                machine.ready() == Ok(true)
            };
            prop_assert!(started);
            prop_assert_eq!(machine.phase(), Phase::Upgrading);
            // Held signals coalesce into that one upgrade.
            prop_assert_eq!(machine.upgrade_finished(false, false), None);
            prop_assert_eq!(machine.phase(), Phase::Serving);
        }
    }

    fn event_is_signal(event: Event) -> bool {
        matches!(event, Event::Signal)
    }

    #[test]
    fn calls_are_refused_with_the_reason() {
        let mut machine = Machine::new(true);
        assert_eq!(
            machine.request_upgrade(Origin::Call),
            Decision::Refuse(Refusal::NotReady)
        );
        assert_eq!(machine.ready(), Ok(false));
        assert_eq!(machine.ready(), Err(()));
        assert_eq!(
            machine.request_upgrade(Origin::Call),
            Decision::Refuse(Refusal::ParentAlive)
        );
        assert!(!machine.parent_gone());
        assert_eq!(machine.request_upgrade(Origin::Call), Decision::Start);
        assert_eq!(
            machine.request_upgrade(Origin::Call),
            Decision::Refuse(Refusal::InProgress)
        );
        assert_eq!(machine.upgrade_finished(true, false), None);
        assert_eq!(
            machine.request_upgrade(Origin::Call),
            Decision::Refuse(Refusal::Exiting)
        );
    }

    #[test]
    fn a_signal_during_an_upgrade_runs_after_it_fails() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Start);
        assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Hold);
        assert_eq!(
            machine.upgrade_finished(false, false),
            Some(Decision::Start)
        );
        assert_eq!(machine.phase(), Phase::Upgrading);
    }

    #[test]
    fn a_signal_during_an_upgrade_goes_to_the_successor_after_it_succeeds() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Start);
        assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Hold);
        assert_eq!(
            machine.upgrade_finished(true, false),
            Some(Decision::Forward)
        );
        assert_eq!(machine.phase(), Phase::Exiting);
        // While it drains, each further signal is passed on too.
        assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Forward);
    }

    #[test]
    fn a_stopping_generation_refuses_signals() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        assert!(!machine.stop());
        assert_eq!(
            machine.request_upgrade(Origin::Signal),
            Decision::Refuse(Refusal::Exiting)
        );
    }

    #[test]
    fn only_the_serving_generation_speaks_for_the_service() {
        let mut machine = Machine::new(true);
        assert!(!machine.serves(), "starting, parent alive");
        machine.parent_gone();
        assert!(machine.serves(), "starting, parent gone: the only one");
        let mut machine = Machine::new(true);
        machine.ready().unwrap();
        assert!(
            !machine.serves(),
            "ready, the parent alive: it may roll back"
        );
        machine.parent_gone();
        assert!(machine.serves(), "ready, the parent gone");
        assert!(Machine::new(false).serves(), "generation 0");
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        machine.request_upgrade(Origin::Call);
        assert!(machine.serves(), "upgrading");
        machine.upgrade_finished(true, false);
        assert!(!machine.serves(), "its successor is ready");
        let mut machine = Machine::new(true);
        machine.stop();
        assert!(!machine.serves(), "stopped while starting");
    }

    #[test]
    fn stop_aborts_a_running_upgrade() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        assert_eq!(machine.request_upgrade(Origin::Call), Decision::Start);
        assert!(machine.stop());
        assert_eq!(machine.phase(), Phase::Stopping);
        assert_eq!(machine.upgrade_finished(true, false), None);
        assert_eq!(machine.phase(), Phase::Stopping);
    }

    #[test]
    fn a_generation_whose_successor_is_ready_ignores_a_stop() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        machine.request_upgrade(Origin::Call);
        machine.upgrade_finished(true, false);
        assert!(!machine.stop());
        assert_eq!(machine.phase(), Phase::Exiting);
    }

    #[test]
    fn a_successor_lost_in_the_window_gives_the_service_back() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        assert_eq!(machine.request_upgrade(Origin::Call), Decision::Start);
        assert_eq!(machine.upgrade_finished(true, true), None);
        assert_eq!(machine.phase(), Phase::Window);
        assert!(!machine.serves());
        assert_eq!(
            machine.request_upgrade(Origin::Call),
            Decision::Refuse(Refusal::WindowOpen)
        );
        // Signals go to the successor, which serves.
        assert_eq!(machine.successor_lost(), Some(false));
        assert_eq!(machine.phase(), Phase::Serving);
        assert!(machine.serves());
        assert_eq!(machine.request_upgrade(Origin::Call), Decision::Start);
    }

    #[test]
    fn a_request_passed_on_in_the_window_comes_back_if_the_successor_dies() {
        for held_during_the_upgrade in [false, true] {
            let mut machine = Machine::new(false);
            machine.ready().unwrap();
            assert_eq!(machine.request_upgrade(Origin::Call), Decision::Start);
            let forwarded = if held_during_the_upgrade {
                assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Hold);
                machine.upgrade_finished(true, true)
            } else {
                assert_eq!(machine.upgrade_finished(true, true), None);
                Some(machine.request_upgrade(Origin::Signal))
            };
            assert_eq!(forwarded, Some(Decision::Forward));
            // The successor dies within the window: the request starts an
            // upgrade here.
            assert_eq!(machine.successor_lost(), Some(true));
            assert_eq!(machine.phase(), Phase::Upgrading);
        }
        // A window that closed leaves the request with the successor.
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        machine.request_upgrade(Origin::Call);
        machine.upgrade_finished(true, true);
        assert_eq!(machine.request_upgrade(Origin::Signal), Decision::Forward);
        assert!(machine.commit());
        assert_eq!(machine.successor_lost(), None);
        assert_eq!(machine.phase(), Phase::Exiting);
    }

    #[test]
    fn a_closed_window_never_gives_the_service_back() {
        for close in [Machine::commit as fn(&mut Machine) -> bool, |m| m.stop()] {
            let mut machine = Machine::new(false);
            machine.ready().unwrap();
            machine.request_upgrade(Origin::Call);
            machine.upgrade_finished(true, true);
            close(&mut machine);
            assert_eq!(machine.phase(), Phase::Exiting);
            assert_eq!(machine.successor_lost(), None);
            assert_eq!(machine.phase(), Phase::Exiting);
        }
        // Without a window, there is nothing to give back.
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        machine.request_upgrade(Origin::Call);
        machine.upgrade_finished(true, false);
        assert_eq!(machine.successor_lost(), None);
        assert_eq!(machine.phase(), Phase::Exiting);
    }
}
