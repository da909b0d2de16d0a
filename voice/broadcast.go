package voice

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coder/websocket"
	"github.com/redis/rueidis"

	"voicegate/policy"
	"voicegate/proxy"
)

// TypeNotice is the message a broadcast delivers to each matching session.
const TypeNotice = "notice"

// Broadcast is one message for many sessions: those of TenantID (of every tenant with
// AllTenants) and of UserID ("" any).
type Broadcast struct {
	Message    json.RawMessage `json:"message"`
	TenantID   string          `json:"tenant_id,omitempty"`
	AllTenants bool            `json:"all_tenants,omitempty"`
	UserID     string          `json:"user_id,omitempty"`
	// Instead of a notice: close the session Close (1008, for an admin), or the sessions of the
	// tokens Revoke revokes, in its tenant (4401).
	Close  string             `json:"close,omitempty"`
	Revoke *policy.Revocation `json:"revoke,omitempty"`
	// Reply is the list each instance pushes its count to (set by Registry.Broadcast); none
	// when empty.
	Reply string `json:"reply,omitempty"`
}

// CodeClosedByAdmin is the error a session closed by an admin gets, before close 1008.
const CodeClosedByAdmin = "SESSION_CLOSED"

// Revoke closes, 4401 after an error TOKEN_REVOKED, every live session of a token v revokes
// (of v's tenant only: policy.Revocation.Covers) on every instance (Redis sharded pub/sub; this
// instance's without Redis). It does not wait for the other instances.
func (r *Registry) Revoke(ctx context.Context, v policy.Revocation) error {
	if r.redis == nil {
		r.deliver(Broadcast{Revoke: &v})
		return nil
	}
	msg, _ := json.Marshal(Broadcast{Revoke: &v})
	ctx, cancel := context.WithTimeout(ctx, broadcastWait)
	defer cancel()
	if err := r.redis.Do(ctx, r.redis.B().Spublish().Channel(r.channel()).Message(string(msg)).Build()).Error(); err != nil {
		return fmt.Errorf("voice: revoke: %w", err)
	}
	return nil
}

// CloseSession closes the live session id wherever it runs: the client gets an error
// SESSION_CLOSED and close 1008. It reports whether a session was closed.
func (r *Registry) CloseSession(ctx context.Context, id string) (bool, error) {
	n, err := r.Broadcast(ctx, Broadcast{Close: id, AllTenants: true})
	return n > 0, err
}

type notice struct {
	Type        string          `json:"type"`
	Message     json.RawMessage `json:"message"`
	SessionID   string          `json:"session_id"`
	Timestamp   int64           `json:"timestamp"` // Unix seconds, as every timestamp but audio_chunk's
	TimestampMS int64           `json:"timestamp_ms"`
}

// deliverWait is how long an instance waits for its sessions to take a notice before it
// reports how many did; a notice still being written then arrives all the same, uncounted.
const deliverWait = time.Second

// broadcastWait bounds Registry.Broadcast's wait for the instances' counts.
const broadcastWait = 2 * time.Second

func (r *Registry) channel() string { return r.keys.Key(policy.KindBroadcast) }

// Broadcast delivers b to every matching live session: through Redis sharded pub/sub
// (SPUBLISH, whose answer counts every instance subscribed even on a cluster, where PUBLISH
// counts one node's) to every instance, each answering how many of its sessions took it; or
// to this instance's without Redis. It returns the number of sessions that took the notice.
func (r *Registry) Broadcast(ctx context.Context, b Broadcast) (int, error) {
	if r.redis == nil {
		return r.deliver(b), nil
	}
	ctx, cancel := context.WithTimeout(ctx, broadcastWait)
	defer cancel()
	b.Reply = r.keys.Key(policy.KindBroadcast, rand.Text())
	msg, _ := json.Marshal(b)
	instances, err := r.redis.Do(ctx, r.redis.B().Spublish().Channel(r.channel()).Message(string(msg)).Build()).AsInt64()
	if err != nil {
		return 0, fmt.Errorf("voice: broadcast: %w", err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 250*time.Millisecond)
		defer cancel()
		_ = r.redis.Do(dctx, r.redis.B().Del().Key(b.Reply).Build()).Error()
	}()
	total := 0
	for range instances {
		wait := broadcastWait.Seconds()
		if d, ok := ctx.Deadline(); ok {
			wait = time.Until(d).Seconds()
		}
		if wait <= 0.01 {
			return total, fmt.Errorf("voice: broadcast: not every instance answered in %v", broadcastWait)
		}
		kv, err := r.redis.Do(ctx, r.redis.B().Blpop().Key(b.Reply).Timeout(wait).Build()).AsStrSlice()
		if err != nil {
			return total, fmt.Errorf("voice: broadcast: waiting for the instances' counts: %w", err)
		}
		if len(kv) == 2 {
			n, _ := strconv.Atoi(kv[1])
			total += n
		}
	}
	return total, nil
}

