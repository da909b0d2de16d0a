# Build a static binary, then ship it alone in a minimal image as a non-root user.
# Base images are fully qualified: Docker reads a short name such as golang:1.26 as Docker Hub's,
# but podman refuses one unless a registry search list says where to look.
FROM docker.io/library/golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/voicegate . && mkdir -p /out/run/voicegate

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/voicegate /voicegate
# The gateway records the address it listens on here, so that -healthcheck probes the right
# port whatever LISTEN_ADDR or -listen-addr the container was started with.
COPY --from=build --chown=65532:65532 /out/run/voicegate /run/voicegate
ENV LISTEN_ADDR_FILE=/run/voicegate/addr
USER nonroot:nonroot
EXPOSE 8080
# The image has no shell or curl: the binary probes its own /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/voicegate", "-healthcheck"]
# On SIGTERM open streams get SHUTDOWN_GRACE (25 s) to finish. Docker's default stop timeout is
# 10 s, after which it kills the process: run with a longer one, above SHUTDOWN_GRACE:
#   docker run --stop-timeout 35 ...      (compose: stop_grace_period: 35s)
STOPSIGNAL SIGTERM
ENTRYPOINT ["/voicegate"]
