# Build stage: the daemon links libpcap and ISA-L (gzip) through cgo.
FROM golang:1.26-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends libpcap-dev libisal-dev libcap2-bin && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=devel
ARG COMMIT=unknown
RUN CGO_ENABLED=1 go build -trimpath -ldflags="-s -w -X main.version=${VERSION} -X main.commit=${COMMIT}" -o /packet-headers . \
 # Permitted file capabilities only (no effective bit): capture (NET_RAW)
 # and the kernel UUID source's destroy broadcasts (NET_ADMIN). The kernel
 # runs the binary with whichever of them the container allows, and the
 # binary makes those effective itself (caps.go); with an effective bit,
 # exec would fail wherever NET_ADMIN is not granted (Docker's default set,
 # M-Lab's NET_RAW alone). TestImageCapabilities reads this line.
 && setcap cap_net_raw,cap_net_admin+p /packet-headers

# Run stage: only the libpcap and ISA-L runtime libraries beside the binary.
FROM debian:bookworm-slim
# The volume holds the data directory and, beside it on the same
# filesystem, the partial directory where files are written before they
# are renamed into it: a volume mounted on the data directory itself would
# put them on two filesystems.
RUN apt-get update && apt-get install -y --no-install-recommends libpcap0.8 libisal2 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/spool/packet-headers/pcap /var/spool/packet-headers/.pcap.partial \
 && chown -R 65534:65534 /var/spool/packet-headers && chmod -R 0750 /var/spool/packet-headers
COPY --from=build /packet-headers /packet-headers
USER 65534:65534
VOLUME /var/spool/packet-headers
EXPOSE 9990
ENTRYPOINT ["/packet-headers", "-datadir=/var/spool/packet-headers/pcap"]
