//! Where decoded images go: S3-compatible object storage or a local directory, and the key scheme.
