module voicegate

go 1.26

require github.com/lmittmann/tint v1.2.1

require go.uber.org/goleak v1.3.0

require (
	github.com/goccy/go-json v0.10.6 // indirect
	github.com/lestrrat-go/jwx/v2 v2.1.7 // indirect
	github.com/lestrrat-go/option v1.0.1 // indirect
	github.com/redis/rueidis v1.0.79 // indirect
	github.com/segmentio/asm v1.2.1 // indirect
	golang.org/x/sys v0.47.0 // indirect
)
