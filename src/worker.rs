//! Slots, leases, heartbeats, pauses and shutdown around a pluggable job handler.
