# pgrs image: the `pgrs` binary (operator, agent, local mode) on Debian 12 with the PostgreSQL 15
# server binaries the agent supervises. Build: docker build -t ghcr.io/pgrs-dev/pgrs:dev .
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pgrs

FROM debian:bookworm-slim
# A fixed uid/gid 999 for `postgres` (created before the package would pick one), so the pod's
# securityContext (runAsUser/fsGroup 999) matches the owner of the data directory.
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres \
 && apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/pgrs /usr/local/bin/pgrs
# The agent runs postgres itself; postgres refuses root, so the whole pod runs as `postgres`.
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
ENTRYPOINT ["/usr/local/bin/pgrs"]
