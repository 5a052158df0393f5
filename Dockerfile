# The orchestrator in a container: built with a pinned Rust toolchain, run as a non-root
# user on a slim Debian. The migrations are compiled into the binary (sqlx::migrate!) and
# applied at start-up, so the runtime image holds nothing but the binary.
#
#   docker build -t orchestrator:2.0.0 .
#   docker run -p 8000:8000 -e JWT_SECRET_KEY=$(openssl rand -hex 32) \
#     -e DATABASE_URL=postgres://user:pass@db:5432/orchestrator orchestrator:2.0.0

FROM rust:1.95.0-slim-bookworm AS build
WORKDIR /build
# No network beyond crates.io: no sqlx query macros reach for a database, Swagger UI's
# assets come from a crate (vendored).
ENV CARGO_TERM_COLOR=never \
    SQLX_OFFLINE=true

# The dependencies first, in their own layer: rebuilt only when Cargo.toml or Cargo.lock
# change, not on every source edit.
# The workspace's other member, the simulator, is not in the image: only its manifest, for
# the workspace to resolve, with empty sources (`-p orchestrator` never builds it).
COPY Cargo.toml Cargo.lock ./
COPY simulator/Cargo.toml simulator/
RUN mkdir -p src benches simulator/src \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs simulator/src/lib.rs \
    && echo 'fn main() {}' > simulator/src/main.rs \
    && echo 'fn main() {}' > benches/load.rs \
    && cargo build --release -p orchestrator \
    && rm -rf src benches

COPY src src
COPY migrations migrations
# The compile-time-checked queries' offline data: the build needs no database.
COPY .sqlx .sqlx
COPY assets assets
COPY benches benches
ARG ORCHESTRATOR_GIT_COMMIT=unknown
ENV ORCHESTRATOR_GIT_COMMIT=${ORCHESTRATOR_GIT_COMMIT}
# The service's release build. The touch makes cargo rebuild our crate over the placeholder.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release -p orchestrator

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 orchestrator \
    && useradd --system --uid 10001 --gid orchestrator --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin orchestrator
COPY --from=build /build/target/release/orchestrator /usr/local/bin/orchestrator
USER 10001:10001
WORKDIR /tmp
# Safe defaults for a deployed image: production requires JWT_SECRET_KEY (32+ bytes).
ENV ENVIRONMENT=production \
    HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000
# `orchestrator healthcheck` GETs http://127.0.0.1:$PORT/health (the image has no curl).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["orchestrator", "healthcheck"]
ENTRYPOINT ["orchestrator"]
CMD ["serve"]
