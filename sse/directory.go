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
// to any instance reaches the one serving the stream, and a revocation reaches every stream of
// the token, wherever it runs.
//
// A stream's entry is keyed by its identity (StreamKey: tenant, user, request ID): a request ID
// belongs to its user, and another user's stream of the same ID is another entry. The entry is
// claimed with the stream's admission (policy.Claim), in the same round trip as its rate limit
// and concurrency slot, only if no stream of that key runs and, with resuming on, no replay log
// of that key is kept (a repeat is served from it); it is renewed with the slot and deleted with
// it. It names the instance running the stream, and a cancel goes to that instance's own
// channel: when nobody listens there (the instance died), the entry is stale, is deleted, and
// the cancel answers that no such stream runs.
//
// Who writes: the admission script (claim), the renewer (renewal), the stream's release
// (delete), and Cancel (deletes a stale entry). Who reads: Cancel, one GET per cancel bounded by
// the caller's context. Run is one goroutine per instance holding one subscription.
//
// Keys (prefix is REDIS_PREFIX, as given): {prefix}stream:{tenant}:{user}:{request_id} holds the
// stream's owner and instance while it runs, with the tenant as the Redis Cluster hash tag
// (policy.Tag) like the admission's other keys. Messages travel by sharded pub/sub: cancels on
// {prefix}{control}:{instance}, revocations on {prefix}{control} (one hash tag: one SSUBSCRIBE
// takes both, on a cluster too). The instance is the process's own identity, never a name two
// processes may share: a cancel for a dead instance's stream must find nobody listening.
type Directory struct {
	client   rueidis.Client
	keys     policy.Keys
	instance string
	log      *slog.Logger
}

// NewDirectory returns a directory on client for the instance whose identity is instance,
// unique to this process.
func NewDirectory(client rueidis.Client, prefix, instance string, log *slog.Logger) *Directory {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Directory{client: client, keys: policy.NewKeys(prefix), instance: instance, log: log}
}

type entry struct {
	UserID   string `json:"user_id"`
	TenantID string `json:"tenant_id,omitempty"`
	Instance string `json:"instance"`
	// Nonce makes each stream's entry its own, so that a stream deletes only the entry it took.
	Nonce string `json:"nonce"`
}

// control is a message between instances.
type control struct {
	Op string `json:"op"` // "cancel" or "revoke"
	// For a cancel: the stream's identity (its owner's tenant and user, its request ID). Who
	// may cancel it was decided where the cancel was asked.
	TenantID  string `json:"tenant_id,omitempty"`
	RequestID string `json:"request_id,omitempty"`
	// For a cancel, the stream's owner; for a revocation, the user whose tokens issued before
	// Before go, or none.
	UserID string `json:"user_id,omitempty"`
	// For a revocation (with TenantID and UserID): the token, or the user whose tokens issued
	// before Before (a unix second) go.
	TokenID string `json:"token_id,omitempty"`
	Before  int64  `json:"before,omitempty"`
}

func (d *Directory) key(k StreamKey) string {
	return d.keys.Tenant(policy.KindStream, k.Tenant, k.User, k.RequestID)
}
func (d *Directory) channel(instance string) string { return d.keys.Key(policy.KindControl, instance) }
func (d *Directory) everyone() string               { return d.keys.Key(policy.KindControl) }

// claim is the directory entry of stream k, for its admission to take, only while the key
// absent (the stream's replay log; "" none) does not exist; nil without a directory.
func (d *Directory) claim(k StreamKey, absent string) *policy.Claim {
	if d == nil {
		return nil
	}
	b, _ := json.Marshal(entry{UserID: k.User, TenantID: k.Tenant, Instance: d.instance, Nonce: rand.Text()})
	return &policy.Claim{Key: d.key(k), Value: string(b), Absent: absent,
		Conflict: "a stream with this request_id is already running"}
}

// Cancel cancels stream k running on another instance: ErrStreamNotFound when none runs it.
// Whether the caller may was decided before (k names the owner).
func (d *Directory) Cancel(ctx context.Context, k StreamKey) error {
	key := d.key(k)
	raw, err := d.client.Do(ctx, d.client.B().Get().Key(key).Build()).ToString()
	if rueidis.IsRedisNil(err) {
		return ErrStreamNotFound
	}
	if err != nil {
		return fmt.Errorf("sse: look up stream: %w", err)
	}
	var e entry
	if err := json.Unmarshal([]byte(raw), &e); err != nil {
		return fmt.Errorf("sse: stream entry: %w", err)
	}
	msg, _ := json.Marshal(control{Op: "cancel", TenantID: k.Tenant, UserID: k.User, RequestID: k.RequestID})
	n, err := d.client.Do(ctx, d.client.B().Spublish().Channel(d.channel(e.Instance)).Message(string(msg)).Build()).AsInt64()
	if err != nil {
		return fmt.Errorf("sse: publish cancel: %w", err)
	}
	if n == 0 {
		// Nobody listens for that instance: it is gone, and so is its stream.
		_ = d.client.Do(ctx, d.client.B().Eval().Script(`if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0`).
			Numkeys(1).Key(key).Arg(raw).Build()).Error()
		return ErrStreamNotFound
	}
	return nil
}

// Revoke tells every instance to end the streams of the tokens v revokes, in v's tenant.
func (d *Directory) Revoke(ctx context.Context, v policy.Revocation) error {
	msg, _ := json.Marshal(control{Op: "revoke", TenantID: v.TenantID, TokenID: v.TokenID, UserID: v.UserID, Before: v.Before})
	if err := d.client.Do(ctx, d.client.B().Spublish().Channel(d.everyone()).Message(string(msg)).Build()).Error(); err != nil {
		return fmt.Errorf("sse: publish revocation: %w", err)
	}
	return nil
}

// Run delivers the cancels for this instance's streams and every instance's revocations to
// reg until ctx ends, resubscribing after connection trouble.
func (d *Directory) Run(ctx context.Context, reg *Registry) {
	for ctx.Err() == nil {
		err := d.client.Receive(ctx, d.client.B().Ssubscribe().Channel(d.channel(d.instance), d.everyone()).Build(), func(m rueidis.PubSubMessage) {
			var c control
			if json.Unmarshal([]byte(m.Message), &c) != nil {
				return
			}
			switch c.Op {
			case "cancel":
				_ = reg.Cancel(StreamKey{Tenant: c.TenantID, User: c.UserID, RequestID: c.RequestID})
			case "revoke":
				reg.Revoke(policy.Revocation{TenantID: c.TenantID, TokenID: c.TokenID, UserID: c.UserID, Before: c.Before})
			}
		})
		if ctx.Err() != nil {
			return
		}
		d.log.Warn("stream control subscription lost; resubscribing", "err", proxy.Describe(err))
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}
