package sse

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/redis/rueidis"

	"voicegate/proxy"
)

// Directory makes running streams known to every instance through Redis, so that a cancel sent
// to any instance reaches the one serving the stream.
//
// Keys (prefix is REDIS_PREFIX, as given): {prefix}stream:{request_id} holds the stream's owner
// while it runs (expiring after TTL as a backstop if an instance dies); cancels travel on the
// channel {prefix}cancel.
type Directory struct {
	client rueidis.Client
	prefix string
	ttl    time.Duration
	log    *slog.Logger
}

// NewDirectory returns a directory on client. ttl bounds how long an entry outlives an instance
// that died without removing it; zero means 15 minutes.
func NewDirectory(client rueidis.Client, prefix string, ttl time.Duration, log *slog.Logger) *Directory {
	if ttl <= 0 {
		ttl = 15 * time.Minute
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Directory{client: client, prefix: prefix, ttl: ttl, log: log}
}

type entry struct {
	UserID   string `json:"user_id"`
	TenantID string `json:"tenant_id,omitempty"`
}

func (d *Directory) key(id string) string { return d.prefix + "stream:" + id }
func (d *Directory) channel() string      { return d.prefix + "cancel" }

// announce records s; the returned function removes it.
func (d *Directory) announce(s *Stream) func() {
	b, _ := json.Marshal(entry{UserID: s.UserID, TenantID: s.TenantID})
	ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
	defer cancel()
	if err := d.client.Do(ctx, d.client.B().Set().Key(d.key(s.RequestID)).Value(string(b)).Px(d.ttl).Build()).Error(); err != nil {
		// The stream still works and can be cancelled on this instance.
		d.log.Warn("announcing a stream to other instances failed", "err", proxy.Describe(err))
	}
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 250*time.Millisecond)
		defer cancel()
		d.client.Do(ctx, d.client.B().Del().Key(d.key(s.RequestID)).Build())
	}
}

// Cancel cancels a stream running on another instance: ErrStreamNotFound when none runs it,
// ErrNotOwner when allowed refuses its owner.
func (d *Directory) Cancel(ctx context.Context, requestID string, allowed func(userID, tenantID string) bool) error {
	b, err := d.client.Do(ctx, d.client.B().Get().Key(d.key(requestID)).Build()).AsBytes()
	if rueidis.IsRedisNil(err) {
		return ErrStreamNotFound
	}
	if err != nil {
		return fmt.Errorf("sse: look up stream: %w", err)
	}
	var e entry
	if err := json.Unmarshal(b, &e); err != nil {
		return fmt.Errorf("sse: stream entry: %w", err)
	}
	if allowed != nil && !allowed(e.UserID, e.TenantID) {
		return ErrNotOwner
	}
	if err := d.client.Do(ctx, d.client.B().Publish().Channel(d.channel()).Message(requestID).Build()).Error(); err != nil {
		return fmt.Errorf("sse: publish cancel: %w", err)
	}
	return nil
}

// Run delivers cancels published by any instance to reg until ctx ends, resubscribing after
// connection trouble.
func (d *Directory) Run(ctx context.Context, reg *Registry) {
	for ctx.Err() == nil {
		err := d.client.Receive(ctx, d.client.B().Subscribe().Channel(d.channel()).Build(), func(m rueidis.PubSubMessage) {
			_ = reg.Cancel(m.Message, nil) // permission was checked where the cancel came in
		})
		if ctx.Err() != nil {
			return
		}
		d.log.Warn("stream cancel subscription lost; resubscribing", "err", proxy.Describe(err))
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
