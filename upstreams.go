package main

import (
	"net/http"
	"net/http/httputil"
	"net/url"

	"voicegate/proxy"
)

// newPool balances an upstream's replicas over t; its attempts are traced and counted. Without
// targets it is nil.
func newPool(name string, targets []*url.URL, t *http.Transport, tel *telemetry) *proxy.Pool {
	if len(targets) == 0 {
		return nil
	}
	return proxy.NewPool(proxy.PoolOptions{
		Name:      name,
		Targets:   targets,
		Transport: t,
		Trace:     tel.clientSpan(),
		OnResult:  tel.upstreamResult,
	})
}

// newBackend proxies to a plain back end's replicas (ADMIN_URL, DOCS_URL), or answers 404 when
// it has none.
func newBackend(cfg *config, label, name string, targets []*url.URL, t *http.Transport, outbound proxy.Outbound,
	tel *telemetry) http.Handler {
	pool := newPool(label, targets, t, tel)
	if pool == nil {
		return http.HandlerFunc(proxy.NotFound)
	}
	return proxy.Chain(proxy.New(proxy.Options{
		Target:       pool.Primary(),
		Transport:    pool,
		BufferPool:   proxy.NewBufferPool(0),
		Name:         name,
		Outbound:     outbound,
		Rewrite:      backendCredentials(cfg),
		WriteTimeout: cfg.ProxyWriteTimeout,
	}), proxy.BodyLimit(cfg.MaxBodyBytes))
}

// backendCredentials removes the client's credentials from requests to ADMIN_URL and DOCS_URL,
// unless BACKEND_FORWARD_CREDENTIALS passes them on. By default those back ends learn who the
// caller is from the identity headers only: a bearer token is a credential for the gateway,
// and a back end that never sees it cannot leak or replay it; cookies of the gateway's domain
// may belong to other applications. A back end that verifies the token itself, or calls others
// on the user's behalf, asks for it with BACKEND_FORWARD_CREDENTIALS=authorization.
func backendCredentials(cfg *config) func(*httputil.ProxyRequest) {
	if cfg.ForwardAuthorization && cfg.ForwardCookies {
		return nil
	}
	return func(pr *httputil.ProxyRequest) {
		if !cfg.ForwardAuthorization {
			pr.Out.Header.Del("Authorization")
		}
		if !cfg.ForwardCookies {
			pr.Out.Header.Del("Cookie")
		}
	}
}
