# Build a static binary, then ship it alone in a minimal image as a non-root user.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -ldflags="-s -w" -o /out/voicegate .

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /out/voicegate /voicegate
USER nonroot:nonroot
EXPOSE 8080
# The image has no shell or curl: the binary probes its own /healthz.
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 CMD ["/voicegate", "-healthcheck"]
# SHUTDOWN_GRACE (25 s) plus a margin: give the container runtime's stop timeout at least 30 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/voicegate"]
