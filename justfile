# Everyday recipes. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

# The demo: worker + local stand-in provider + a sample batch; images land in ./images.
demo:
    cargo run --release -- demo

# Every test, against the local Postgres and a local S3-compatible server (started if needed).
test *ARGS:
    scripts/test {{ARGS}}

# Every benchmark, figures beside their targets (the README's Performance section); extra flags
# pass through, e.g. `just bench --json`. Per-job info logs are off unless RUST_LOG says otherwise.
bench *ARGS:
    RUST_LOG="${RUST_LOG:-warn}" cargo run --release -- bench all {{ARGS}}

# Just the pipeline's cases (1,000 flash calls at 20 s in bursts, 200 Pro 4K calls, 256 at 2 s,
# the provider's in-flight limit), figures beside their targets; about 5 minutes.
bench-pipeline *ARGS:
    RUST_LOG="${RUST_LOG:-warn}" cargo run --release -- bench pipeline {{ARGS}}

# CPU per image without a full run: the answer parser and image path at 1.2 MB and 8 MB (divan).
bench-micro:
    cargo bench --bench answer

# Formatting and lints, as CI runs them.
lint:
    cargo fmt --check
    cargo clippy --all-targets -- -D warnings

# Start the services the tests and a local worker use (Postgres is expected to be installed).
up:
    pg_isready -h 127.0.0.1 -p 5432 -q || pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    scripts/s3-server up

# Stop the local S3-compatible server.
down:
    scripts/s3-server down

# A worker against the real OpenRouter (needs OPENROUTER_API_KEY); extra flags pass through.
worker *ARGS:
    cargo run --release -- worker {{ARGS}}

# The local stand-in provider on :8787 (development only).
fake-openrouter *ARGS:
    cargo run --release -- fake-openrouter {{ARGS}}

# Run the same checks CI runs, on a fresh clone of this checkout.
ci:
    rm -rf /tmp/imagegen-ci && git clone -q . /tmp/imagegen-ci && cd /tmp/imagegen-ci && CI=true bash .ci/run
