package auth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"sync"
	"time"

	"voicegate/policy"
	"voicegate/proxy"

	"github.com/redis/rueidis"
)

// ErrUserDisabled means the user service says the user is not active.
var ErrUserDisabled = errors.New("user not active")

// UserStatusOptions configures a UserStatus.
type UserStatusOptions struct {
	// URL is the user service; the status of a user is GET {URL}/users/{id} →
	// {"status": "active" | ...}.
	URL *url.URL
	// Client calls it; nil means a client with a 2 s timeout.
	Client *http.Client
	// OnResult, if set, is told the outcome of every request to the user service and how long
	// it took to answer or fail (metrics). Outcomes are proxy.Outcome's, except that any status
	// but 200 and 404 is "error_status": the gateway itself reads this answer, and any other
	// means the status could not be learned.
	OnResult func(outcome string, took time.Duration)
	// Redis, if set, is the second cache level shared by instances.
	Redis rueidis.Client
	// Prefix for Redis keys (REDIS_PREFIX), as given.
	Prefix string
	// MemoryTTL and RedisTTL bound how long a status is cached; zero means 30 s and 60 s.
	// With Redis, RedisTTL bounds the whole: no instance serves an answer longer than RedisTTL
	// after the service gave it (see UserStatus).
	MemoryTTL, RedisTTL time.Duration
	// MaxEntries bounds the memory cache; zero means 10000.
	MaxEntries int
	// Now is the clock of the memory cache; nil means time.Now. Redis keeps its own.
	Now func() time.Time
}

// UserStatus asks the user service whether a user is active, with a short memory cache in front
// of a shared Redis cache in front of the service, as the origin design's multi-level cache.
//
// The levels do not add up: an answer read from Redis is kept in memory only for what is left
// of its life there (PTTL, read with it), so a status is never served longer than RedisTTL after
// the service gave it, whichever instance asked and whichever read Redis when. (Kept for a
// whole MemoryTTL, a copy read just before its Redis expiry would live MemoryTTL more.)
type UserStatus struct {
	o   UserStatusOptions
	mu  sync.Mutex
	mem map[string]statusEntry
}

type statusEntry struct {
	status  string
	expires time.Time
}

// NewUserStatus returns a UserStatus.
func NewUserStatus(o UserStatusOptions) *UserStatus {
	if o.Client == nil {
		o.Client = &http.Client{Timeout: 2 * time.Second}
	}
	if o.MemoryTTL <= 0 {
		o.MemoryTTL = 30 * time.Second
	}
	if o.RedisTTL <= 0 {
		o.RedisTTL = 60 * time.Second
	}
	if o.MaxEntries <= 0 {
		o.MaxEntries = 10000
	}
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.Redis != nil {
		o.MemoryTTL = min(o.MemoryTTL, o.RedisTTL)
	}
	return &UserStatus{o: o, mem: map[string]statusEntry{}}
}

// Check returns nil for an active user, ErrUserDisabled for any other status, and another error
// when the status cannot be learned.
func (u *UserStatus) Check(ctx context.Context, userID string) error {
	status, err := u.status(ctx, userID)
	if err != nil {
		return err
	}
	if status != "active" {
		return ErrUserDisabled
	}
	return nil
}

func (u *UserStatus) status(ctx context.Context, userID string) (string, error) {
	now := u.o.Now()
	u.mu.Lock()
	e, ok := u.mem[userID]
	u.mu.Unlock()
	if ok && now.Before(e.expires) {
		return e.status, nil
	}
	key := policy.NewKeys(u.o.Prefix).Key(policy.KindUserStatus, userID)
	if u.o.Redis != nil {
		res := u.o.Redis.DoMulti(ctx, u.o.Redis.B().Get().Key(key).Build(), u.o.Redis.B().Pttl().Key(key).Build())
		s, err := res[0].ToString()
		left, perr := res[1].AsInt64()
		if err == nil && perr == nil && left > 0 {
			u.remember(userID, s, now, time.Duration(left)*time.Millisecond)
			return s, nil
		}
		// A Redis miss or failure falls through to the service itself.
	}
	s, err := u.fetch(ctx, userID)
	if err != nil {
		return "", err
	}
	u.remember(userID, s, now, u.o.MemoryTTL)
	if u.o.Redis != nil {
		// Its life counts from before the service was asked, as the memory copy's does.
		if ttl := u.o.RedisTTL - u.o.Now().Sub(now); ttl > 0 {
			_ = u.o.Redis.Do(ctx, u.o.Redis.B().Set().Key(key).Value(s).Px(max(ttl, time.Millisecond)).Build()).Error()
		}
	}
	return s, nil
}

// remember keeps status in memory for at most MemoryTTL, and at most left.
func (u *UserStatus) remember(userID, status string, now time.Time, left time.Duration) {
	u.mu.Lock()
	defer u.mu.Unlock()
	if len(u.mem) >= u.o.MaxEntries {
		for k, e := range u.mem {
			if !now.Before(e.expires) || len(u.mem) >= u.o.MaxEntries {
				delete(u.mem, k)
			}
		}
	}
	u.mem[userID] = statusEntry{status: status, expires: now.Add(min(u.o.MemoryTTL, left))}
}

func (u *UserStatus) fetch(ctx context.Context, userID string) (string, error) {
	// One escaped path segment: a user ID like "../x" must not walk the service's paths.
	target := u.o.URL.JoinPath("users").String() + "/" + url.PathEscape(userID)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, target, nil)
	if err != nil {
		return "", fmt.Errorf("auth: user status request: %w", err)
	}
	req.Header.Set("Accept", "application/json")
	start := time.Now()
	res, err := u.o.Client.Do(req)
	if u.o.OnResult != nil {
		outcome := proxy.Outcome(ctx, res, err)
		if outcome == "ok" && res.StatusCode != http.StatusOK && res.StatusCode != http.StatusNotFound {
			outcome = "error_status"
		}
		u.o.OnResult(outcome, time.Since(start))
	}
	if err != nil {
		return "", fmt.Errorf("auth: user status: %w", err)
	}
	defer res.Body.Close()
	if res.StatusCode == http.StatusNotFound {
		return "unknown", nil
	}
	if res.StatusCode != http.StatusOK {
		return "", fmt.Errorf("auth: user status: status %d", res.StatusCode)
	}
	var body struct {
		Status string `json:"status"`
	}
	if err := json.NewDecoder(io.LimitReader(res.Body, 64<<10)).Decode(&body); err != nil || body.Status == "" {
		return "", errors.New("auth: user status: malformed answer")
	}
	return body.Status, nil
}
