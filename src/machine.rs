//! The upgrader's state machine: which upgrade may start, and when.
//!
//! Pure: no clock, no system call. The supervisor feeds it events and does
//! what it decides. Invariants (property-tested below): an upgrade starts
//! only in a ready generation whose parent is gone and that has no upgrade
//! running, so at most two generations ever run at once; an upgrade signal
//! is never lost, only held until it can run, or refused while one runs.

/// Where a generation is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Started, `ready()` not called yet.
    Initializing,
    /// Ready and serving; may upgrade once its parent is gone.
    Serving,
    /// A successor is starting.
    Upgrading,
    /// Its successor is ready or `stop()` was called: it drains and leaves.
    Exiting,
}

/// Who asked for an upgrade.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A call of `upgrade()`; answered at once.
    Call,
    /// The upgrade signal; held while it cannot run yet.
    Signal,
}

/// Why an upgrade request cannot start now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    NotReady,
    ParentAlive,
    InProgress,
    Exiting,
}

/// What the supervisor must do about an upgrade request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Start a successor now.
    Start,
    /// Answer the request with this refusal.
    Refuse(Refusal),
    /// Keep the (signal) request; it starts once the generation is ready
    /// and its parent is gone.
    Hold,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Machine {
    phase: Phase,
    parent_alive: bool,
    signal_held: bool,
}

impl Machine {
    pub(crate) fn new(has_parent: bool) -> Machine {
        Machine {
            phase: Phase::Initializing,
            parent_alive: has_parent,
            signal_held: false,
        }
    }

    pub(crate) fn phase(&self) -> Phase {
        self.phase
    }

    pub(crate) fn request_upgrade(&mut self, origin: Origin) -> Decision {
        let refusal = match self.phase {
            Phase::Upgrading => Some(Refusal::InProgress),
            Phase::Exiting => Some(Refusal::Exiting),
            Phase::Initializing => Some(Refusal::NotReady),
            Phase::Serving if self.parent_alive => Some(Refusal::ParentAlive),
            Phase::Serving => None,
        };
        match (refusal, origin) {
            (None, _) => {
                self.phase = Phase::Upgrading;
                Decision::Start
            }
            (Some(Refusal::NotReady | Refusal::ParentAlive), Origin::Signal) => {
                self.signal_held = true;
                Decision::Hold
            }
            (Some(refusal), _) => Decision::Refuse(refusal),
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

    /// The running upgrade ended.
    pub(crate) fn upgrade_finished(&mut self, succeeded: bool) {
        if self.phase == Phase::Upgrading {
            self.phase = if succeeded {
                Phase::Exiting
            } else {
                Phase::Serving
            };
        }
    }

    /// Whether this generation serves its Unix socket paths, so that a
    /// final stop now must remove them: not while it starts and its parent,
    /// which still serves them, lives.
    pub(crate) fn serves_paths(&self) -> bool {
        !(self.phase == Phase::Initializing && self.parent_alive)
    }

    /// `stop()` was called. `true` means an upgrade is running and must be
    /// aborted.
    pub(crate) fn stop(&mut self) -> bool {
        let was_upgrading = self.phase == Phase::Upgrading;
        self.phase = Phase::Exiting;
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
        Finished(bool),
        Stop,
    }

    fn event() -> impl Strategy<Value = Event> {
        prop_oneof![
            Just(Event::Call),
            Just(Event::Signal),
            Just(Event::Ready),
            Just(Event::ParentGone),
            any::<bool>().prop_map(Event::Finished),
            Just(Event::Stop),
        ]
    }

    proptest! {
        /// Counts live successors as the supervisor would, and checks that
        /// at most one runs, only from a ready generation without a parent,
        /// and that nothing starts after exiting.
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
                    Event::Finished(ok) => {
                        if running { machine.upgrade_finished(ok); running = false; }
                        false
                    }
                    Event::Stop => { machine.stop(); running = false; false }
                };
                if started {
                    prop_assert!(!running, "a second upgrade started");
                    prop_assert!(!parent_alive, "an upgrade started while the parent lives");
                    prop_assert!(matches!(before, Phase::Serving | Phase::Initializing));
                    running = true;
                }
                prop_assert_eq!(running, machine.phase() == Phase::Upgrading);
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
            machine.upgrade_finished(false);
            prop_assert_eq!(machine.phase(), Phase::Serving);
        }
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
        assert_eq!(
            machine.request_upgrade(Origin::Signal),
            Decision::Refuse(Refusal::InProgress)
        );
        machine.upgrade_finished(true);
        assert_eq!(
            machine.request_upgrade(Origin::Signal),
            Decision::Refuse(Refusal::Exiting)
        );
    }

    #[test]
    fn a_starting_successor_does_not_serve_its_parents_paths() {
        let mut machine = Machine::new(true);
        assert!(!machine.serves_paths(), "starting, parent alive");
        machine.parent_gone();
        assert!(
            machine.serves_paths(),
            "starting, parent gone: the only one"
        );
        let mut machine = Machine::new(true);
        machine.ready().unwrap();
        assert!(machine.serves_paths(), "ready: the parent is leaving");
        assert!(Machine::new(false).serves_paths(), "generation 0");
    }

    #[test]
    fn stop_aborts_a_running_upgrade() {
        let mut machine = Machine::new(false);
        machine.ready().unwrap();
        assert_eq!(machine.request_upgrade(Origin::Call), Decision::Start);
        assert!(machine.stop());
        assert_eq!(machine.phase(), Phase::Exiting);
        machine.upgrade_finished(true);
        assert_eq!(machine.phase(), Phase::Exiting);
    }
}
