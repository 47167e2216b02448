# pgrs image: the `pgrs` binary (operator, agent, local mode) on Debian 12 with the PostgreSQL
# server binaries of one major, which the agent supervises (docs/postgres-versions.md).
#
#   docker build -t ghcr.io/pgrs-dev/pgrs:dev .                                  # PostgreSQL 15
#   docker build --build-arg PG_MAJOR=17 -t ghcr.io/pgrs-dev/pgrs:dev-pg17 .     # 14 to 18
#
# The tag convention `<tag>-pg<major>` is the operator's default image for a PgReplicaSet of
# that `spec.postgresVersion` (or set `postgresImages` in the chart, or `spec.image`).
#
# PG_MAJOR 15 comes from Debian bookworm's own repository. The others (14, 16, 17, 18) are not
# in it: for them the build adds the PostgreSQL project's own apt repository (PGDG,
# bookworm-pgdg, with its signing key, through postgresql-common's setup script), whose
# `postgresql-<major>` installs into the same /usr/lib/postgresql/<major>/bin. PGDG=1 takes 15
# from there too (a newer minor release). Only this build reaches PGDG; the test suite builds
# the image for 15 only (tests/image_run.rs; the other tests use Debian's 15 and
# scripts/install-pg-majors).
#
# PGRS_BINARY picks where /usr/local/bin/pgrs comes from: `build` (the default) compiles it in
# the `rust:1-bookworm` stage below; `prebuilt` copies a binary already built on the host from
# `target/image/pgrs` in the build context (the only file of target/ that .dockerignore lets
# in), which must be linked for Debian 12 (built on Debian 12 or older glibc):
#
#   cp target/release/pgrs target/image/pgrs
#   docker build --build-arg PGRS_BINARY=prebuilt -t ghcr.io/pgrs-dev/pgrs:dev .
#
# scripts/build-image does that with podman (docs/testing.md, "The image"). Builders that skip
# unused stages (BuildKit, buildah/podman) then need no `rust` image and compile nothing.
ARG PG_MAJOR=15
ARG PGRS_BINARY=build

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin pgrs

FROM scratch AS prebuilt
COPY target/image/pgrs /src/target/release/pgrs

FROM ${PGRS_BINARY} AS binary

FROM debian:bookworm-slim
ARG PG_MAJOR
ARG PGDG=0
# A fixed uid/gid 999 for `postgres` (created before the package would pick one), so the pod's
# securityContext (runAsUser/fsGroup 999) matches the owner of the data directory.
RUN groupadd --system --gid 999 postgres \
 && useradd --system --uid 999 --gid postgres --home-dir /var/lib/postgresql --shell /bin/bash postgres \
 && apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && if [ "$PGDG" = 1 ] || [ "$PG_MAJOR" != 15 ]; then \
      apt-get install -y --no-install-recommends postgresql-common \
      && /usr/share/postgresql-common/pgdg/apt.postgresql.org.sh -y; \
    fi \
 && apt-get install -y --no-install-recommends "postgresql-${PG_MAJOR}" \
 && rm -rf /var/lib/apt/lists/*
COPY --from=binary /src/target/release/pgrs /usr/local/bin/pgrs
# The agent runs postgres itself; postgres refuses root, so the whole pod runs as `postgres`.
USER postgres
# The agent's default --pg-bin is /usr/lib/postgresql/<--postgres-version>/bin (the operator
# passes spec.postgresVersion); PGRS_PG_BIN pins this image's for `pgrs local` and manual runs.
ENV PATH=/usr/lib/postgresql/${PG_MAJOR}/bin:$PATH \
    PGRS_PG_BIN=/usr/lib/postgresql/${PG_MAJOR}/bin
ENTRYPOINT ["/usr/local/bin/pgrs"]
