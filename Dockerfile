# The terna image, one binary for every role (controller, node, engine):
# deploy/ runs it with the subcommand as the container's args.
#
#   docker build -t ghcr.io/terna/terna:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the build reads (a checkout's target/ and .tools/ are large and
# irrelevant). build.rs compiles proto/ with protox: no protoc needed.
# The bench sources because Cargo.toml declares them as targets.
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY src src
COPY bench/datapath.rs bench/provision.rs bench/
RUN cargo build --release --locked --bin terna

FROM debian:bookworm-slim
# The runtime's tools (formatting, checking, growing and mounting volumes,
# CA certificates): deploy/image/packages says which and why, and
# scripts/build-images installs the same list when no registry is at hand.
COPY deploy/image/packages /tmp/packages
RUN apt-get update \
    && grep -v '^#' /tmp/packages | xargs apt-get install -y --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/packages
COPY --from=build /src/target/release/terna /usr/local/bin/terna
ENTRYPOINT ["/usr/local/bin/terna"]
