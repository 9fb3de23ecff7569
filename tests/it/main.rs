//! The one integration-test binary: shared helpers and a module per area.

mod helpers;
