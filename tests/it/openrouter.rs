//! Integration tests: openrouter.