// RunBroadcasts delivers the broadcasts any instance publishes to this instance's sessions
// until ctx ends, resubscribing after connection trouble. It returns once the deliveries under
// way are done. Without Redis it returns at once.
func (r *Registry) RunBroadcasts(ctx context.Context) {
	if r.redis == nil {
		return
	}
	var wg sync.WaitGroup
	defer wg.Wait()
	for ctx.Err() == nil {
		err := r.redis.Receive(ctx, r.redis.B().Ssubscribe().Channel(r.channel()).Build(), func(m rueidis.PubSubMessage) {
			var b Broadcast
			if json.Unmarshal([]byte(m.Message), &b) != nil {
				return
			}
			if b.Reply == "" { // nothing to count: a revocation
				r.deliver(b)
				return
			}
			// Not on the subscription's own goroutine: a delivery waits for sockets.
			wg.Go(func() {
				n := r.deliver(b)
				rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
				defer cancel()
				for _, res := range r.redis.DoMulti(rctx,
					r.redis.B().Rpush().Key(b.Reply).Element(strconv.Itoa(n)).Build(),
					r.redis.B().Pexpire().Key(b.Reply).Milliseconds(10000).Build()) {
					if err := res.Error(); err != nil {
						r.log.Warn("answering a voice broadcast failed", "err", proxy.Describe(err))
						return
					}
				}
			})
		})
		if ctx.Err() != nil {
			return
		}
		r.log.Warn("voice broadcast subscription lost; resubscribing", "err", proxy.Describe(err))
		select {
		case <-ctx.Done():
		case <-time.After(time.Second):
		}
	}
}

// deliver writes b's notice to each matching local session, each from a goroutine of its own
// (bounded by the session's write timeout), and counts those that took it within deliverWait.
func (r *Registry) deliver(b Broadcast) int {
	var n atomic.Int64
	var wg sync.WaitGroup
	for _, s := range r.local() {
		if s.ended.Load() {
			continue
		}
		switch {
		case b.Revoke != nil:
			if i := &s.info; b.Revoke.Covers(i.TenantID, i.UserID, i.TokenID, i.IssuedAt) {
				s.end(ending{code: CloseTokenInvalid, errCode: CodeTokenRevoked, reason: "the token was revoked"})
				n.Add(1)
			}
			continue
		case b.Close != "":
			if s.info.SessionID == b.Close {
				s.end(ending{code: websocket.StatusPolicyViolation, errCode: CodeClosedByAdmin,
					reason: "an administrator closed this session", upCode: websocket.StatusNormalClosure})
				n.Add(1)
			}
			continue
		}
		if !b.AllTenants && s.info.TenantID != b.TenantID || b.UserID != "" && s.info.UserID != b.UserID {
			continue
		}
		if s.tr != nil {
			continue // a dialect (OpenAI's Realtime API) has no notice to say it with
		}
		now := time.Now()
		msg, _ := json.Marshal(notice{Type: TypeNotice, Message: b.Message, SessionID: s.info.SessionID,
			Timestamp: now.Unix(), TimestampMS: now.UnixMilli()})
		wg.Add(1)
		go func() {
			defer wg.Done()
			if failed, err := s.down(websocket.MessageText, msg); err == nil {
				n.Add(1)
			} else {
				s.clientWriteFailed(*failed)
			}
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	t := time.NewTimer(deliverWait)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
	}
	return int(n.Load())
}
