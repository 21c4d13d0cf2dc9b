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
# The node formats, checks, grows and mounts volumes with these tools:
# mkfs.ext4/resize2fs (e2fsprogs), mkfs.xfs/xfs_growfs (xfsprogs), blkid
# (util-linux), mount and losetup (mount). CA certificates for the API server
# and registries outside the cluster.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        ca-certificates e2fsprogs xfsprogs util-linux mount \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/terna /usr/local/bin/terna
ENTRYPOINT ["/usr/local/bin/terna"]
