# A small non-root image of the imagegen binary.
#   docker build -t imagegen .
#   docker run --rm -e DATABASE_URL=... -e OPENROUTER_API_KEY=... -e IMAGEGEN_STORAGE=s3://bucket imagegen worker

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them.
COPY Cargo.toml Cargo.lock build.rs ./
COPY benches benches
RUN mkdir src && echo 'fn main() {}' > src/main.rs && echo '' > src/lib.rs \
    && cargo build --release --locked || true
COPY migrations migrations
COPY templates templates
COPY src src
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin imagegen

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/imagegen --create-home imagegen
COPY --from=build /src/target/release/imagegen /usr/local/bin/imagegen
USER imagegen
WORKDIR /var/lib/imagegen
ENTRYPOINT ["imagegen"]
CMD ["worker"]
