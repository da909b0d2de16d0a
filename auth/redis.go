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
// Keys (Prefix is REDIS_PREFIX, as given), under the tenant's hash tag (policy.Tag): a
// revocation belongs to its tenant, and a lookup's two keys share the tenant's slot on Redis
// Cluster, so the lookup stays one multi-get.
//
//	{prefix}revoked:{tenant}:jti:{jti}       "1", expiring with the token
//	{prefix}revoked:{tenant}:user:{user_id}  unix seconds (Redis's clock); tokens issued before it are revoked; kept MaxLifetime
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

func (s *RedisRevocations) jtiKey(tenant, jti string) string {
	return s.keys.Tenant(policy.KindRevoked, tenant, "jti", jti)
}
func (s *RedisRevocations) userKey(tenant, user string) string {
	return s.keys.Tenant(policy.KindRevoked, tenant, "user", user)
}

// Revoked implements Revocations with one cached multi-get.
func (s *RedisRevocations) Revoked(ctx context.Context, id *Identity) (bool, error) {
	b := s.client.B()
	res := s.client.DoMultiCache(ctx,
		rueidis.CT(b.Get().Key(s.jtiKey(id.TenantID, id.TokenID)).Cache(), s.cacheTTL),
		rueidis.CT(b.Get().Key(s.userKey(id.TenantID, id.UserID)).Cache(), s.cacheTTL))
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
	return policy.IssuedBefore(id.IssuedAt, before), nil
}

// RevokeToken implements Revocations. The entry expires at until on Redis's clock (PXAT), so
// how long it lasts does not depend on this instance's clock.
func (s *RedisRevocations) RevokeToken(ctx context.Context, tenant, jti string, until time.Time) error {
	if until.UnixMilli() <= 0 {
		return nil // nothing to refuse, and PXAT takes a positive time only
	}
	err := retryOnce(ctx, func() error {
		_, err := s.write(ctx, s.client.B().Set().Key(s.jtiKey(tenant, jti)).Value("1").
			PxatMillisecondsTimestamp(until.UnixMilli()).Build())
		return err
	})
	if err != nil {
		return fmt.Errorf("auth: revoke token: %w", err)
	}
	return nil
}

// raiseUserRevocation sets a user's cutoff from Redis's clock — the second after its TIME, as
// policy.RevocationCutoff says — moving it forward only, atomically, so concurrent revocations
// from several instances keep the latest. It returns the cutoff and the TIME it was taken at
// (seconds, microseconds).
const raiseUserRevocation = `
local t = redis.call('TIME')
local cutoff = tonumber(t[1]) + 1
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if cur < cutoff then
  redis.call('SET', KEYS[1], cutoff, 'PX', ARGV[1])
end
return {cutoff, tonumber(t[1]), tonumber(t[2])}`

// RevokeUser implements Revocations on Redis's clock: instances whose clocks differ still
// agree on which tokens a revocation reaches.
func (s *RedisRevocations) RevokeUser(ctx context.Context, tenant, userID string) (Cutoff, error) {
	var c Cutoff
	// EVAL rather than EVALSHA: revocations are rare, and a script sent whole needs no
	// NOSCRIPT round trip in the middle of the write and its WAIT.
	err := retryOnce(ctx, func() error {
		res, err := s.write(ctx, s.client.B().Eval().Script(raiseUserRevocation).Numkeys(1).Key(s.userKey(tenant, userID)).
			Arg(strconv.FormatInt(s.maxLifetime.Milliseconds(), 10)).Build())
		if err != nil {
			return err
		}
		v, err := res.AsIntSlice()
		if err != nil || len(v) != 3 {
			return fmt.Errorf("unexpected answer %v: %v", v, err)
		}
		before, now := time.Unix(v[0], 0), time.Unix(v[1], v[2]*int64(time.Microsecond))
		c = Cutoff{Before: before, Left: before.Sub(now)}
		return nil
	})
	if err != nil {
		return Cutoff{}, fmt.Errorf("auth: revoke user: %w", err)
	}
	return c, nil
}

// ErrNotReplicated is the error of a revocation that the master took but no replica
// confirmed within the call's budget: it may be lost with the master, so it is not
// acknowledged. Sending it again is safe.
var ErrNotReplicated = errors.New("not confirmed by a replica in time")

// write sends cmd and returns its answer; with Replicas, a WAIT behind it on the same
// connection (rueidis sends a pipeline with a blocking command on one dedicated connection, and
// on a cluster to the node of cmd's key), whose timeout leaves a quarter of the remaining
// budget for the answer to arrive: WAIT 0 would wait for ever.
func (s *RedisRevocations) write(ctx context.Context, cmd rueidis.Completed) (rueidis.RedisResult, error) {
	if s.replicas == 0 {
		res := s.client.Do(ctx, cmd)
		return res, res.Error()
	}
	wait := 100 * time.Millisecond
	if dl, ok := ctx.Deadline(); ok {
		wait = time.Until(dl) * 3 / 4
	}
	res := s.client.DoMulti(ctx, cmd,
		s.client.B().Wait().Numreplicas(s.replicas).Timeout(max(wait.Milliseconds(), 1)).Build())
	if err := res[0].Error(); err != nil {
		return res[0], err
	}
	n, err := res[1].AsInt64()
	if err != nil {
		return res[0], err
	}
	if n < s.replicas {
		return res[0], fmt.Errorf("%w (%d of %d replicas within %v)", ErrNotReplicated, n, s.replicas, wait.Round(time.Millisecond))
	}
	return res[0], nil
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
