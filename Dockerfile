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
ENTRYPOINT ["/voicegate"]
