# Multi-stage build of the hsm binaries. The agent needs the host's kernel features
# (Linux 6.14+, CAP_SYS_ADMIN) and access to the served filesystem: run the image with
# --privileged (or --cap-add SYS_ADMIN) and the tree bind-mounted.
FROM rust:1-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends clang libelf-dev zlib1g-dev pkg-config make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p hsm -p mmap-validate

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libelf1 zlib1g \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/hsm /usr/local/bin/hsm
COPY --from=build /src/target/release/mmap-validate /usr/local/bin/mmap-validate
COPY config/hsm.toml /etc/hsm/hsm.toml.example
ENTRYPOINT ["/usr/local/bin/hsm"]
CMD ["--help"]
