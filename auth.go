package main

import (
	"context"
	"log/slog"
	"net/http"
	"time"

	"github.com/redis/rueidis"

	"voicegate/auth"
	"voicegate/policy"
	"voicegate/proxy"
	"voicegate/voice"
)

// newJWKS is the JWKS at JWT_JWKS_URL, cached and refreshed until closed; nil without one.
func newJWKS(ctx context.Context, cfg *config, log *slog.Logger) *auth.JWKS {
	if cfg.JWKSURL == nil {
		return nil
	}
	return auth.NewJWKS(ctx, auth.JWKSOptions{URL: cfg.JWKSURL.String(), Refresh: cfg.JWKSRefresh,
		MinRefetch: cfg.JWKSMinRefetch, Log: log})
}

// newRevocations is the store of revoked tokens: Redis's, shared by every instance, or this
// instance's memory without Redis.
func newRevocations(cfg *config, redis rueidis.Client) auth.Revocations {
	// A user revocation must outlive every token it covers, and the verifier accepts a token
	// until its exp (at most JWT_MAX_LIFETIME away) plus the leeway.
	keep := cfg.JWTMaxLifetime + cfg.JWTLeeway
	if redis == nil {
		return auth.NewMemoryRevocations(keep, nil)
	}
	return auth.NewRedisRevocations(redis, auth.RedisRevocationsOptions{Prefix: cfg.RedisPrefix, MaxLifetime: keep,
		Replicas: revocationReplicas(redis)})
}

// newAuth is the authenticator: it verifies tokens (HMAC secret, JWKS), refuses revoked ones
// and, with USER_SERVICE_URL, those of disabled users (their status cached in Redis when there
// is one), each check bounded by AUTH_BUDGET.
func newAuth(cfg *config, jwks *auth.JWKS, revocations auth.Revocations, redis rueidis.Client,
	tel *telemetry, log *slog.Logger) (*auth.Authenticator, error) {
	verifier, err := auth.NewVerifier(auth.VerifierOptions{HMACSecret: cfg.JWTSecret, JWKS: jwks,
		Issuer: cfg.JWTIssuer, Audience: cfg.JWTAudience, Leeway: cfg.JWTLeeway, MaxLifetime: cfg.JWTMaxLifetime,
		Claims: cfg.Claims})
	if err != nil {
		return nil, err
	}
	var users *auth.UserStatus
	if cfg.UserServiceURL != nil {
		users = auth.NewUserStatus(auth.UserStatusOptions{URL: cfg.UserServiceURL, Redis: redis, Prefix: cfg.RedisPrefix,
			OnResult: func(outcome string, took time.Duration) { tel.upstreamResult("user", outcome, took) }})
	}
	return auth.New(auth.Options{
		OnFailure:     func(code string) { tel.authFailures.Add(context.Background(), 1, tel.add1("code", code)...) },
		OnStoreError:  tel.redisError,
		Verifier:      verifier,
		Revocations:   revocations,
		Users:         users,
		Budget:        cfg.AuthBudget,
		FailOpen:      cfg.AuthFailOpen,
		RefreshWindow: cfg.AuthRefreshWindow,
		PublicPaths:   cfg.AuthPublicPaths,
		Log:           log,
	}), nil
}

// newRevokeHandler is POST /api/v2/auth/revoke: the caller's own token, or with token:revoke
// (can) any token or user of the caller's tenant; ended says where the tokens are in use.
func newRevokeHandler(cfg *config, revocations auth.Revocations, can func(*http.Request, string) bool,
	ended func(context.Context, policy.Revocation)) http.Handler {
	return auth.NewRevokeHandler(auth.RevokeOptions{
		Revocations: revocations,
		Can:         can,
		MaxLifetime: cfg.JWTMaxLifetime,
		Leeway:      cfg.JWTLeeway,
		OnRevoked:   ended,
	})
}

// endRevoked ends, on every instance, the chat streams and voice sessions of the tokens a
// revocation revokes, in its tenant only. Failures are logged: the voice sessions' periodic
// recheck still closes them, and a stream ends with its answer.
func endRevoked(streams *chatStreams, voices *voice.Registry, log *slog.Logger) func(context.Context, policy.Revocation) {
	return func(ctx context.Context, v policy.Revocation) {
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Second)
		defer cancel()
		streams.running.Revoke(v) // this instance's at once
		if streams.directory != nil {
			if err := streams.directory.Revoke(ctx, v); err != nil {
				log.Warn("telling other instances about a revocation failed", "err", proxy.Describe(err))
			}
		}
		if err := voices.Revoke(ctx, v); err != nil {
			log.Warn("telling other instances about a revocation failed", "err", proxy.Describe(err))
		}
	}
}
