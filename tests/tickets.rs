//! `TicketKeys::inherit` in a successor whose parent handed on something
//! that is not ticket keys (a release that handed on other state): new
//! keys and a warning, not an error, so the deploy goes through. The
//! successor is this test binary again (it has one test, which plays the
//! parent, or the successor once `Upgrader::new` says it has a parent).

use std::time::Duration;

use handover::drain::TicketKeys;
use handover::{Options, Upgrader};

mod common;

#[tokio::test]
async fn a_parent_state_that_is_not_keys_gives_new_keys_and_the_upgrade_goes_through() {
    let upgrader = Upgrader::new(
        Options::default()
            .upgrade_signal(None)
            .upgrade_timeout(Duration::from_secs(30)),
    )
    .unwrap();
    if upgrader.has_parent() {
        // The successor: ready only if `inherit` gave keys.
        let keys = TicketKeys::inherit(&upgrader).await;
        assert!(keys.is_ok(), "inherit failed: {keys:?}");
        upgrader.ready().unwrap();
        // Ended by the parent test.
        std::future::pending::<()>().await;
    }
    upgrader.set_state_provider(|| b"a release's own state, not keys".to_vec());
    upgrader.ready().unwrap();
    let upgraded = upgrader
        .upgrade()
        .await
        .expect("the successor inherited new keys and became ready");
    common::finish(upgrader, upgraded.pid);
}
