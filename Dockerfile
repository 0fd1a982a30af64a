# syntax=docker/dockerfile:1
# Build stage: compile the release binary with the locked dependency set.
# (Without a registry, scripts/container-image makes this FROM image, and
# the next one, locally from Debian's packages; the Dockerfile is the same.)
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
# migrate --grant applies roles.sql, built into the binary.
COPY deploy/postgres/roles.sql deploy/postgres/roles.sql
COPY config config
# Crates and compiled dependencies stay in cache mounts between builds
# (BuildKit and buildah both keep them); none of it reaches the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && strip target/release/outbox-relay \
 && cp target/release/outbox-relay /usr/local/bin/outbox-relay

# Runtime stage: just the binary, its config and a non-root user.
FROM debian:bookworm-slim
# The system's roots, for rediss:// servers with a public certificate.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin relay
COPY --from=build /usr/local/bin/outbox-relay /usr/local/bin/outbox-relay
COPY config/ /etc/outbox-relay/
ENV OUTBOX_RELAY_CONFIG=/etc/outbox-relay/default.toml
# /healthz, /readyz and /metrics must be reachable from outside the
# container (probes, Prometheus): the config's default is loopback only.
ENV OUTBOX_RELAY_HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
# Numeric, so Kubernetes' runAsNonRoot can check it without /etc/passwd.
USER 10001:10001
# The relay handles SIGTERM itself (finishes the tick in flight, exits 0).
ENTRYPOINT ["outbox-relay"]
CMD ["run"]
