package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"

	"github.com/redis/rueidis"

	"voicegate/auth"
	"voicegate/policy"
)

// Permissions that handlers check themselves, besides those the policy binds routes to.
var handlerPerms = []string{auth.PermRevoke, "chat:admin", "voice:admin"}

// newPolicyStore is the policy in force: POLICY_FILE's, checked against the route table's
// routes, or the built-in policy of the route table.
func newPolicyStore(cfg *config, log *slog.Logger) (*policy.Store, error) {
	store, err := policy.NewStore(policy.StoreOptions{Path: cfg.PolicyFile, Routes: routeBindings(cfg),
		ExtraPerms: handlerPerms, Log: log})
	if err != nil {
		return nil, fmt.Errorf("POLICY_FILE: %w", err)
	}
	return store, nil
}

// newFairUse is the enforcer: it holds callers to the policy in force (permissions, tenants,
// rates, quotas, concurrency caps), counting in Redis, where the renewer keeps this instance's
// concurrency leases alive, or in memory without Redis.
func newFairUse(cfg *config, redis rueidis.Client, renew *renewer, policies *policy.Store,
	tel *telemetry, log *slog.Logger) *policy.Enforcer {
	admitter := policy.Compose(policy.NewMemoryLimiter(nil), policy.NewMemoryLeases())
	if redis != nil {
		leases := policy.NewRedisAdmitter(redis, policy.RedisAdmitterOptions{Prefix: cfg.RedisPrefix, TTL: cfg.LeaseTTL,
			OnChange: renew.Kick})
		renew.add("concurrency leases", leases.Renew)
		admitter = leases
	}
	return policy.NewEnforcer(policy.EnforcerOptions{
		OnLimited:    func() { tel.rateLimited.Add(context.Background(), 1) },
		OnStoreError: tel.redisError,
		Policy:       policies.Policy,
		Subject:      subject,
		Admitter:     admitter,
		Budget:       cfg.LimitBudget,
		Log:          log,
	})
}

// subject presents the authenticated caller to the policy.
func subject(r *http.Request) (policy.Subject, bool) {
	id := auth.FromContext(r.Context())
	if id == nil {
		return policy.Subject{}, false
	}
	return policy.Subject{UserID: id.UserID, TenantID: id.TenantID, Roles: id.Roles, Grants: id.Permissions}, true
}

// addressedTenant is the tenant whose streams or sessions a request addresses: the one it names
// in X-Tenant-Id (the policy lets only a super admin name another than its own), or else the
// caller's.
func addressedTenant(r *http.Request) string {
	if t := r.Header.Get(policy.HeaderTenant); t != "" {
		return t
	}
	_, tenant := auth.Owner(r)
	return tenant
}
