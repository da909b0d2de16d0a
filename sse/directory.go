package sse

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"log/slog"
	"time"

	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
)

// Directory makes running streams known to every instance through Redis, so that a cancel sent
// to any instance reaches the one serving the stream.
//
// A stream's entry is claimed with its admission (policy.Claim), in the same round trip as its
// rate limit and concurrency slot, only if no stream of its tenant holds that request ID; it is
// renewed with the slot and deleted with it, so it outlives an instance that died by at most
// the lease TTL. A chat route left without a policy (AUTH_PUBLIC_PATHS) has no admission, and
// its streams can be cancelled only on their own instance.
//
// Keys (prefix is REDIS_PREFIX, as given): {prefix}stream:{tenant}:{request_id} holds the
// stream's owner while it runs, with the tenant as the Redis Cluster hash tag (policy.Tag) like
// the admission's other keys; cancels travel on the channel {prefix}cancel.
type Directory struct {
	client rueidis.Client
	prefix string
	log    *slog.Logger
}

// NewDirectory returns a directory on client.
func NewDirectory(client rueidis.Client, prefix string, log *slog.Logger) *Directory {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Directory{client: client, prefix: prefix, log: log}
}

type entry struct {
	UserID   string `json:"user_id"`
	TenantID string `json:"tenant_id,omitempty"`
	// Nonce makes each stream's entry its own, so that a stream deletes only the entry it took.
	Nonce string `json:"nonce"`
}

func (d *Directory) key(tenantID, requestID string) string {
	return d.prefix + "stream:" + policy.Tag(tenantID) + ":" + requestID
}
func (d *Directory) channel() string { return d.prefix + "cancel" }

// claim is the directory entry of a stream, for its admission to take; nil without a directory.
func (d *Directory) claim(requestID, userID, tenantID string) *policy.Claim {
	if d == nil {
		return nil
	}
	b, _ := json.Marshal(entry{UserID: userID, TenantID: tenantID, Nonce: rand.Text()})
	return &policy.Claim{Key: d.key(tenantID, requestID), Value: string(b),
		Conflict: "a stream with this request_id is already running"}
}

// Cancel cancels a stream of tenantID running on another instance: ErrStreamNotFound when none
// runs it, ErrNotOwner when allowed refuses its owner.
func (d *Directory) Cancel(ctx context.Context, tenantID, requestID string, allowed func(userID, tenantID string) bool) error {
	b, err := d.client.Do(ctx, d.client.B().Get().Key(d.key(tenantID, requestID)).Build()).AsBytes()
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
