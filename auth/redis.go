package auth

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"voicegate/policy"

	"github.com/redis/rueidis"
)

// RedisRevocations keeps revocations in Redis, shared by every instance. Lookups go through
// rueidis client-side caching: a hot check is answered from this process's memory without a
// round trip, and Redis's invalidation messages drop the local copy the moment any instance
// revokes, so a revocation reaches every instance at once.
//
// Keys (Prefix is REDIS_PREFIX, as given):
//
//	{prefix}revoked:jti:{jti}       "1", expiring with the token
//	{prefix}revoked:user:{user_id}  unix ms; tokens issued before it are revoked; kept MaxLifetime
type RedisRevocations struct {
	client      rueidis.Client
	keys        policy.Keys
	maxLifetime time.Duration
	cacheTTL    time.Duration
	replicas    int64
}

// RedisRevocationsOptions configures RedisRevocations.
type RedisRevocationsOptions struct {
	Prefix      string        // key prefix (REDIS_PREFIX), as given
	MaxLifetime time.Duration // the longest a token lives; zero means 24h
	// CacheTTL bounds how long a lookup is served from local memory; invalidations usually drop
	// it much sooner. Zero means 10 minutes.
	CacheTTL time.Duration
	// Replicas is how many replicas must have a revocation before it is acknowledged: each
	// write is followed by WAIT on the same connection, bounded by the call's deadline, and
	// fewer acknowledgements make it an error. So a revocation answered 200 survives the loss
	// of the master that took it (Redis Cluster promotes a replica that has it). Zero: no WAIT,
	// for a single Redis without replicas.
	Replicas int
}

// NewRedisRevocations returns a store on client.
func NewRedisRevocations(client rueidis.Client, o RedisRevocationsOptions) *RedisRevocations {
	if o.MaxLifetime <= 0 {
		o.MaxLifetime = 24 * time.Hour
	}
	if o.CacheTTL <= 0 {
		o.CacheTTL = 10 * time.Minute
	}
	return &RedisRevocations{client: client, keys: policy.NewKeys(o.Prefix), maxLifetime: o.MaxLifetime, cacheTTL: o.CacheTTL,
		replicas: int64(max(o.Replicas, 0))}
}

func (s *RedisRevocations) jtiKey(jti string) string {
	return s.keys.Key(policy.KindRevoked, "jti", jti)
}
func (s *RedisRevocations) userKey(user string) string {
	return s.keys.Key(policy.KindRevoked, "user", user)
}

// Revoked implements Revocations with one cached multi-get.
func (s *RedisRevocations) Revoked(ctx context.Context, id *Identity) (bool, error) {
	b := s.client.B()
	res := s.client.DoMultiCache(ctx,
		rueidis.CT(b.Get().Key(s.jtiKey(id.TokenID)).Cache(), s.cacheTTL),
		rueidis.CT(b.Get().Key(s.userKey(id.UserID)).Cache(), s.cacheTTL))
	if err := res[0].Error(); err == nil {
		return true, nil
	} else if !rueidis.IsRedisNil(err) {
		return false, fmt.Errorf("auth: revocation lookup: %w", err)
	}
	before, err := res[1].AsInt64()
	if rueidis.IsRedisNil(err) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("auth: revocation lookup: %w", err)
	}
	return revokedBefore(id.IssuedAt, time.UnixMilli(before)), nil
}

// RevokeToken implements Revocations.
func (s *RedisRevocations) RevokeToken(ctx context.Context, jti string, until time.Time) error {
	ttl := time.Until(until)
	if ttl <= 0 {
		return nil // already expired: nothing to refuse
	}
	err := retryOnce(ctx, func() error {
		return s.write(ctx, s.client.B().Set().Key(s.jtiKey(jti)).Value("1").Px(max(ttl, time.Millisecond)).Build())
	})
	if err != nil {
		return fmt.Errorf("auth: revoke token: %w", err)
	}
	return nil
}

// raiseUserRevocation moves a user's revocation time forward only, atomically, so concurrent
// revocations from several instances keep the latest.
const raiseUserRevocation = `
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
end
return 1`

// RevokeUser implements Revocations.
func (s *RedisRevocations) RevokeUser(ctx context.Context, userID string, before time.Time) error {
	// EVAL rather than EVALSHA: revocations are rare, and a script sent whole needs no
	// NOSCRIPT round trip in the middle of the write and its WAIT.
	err := retryOnce(ctx, func() error {
		return s.write(ctx, s.client.B().Eval().Script(raiseUserRevocation).Numkeys(1).Key(s.userKey(userID)).
			Arg(strconv.FormatInt(before.UnixMilli(), 10), strconv.FormatInt(s.maxLifetime.Milliseconds(), 10)).Build())
	})
	if err != nil {
		return fmt.Errorf("auth: revoke user: %w", err)
	}
	return nil
}

// ErrNotReplicated is the error of a revocation that the master took but no replica
// confirmed within the call's budget: it may be lost with the master, so it is not
// acknowledged. Sending it again is safe.
var ErrNotReplicated = errors.New("not confirmed by a replica in time")

// write sends cmd and, with Replicas, a WAIT behind it on the same connection (rueidis sends
// a pipeline with a blocking command on one dedicated connection, and on a cluster to the node
// of cmd's key), whose timeout leaves a quarter of the remaining budget for the answer to
// arrive: WAIT 0 would wait for ever.
func (s *RedisRevocations) write(ctx context.Context, cmd rueidis.Completed) error {
	if s.replicas == 0 {
		return s.client.Do(ctx, cmd).Error()
	}
	wait := 100 * time.Millisecond
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl) * 3 / 4
	}
	res := s.client.DoMulti(ctx, cmd,
		s.client.B().Wait().Numreplicas(s.replicas).Timeout(max(wait.Milliseconds(), 1)).Build())
	if err := res[0].Error(); err != nil {
		return err
	}
	n, err := res[1].AsInt64()
	if err != nil {
		return err
	}
	if n < s.replicas {
		return fmt.Errorf("%w (%d of %d replicas within %v)", ErrNotReplicated, n, s.replicas, wait.Round(time.Millisecond))
	}
	return nil
}

// retryOnce runs an idempotent write again after a connection error: right after Redis comes
// back, the first write on a stale connection can fail although the next one succeeds. rueidis
// retries reads by itself, not writes.
func retryOnce(ctx context.Context, write func() error) error {
	err := write()
	var re *rueidis.RedisError
	if err == nil || errors.As(err, &re) || errors.Is(err, ErrNotReplicated) || ctx.Err() != nil {
		return err // nil, or an answer from Redis itself, or out of time
	}
	return write()
}
