# Build stage: the daemon links libpcap through cgo.
FROM golang:1.26-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpcap-dev && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=1 go build -trimpath -ldflags='-s -w' -o /packet-headers .

# Run stage: only the libpcap runtime library beside the binary.
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends libpcap0.8 && rm -rf /var/lib/apt/lists/*
COPY --from=build /packet-headers /packet-headers
# Capture needs CAP_NET_RAW (docker run --cap-add NET_RAW, or the pod's
# securityContext); the data directory is a volume the pusher also reads.
VOLUME /var/spool/pcap
EXPOSE 9990
ENTRYPOINT ["/packet-headers", "-datadir=/var/spool/pcap"]
