# Build stage: the daemon links libpcap through cgo.
FROM golang:1.26-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpcap-dev libcap2-bin && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=1 go build -trimpath -ldflags='-s -w' -o /packet-headers . \
 # File capabilities: capture (NET_RAW) and the kernel UUID source's
 # destroy broadcasts (NET_ADMIN), so that the daemon runs as non-root.
 && setcap cap_net_raw,cap_net_admin+ep /packet-headers

# Run stage: only the libpcap runtime library beside the binary.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpcap0.8 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/spool/pcap && chown 65534:65534 /var/spool/pcap
COPY --from=build /packet-headers /packet-headers
USER 65534:65534
VOLUME /var/spool/pcap
EXPOSE 9990
ENTRYPOINT ["/packet-headers", "-datadir=/var/spool/pcap"]
