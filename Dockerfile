# Multi-stage build of the `longshore` binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin longshore

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 longshore
COPY --from=build /src/target/release/longshore /usr/local/bin/longshore
COPY config /app/config
WORKDIR /app
USER longshore
ENV LONGSHORE__LOG__FORMAT=json
ENTRYPOINT ["longshore"]
CMD ["worker"]
